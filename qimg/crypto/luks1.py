"""LUKS1 volumes as QEMU's crypto/block-luks.c writes and reads them
(cryptsetup's on-disk format 1.2.1): the header, the eight key slots, the
master key digest, PBKDF2 and the anti-forensic splitter.

A volume is addressed through `read(offset, length)` / `write(offset,
data)` callables relative to the start of its header, so one code serves
the raw `luks` format (a file) and qcow2's crypto header extension.

Layout (all integers big-endian, sizes in 512-byte sectors):
- the partition header (PHDR) and the 8 key slot headers: 592 bytes at 0;
- key slot i's material at `key_offset` = 8 + i * M sectors, where M is the
  AF-split key (key_bytes * 4000 bytes) in sectors rounded up to 8 (QEMU
  follows cryptsetup: 4096-byte alignment);
- the payload at `payload_offset` = 8 + 8 * M sectors.

A key slot holds the master key split into 4000 stripes (AF split with the
header's hash), encrypted with the volume's cipher under
PBKDF2(hash, password, slot salt, slot iterations), sector numbers counted
from 0 at the slot's material. PBKDF2(hash, master key, digest salt,
digest iterations) truncated to 20 bytes is the master key digest that
tells a right password from a wrong one.

Passwords are bytes a caller has checked as QEMU's
qcrypto_secret_lookup_as_utf8 does (UTF-8, no NUL): qimg.secrets.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from qimg.crypto import sectors
from qimg.errors import BadOptionError, InvalidImageError, QimgError

MAGIC = b"LUKS\xba\xbe"
VERSION = 1
# magic, version, cipher_name, cipher_mode, hash_spec, payload_offset,
# key_bytes, mk_digest, mk_digest_salt, mk_digest_iterations, uuid
PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
# active, iterations, salt, key_offset, stripes
KEYSLOT = struct.Struct(">II32sII")
NUM_KEY_SLOTS = 8
HEADER_SIZE = PHDR.size + NUM_KEY_SLOTS * KEYSLOT.size  # 592
KEY_SLOT_ENABLED = 0x00AC71F3
KEY_SLOT_DISABLED = 0x0000DEAD
SECTOR_SIZE = 512
KEY_SLOT_OFFSET = 4096  # the first key material; the key material alignment
HEADER_SECTORS = KEY_SLOT_OFFSET // SECTOR_SIZE
STRIPES = 4000
SALT_LEN = 32
DIGEST_LEN = 20
MIN_SLOT_KEY_ITERS = 1000
MIN_MASTER_KEY_ITERS = 1000
DEFAULT_ITER_TIME_MS = 2000
_UINT32_MAX = (1 << 32) - 1
_ULLONG_MAX = (1 << 64) - 1

# QEMU 7.2's QAPI enumerations (what its option parser accepts).
QAPI_CIPHER_ALGS = (
    "aes-128",
    "aes-192",
    "aes-256",
    "des",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
)
QAPI_HASH_ALGS = tuple(sectors.HASH_DIGEST_SIZES)
# The cipher names a LUKS header may carry (qcrypto_block_luks_cipher_name_map)
# and their key sizes.
_LUKS_CIPHERS = {"aes": (16, 24, 32), "cast5": (16,), "serpent": (16, 24, 32)}
_LUKS_CIPHERS["twofish"] = (16, 24, 32)


@dataclass(frozen=True)
class LuksParams:
    """How a new volume is made: QEMU's QCryptoBlockCreateOptionsLUKS."""

    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str | None = None  # essiv: sha256 unless given
    hash_alg: str = "sha256"
    iter_time_ms: int = DEFAULT_ITER_TIME_MS

    @property
    def key_bytes(self) -> int:
        """The master key length (XTS: two cipher keys)."""
        bits = int(self.cipher_alg.rpartition("-")[2])
        return bits // 8 * (2 if self.cipher_mode == "xts" else 1)

    @property
    def essiv_hash(self) -> str | None:
        """The ESSIV hash in effect (None without essiv)."""
        if self.ivgen_alg != "essiv":
            return None
        return self.ivgen_hash_alg or "sha256"


def parse_luks_options(opts: dict[str, str], prefix: str) -> LuksParams:
    """LuksParams from creation options as typed (`prefix` "encrypt." for
    qcow2, "" for the luks format); other keys are ignored. Bad values
    fail in qemu-img's words (an enumeration's message names the option
    without its prefix, a number's with it, as qemu-img does)."""
    from qimg.options import parse_number

    def enum(name: str, allowed, default):
        value = opts.get(prefix + name)
        if value is None:
            return default
        if value not in allowed:
            raise BadOptionError(f"Parameter '{name}' does not accept value '{value}'")
        return value

    params = LuksParams(
        cipher_alg=enum("cipher-alg", QAPI_CIPHER_ALGS, "aes-256"),
        cipher_mode=enum("cipher-mode", sectors.CIPHER_MODES, "xts"),
        ivgen_alg=enum("ivgen-alg", sectors.IVGEN_ALGS, "plain64"),
        ivgen_hash_alg=enum("ivgen-hash-alg", QAPI_HASH_ALGS, None),
        hash_alg=enum("hash-alg", QAPI_HASH_ALGS, "sha256"),
    )
    text = opts.get(prefix + "iter-time")
    if text is not None:
        params = replace(params, iter_time_ms=parse_number(prefix + "iter-time", text))
    if params.ivgen_alg == "essiv" and params.ivgen_hash_alg is None:
        params = replace(params, ivgen_hash_alg="sha256")
    return params


def check_params(params: LuksParams) -> None:
    """qcrypto_block_luks_create's checks of the options, in its order
    and words, before anything is written; and the volumes qimg cannot
    make: ciphers `cryptography` lacks, and key material that is not whole
    sectors (24-byte keys outside XTS: QEMU 7.2 aborts on those)."""
    family = params.cipher_alg.partition("-")[0]
    if family not in _LUKS_CIPHERS:
        raise BadOptionError(f"Algorithm '{params.cipher_alg}' not supported")
    if params.essiv_hash is not None:
        sectors.essiv_cipher_alg(params.cipher_alg, params.essiv_hash)
    sectors.check_cipher(params.cipher_alg, params.cipher_mode)
    material = params.key_bytes * STRIPES
    if material % SECTOR_SIZE:
        raise BadOptionError(
            f"Cipher {params.cipher_alg} in mode {params.cipher_mode} is not supported: its "
            f"key material ({material} bytes) is not a whole number of sectors"
        )


def _material_sectors(key_bytes: int, stripes: int = STRIPES) -> int:
    """qcrypto_block_luks_splitkeylen_sectors: a slot's key material in
    sectors, rounded up to the header's 8."""
    sectors_ = -(-key_bytes * stripes // SECTOR_SIZE)
    return -(-sectors_ // HEADER_SECTORS) * HEADER_SECTORS


def header_length(params: LuksParams) -> int:
    """The payload offset in bytes: header and the 8 slots' key material."""
    return (HEADER_SECTORS + NUM_KEY_SLOTS * _material_sectors(params.key_bytes)) * SECTOR_SIZE


# --- the header -------------------------------------------------------------------


@dataclass
class _Slot:
    active: int
    iterations: int
    salt: bytes
    key_offset: int  # sectors
    stripes: int

    @property
    def enabled(self) -> bool:
        return self.active == KEY_SLOT_ENABLED


@dataclass
class _Header:
    cipher_name: str
    cipher_mode: str  # "xts-plain64", "cbc-essiv:sha256"
    hash_spec: str
    payload_offset: int  # sectors
    key_bytes: int
    mk_digest: bytes
    mk_digest_salt: bytes
    mk_digest_iterations: int
    uuid: str
    slots: list[_Slot] = field(default_factory=list)

    @classmethod
    def unpack(cls, raw: bytes) -> _Header:
        f = PHDR.unpack_from(raw)
        slots = [
            _Slot(*KEYSLOT.unpack_from(raw, PHDR.size + i * KEYSLOT.size))
            for i in range(NUM_KEY_SLOTS)
        ]
        names = (_c_str(f[2]), _c_str(f[3]), _c_str(f[4]))
        return cls(*names, f[5], f[6], f[7], f[8], f[9], _c_str(f[10]), slots)

    def pack(self) -> bytes:
        out = PHDR.pack(
            MAGIC,
            VERSION,
            self.cipher_name.encode(),
            self.cipher_mode.encode(),
            self.hash_spec.encode(),
            self.payload_offset,
            self.key_bytes,
            self.mk_digest,
            self.mk_digest_salt,
            self.mk_digest_iterations,
            self.uuid.encode(),
        )
        return out + b"".join(
            KEYSLOT.pack(s.active, s.iterations, s.salt, s.key_offset, s.stripes)
            for s in self.slots
        )


def _c_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def header_info(raw: bytes) -> dict:
    """The header (the first HEADER_SIZE bytes, zero-padded if the volume
    is shorter) checked as QEMU's qcrypto_block_luks_open checks it without
    a key (check_header, then parse_header), in its order and words; the
    QCryptoBlockInfoLUKS that info reports, in qemu-img's key order."""
    raw = bytes(raw[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
    fields = PHDR.unpack_from(raw)
    (magic, version, cipher_raw, mode_raw, hash_raw, payload, key_bytes) = fields[:7]
    mk_iters, uuid_raw = fields[9], fields[10]
    if magic != MAGIC:
        raise InvalidImageError("Volume is not in LUKS format")
    if version != VERSION:
        raise InvalidImageError(f"LUKS version {version} is not supported")
    for value, what in ((cipher_raw, "cipher name"), (mode_raw, "cipher mode")):
        if b"\0" not in value:
            raise InvalidImageError(f"LUKS header {what} is not NUL terminated")
    if b"\0" not in hash_raw:
        raise InvalidImageError("LUKS header hash spec is not NUL terminated")
    if payload < HEADER_SECTORS:
        raise InvalidImageError("LUKS payload is overlapping with the header")
    if mk_iters == 0:
        raise InvalidImageError("LUKS key iteration count is zero")
    header = _Header.unpack(raw)
    _check_slots(header.slots, key_bytes, payload)
    cipher, mode, ivgen, ivgen_hash = _parse_names(header)
    out: dict = {"ivgen-alg": ivgen, "hash-alg": header.hash_spec}
    out["cipher-alg"] = cipher
    out["uuid"] = _c_str(uuid_raw)
    if ivgen == "essiv":  # the hash is ignored by the other generators
        out["ivgen-hash-alg"] = ivgen_hash
    out.update({"format": "luks", "cipher-mode": mode})
    out["slots"] = [_slot_info(slot) for slot in header.slots]
    out["payload-offset"] = payload * SECTOR_SIZE
    out["master-key-iters"] = mk_iters
    return out


def _parse_names(header: _Header) -> tuple[str, str, str, str | None]:
    """qcrypto_block_luks_parse_header: (QEMU cipher name, mode, ivgen,
    ivgen hash or None) from the header's strings."""
    mode, dash, ivgen = header.cipher_mode.partition("-")
    if not dash:
        raise InvalidImageError(f"Unexpected cipher mode string format '{header.cipher_mode}'")
    ivgen, colon, ivgen_hash = ivgen.partition(":")
    if colon and ivgen_hash not in sectors.HASH_DIGEST_SIZES:
        raise InvalidImageError(f"Hash algorithm '{ivgen_hash}' not supported")
    if mode not in sectors.CIPHER_MODES:
        raise InvalidImageError(f"Cipher mode '{mode}' not supported")
    # XTS keys hold two cipher keys (qcrypto_block_luks_cipher_name_lookup).
    key = header.key_bytes // 2 if mode == "xts" else header.key_bytes
    name = header.cipher_name
    if key not in _LUKS_CIPHERS.get(name, ()):
        raise InvalidImageError(f"Algorithm '{name}' with key size {key} bytes not supported")
    if header.hash_spec not in sectors.HASH_DIGEST_SIZES:
        raise InvalidImageError(f"Hash algorithm '{header.hash_spec}' not supported")
    if ivgen not in sectors.IVGEN_ALGS:
        raise InvalidImageError(f"IV generator '{ivgen}' not supported")
    cipher = f"{name}-{key * 8}"
    if ivgen == "essiv":
        if not colon:
            raise InvalidImageError("Missing IV generator hash specification")
        try:
            sectors.essiv_cipher_alg(cipher, ivgen_hash)
        except BadOptionError as exc:
            raise InvalidImageError(str(exc)) from None
    return cipher, mode, ivgen, (ivgen_hash if colon else None)


def _check_slots(slots: list[_Slot], key_bytes: int, payload: int) -> None:
    """qcrypto_block_luks_check_header's key slot checks."""
    bad = InvalidImageError

    def extent(slot: _Slot) -> tuple[int, int]:
        return slot.key_offset, _material_sectors(key_bytes, slot.stripes)

    for i, slot in enumerate(slots):
        if slot.stripes != STRIPES:
            raise bad(f"Keyslot {i} is corrupted (stripes {slot.stripes} != {STRIPES})")
        if slot.active not in (KEY_SLOT_ENABLED, KEY_SLOT_DISABLED):
            raise bad(f"Keyslot {i} state (active/disable) is corrupted")
        if slot.enabled and slot.iterations == 0:
            raise bad(f"Keyslot {i} iteration count is zero")
        start, length = extent(slot)
        if start < HEADER_SECTORS:
            raise bad(f"Keyslot {i} is overlapping with the LUKS header")
        if start + length > payload:
            raise bad(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, len(slots)):
            start2, length2 = extent(slots[j])
            if start < start2 + length2 and start2 < start + length:
                raise bad(f"Keyslots {i} and {j} are overlapping in the header")


def _slot_info(slot: _Slot) -> dict:
    out: dict = {"active": slot.enabled}
    if slot.enabled:
        out["iters"] = slot.iterations
    out["key-offset"] = slot.key_offset * SECTOR_SIZE
    if slot.enabled:
        out["stripes"] = slot.stripes
    return out


# --- PBKDF2 and the anti-forensic splitter ------------------------------------------


def pbkdf2(hash_alg: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC (RFC 2898). `cryptography`'s is about 3x faster than
    hashlib's here; it has no RIPEMD-160, hashlib does."""
    if hash_alg == "ripemd160":
        import hashlib

        return hashlib.pbkdf2_hmac(hash_alg, password, salt, iterations, length)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    algorithm = getattr(hashes, hash_alg.upper())()
    return PBKDF2HMAC(algorithm, length, salt, iterations).derive(password)


_RATES: dict[str, float] = {}  # iterations per CPU second of one output block


def pbkdf2_count_iters(hash_alg: str, length: int) -> int:
    """QEMU's qcrypto_pbkdf2_count_iters: the PBKDF2 iterations one second
    of this thread's CPU computes for a `length`-byte output. QEMU times
    runs until one takes over 500 ms; qimg times until one takes over
    20 ms (thread CPU time, which load does not stretch: a longer run
    measured the same rate within a few per cent and cost every LUKS
    create 0.25 s), once per hash and process, and scales by the output's
    blocks."""
    rate = _RATES.get(hash_alg)
    if rate is None:
        iterations = 1 << 12
        while True:
            start = time.thread_time()
            pbkdf2(hash_alg, b"qimg", bytes(SALT_LEN), iterations, 1)
            spent = time.thread_time() - start
            if spent > 0.02:
                break
            # Aim at 30 ms from a run long enough to time (over 1 ms).
            iterations = iterations * 10 if spent < 0.001 else int(iterations * 0.03 / spent)
        rate = _RATES[hash_alg] = iterations / spent
    blocks = -(-length // sectors.HASH_DIGEST_SIZES[hash_alg])
    return int(rate / blocks)


def _scaled_iterations(per_second: int, iter_time_ms: int, divisor: int, floor: int) -> int:
    """QEMU's scaling of a benchmark to iter-time, with its range errors."""
    if iter_time_ms and per_second > _ULLONG_MAX // iter_time_ms:
        raise QimgError(
            f"PBKDF iterations {per_second} too large to scale: Numerical result out of range"
        )
    iterations = per_second * iter_time_ms // 1000 // divisor
    if iterations > _UINT32_MAX:
        raise QimgError(
            f"PBKDF iterations {iterations} larger than {_UINT32_MAX}: "
            "Numerical result out of range"
        )
    return max(iterations, floor)


def _diffuser(hash_alg: str, length: int):
    """qcrypto_afsplit_hash for `length`-byte blocks: each digest-sized
    piece i of the block replaced by hash(be32(i) || piece), the last one
    truncated. Blocks and results are little-endian integers (the XORs of
    the splitter are then one operation each)."""
    import hashlib

    size = sectors.HASH_DIGEST_SIZES[hash_alg]
    new = getattr(hashlib, hash_alg, None)
    if new is None or hash_alg == "ripemd160":

        def new(data: bytes):
            return hashlib.new(hash_alg, data)

    pieces = [(struct.pack(">I", i), off, min(size, length - off))
              for i, off in enumerate(range(0, length, size))]  # fmt: skip

    def diffuse(block: int) -> int:
        raw = block.to_bytes(length, "little")
        return int.from_bytes(
            b"".join(new(prefix + raw[off : off + n]).digest()[:n] for prefix, off, n in pieces),
            "little",
        )

    return diffuse


def afsplit_encode(hash_alg: str, key: bytes, stripes: int) -> bytes:
    """The key spread over `stripes` blocks: stripes-1 random ones, the
    last the key XOR the diffusion of the others."""
    size = len(key)
    randoms = os.urandom(size * (stripes - 1))
    diffuse = _diffuser(hash_alg, size)
    block = 0
    for i in range(stripes - 1):
        block = diffuse(int.from_bytes(randoms[i * size : (i + 1) * size], "little") ^ block)
    return randoms + (int.from_bytes(key, "little") ^ block).to_bytes(size, "little")


def afsplit_decode(hash_alg: str, material: bytes, key_len: int, stripes: int) -> bytes:
    """The key back from its `stripes` blocks."""
    diffuse = _diffuser(hash_alg, key_len)
    block = 0
    for i in range(stripes - 1):
        block = diffuse(int.from_bytes(material[i * key_len : (i + 1) * key_len], "little") ^ block)
    last = int.from_bytes(material[(stripes - 1) * key_len : stripes * key_len], "little")
    return (last ^ block).to_bytes(key_len, "little")


# --- creating, unlocking ------------------------------------------------------------


def _mode_spec(params: LuksParams) -> str:
    spec = f"{params.cipher_mode}-{params.ivgen_alg}"
    return f"{spec}:{params.ivgen_hash_alg}" if params.ivgen_hash_alg else spec


def format_volume(secret: bytes, params: LuksParams) -> tuple[bytes, bytes]:
    """A new volume: (the header and key material, header_length(params)
    bytes, slot 0 holding the master key under `secret`; the master key).
    The other slots' material is zeros, as QEMU leaves it."""
    check_params(params)
    key_bytes = params.key_bytes
    master_key = os.urandom(key_bytes)
    material = _material_sectors(key_bytes)
    header = _Header(
        cipher_name=params.cipher_alg.partition("-")[0],
        cipher_mode=_mode_spec(params),
        hash_spec=params.hash_alg,
        payload_offset=HEADER_SECTORS + NUM_KEY_SLOTS * material,
        key_bytes=key_bytes,
        mk_digest=b"",
        mk_digest_salt=os.urandom(SALT_LEN),
        mk_digest_iterations=0,
        uuid=str(uuid.uuid4()),
        slots=[
            _Slot(KEY_SLOT_DISABLED, 0, bytes(SALT_LEN), HEADER_SECTORS + i * material, STRIPES)
            for i in range(NUM_KEY_SLOTS)
        ],
    )
    rate = pbkdf2_count_iters(params.hash_alg, DIGEST_LEN)
    header.mk_digest_iterations = _scaled_iterations(
        rate, params.iter_time_ms, NUM_KEY_SLOTS, MIN_MASTER_KEY_ITERS
    )
    header.mk_digest = _master_key_digest(header, master_key)
    volume = bytearray(header.payload_offset * SECTOR_SIZE)
    slot_material = _store_key(header, 0, secret, master_key, params.iter_time_ms)
    start = header.slots[0].key_offset * SECTOR_SIZE
    volume[start : start + len(slot_material)] = slot_material
    volume[:HEADER_SIZE] = header.pack()
    return bytes(volume), master_key


def _master_key_digest(header: _Header, master_key: bytes) -> bytes:
    return pbkdf2(
        header.hash_spec,
        master_key,
        header.mk_digest_salt,
        header.mk_digest_iterations,
        DIGEST_LEN,
    )


def _slot_cipher(header: _Header, slot_key: bytes):
    cipher, mode, ivgen, ivgen_hash = _parse_names(header)
    return sectors.sector_cipher(cipher, mode, ivgen, ivgen_hash, slot_key)


def _store_key(
    header: _Header, index: int, password: bytes, master_key: bytes, iter_time_ms: int
) -> bytes:
    """qcrypto_block_luks_store_key without the writes: fills slot `index`
    of `header` (salt, iterations, active) and returns its key material."""
    slot = header.slots[index]
    slot.salt = os.urandom(SALT_LEN)
    rate = pbkdf2_count_iters(header.hash_spec, header.key_bytes)
    slot.iterations = _scaled_iterations(rate, iter_time_ms, 1, MIN_SLOT_KEY_ITERS)
    slot_key = pbkdf2(header.hash_spec, password, slot.salt, slot.iterations, header.key_bytes)
    split = afsplit_encode(header.hash_spec, master_key, slot.stripes)
    slot.active = KEY_SLOT_ENABLED
    return bytes(_slot_cipher(header, slot_key).encrypt(0, _whole_sectors(split)))[: len(split)]


def _whole_sectors(data: bytes) -> bytes:
    return data.ljust(-(-len(data) // SECTOR_SIZE) * SECTOR_SIZE, b"\0")


def _load_key(header: _Header, index: int, password: bytes, read) -> bytes | None:
    """qcrypto_block_luks_load_key: the master key if `password` opens
    slot `index`, else None."""
    slot = header.slots[index]
    if not slot.enabled:
        return None
    slot_key = pbkdf2(header.hash_spec, password, slot.salt, slot.iterations, header.key_bytes)
    length = header.key_bytes * slot.stripes
    encrypted = _read_exact(read, slot.key_offset * SECTOR_SIZE, -(-length // 512) * 512)
    split = bytes(_slot_cipher(header, slot_key).decrypt(0, encrypted))
    master_key = afsplit_decode(header.hash_spec, split, header.key_bytes, slot.stripes)
    if _master_key_digest(header, master_key) == header.mk_digest:
        return master_key
    return None


def _read_exact(read, offset: int, length: int) -> bytes:
    """Past the end of the volume QEMU reads zeros."""
    data = bytes(read(offset, length))
    return data.ljust(length, b"\0")


def _read_header(read) -> _Header:
    raw = _read_exact(read, 0, HEADER_SIZE)
    header_info(raw)  # every check, in QEMU's order
    return _Header.unpack(raw)


@dataclass(frozen=True, repr=False)
class LuksVolume:
    """An unlocked volume: its master key, info and payload offset."""

    master_key: bytes
    info: dict
    payload_offset: int  # bytes
    _names: tuple[str, str, str, str | None]

    def cipher(self, iv_from_host: bool = True):
        """The SectorCipher of the payload."""
        cipher, mode, ivgen, ivgen_hash = self._names
        return sectors.sector_cipher(
            cipher, mode, ivgen, ivgen_hash, self.master_key, iv_from_host=iv_from_host
        )

    def __repr__(self) -> str:  # never the key
        return f"<LuksVolume {self.info.get('cipher-alg')} {self.info.get('uuid')}>"


def unlock(read: Callable[[int, int], bytes], secret: bytes) -> LuksVolume:
    """The volume behind `read` unlocked with the password `secret`
    (qcrypto_block_luks_open): the header checked, then each active slot
    tried in order."""
    raw = _read_exact(read, 0, HEADER_SIZE)
    info = header_info(raw)  # every check, in QEMU's order
    header = _Header.unpack(raw)
    names = _parse_names(header)
    sectors.check_cipher(names[0], names[1])
    for index in range(NUM_KEY_SLOTS):
        master_key = _load_key(header, index, secret, read)
        if master_key is not None:
            return LuksVolume(master_key, info, header.payload_offset * SECTOR_SIZE, names)
    raise InvalidImageError("Invalid password, cannot unlock any keyslot")


# --- amend: key slots ---------------------------------------------------------------


@dataclass(frozen=True)
class LuksAmend:
    """QEMU's QCryptoBlockAmendOptionsLUKS as given (secret ids, not values)."""

    state: str  # "active" or "inactive"
    keyslot: int | None = None
    new_secret: str | None = None
    old_secret: str | None = None
    iter_time_ms: int | None = None


AMEND_OPTIONS = ("state", "keyslot", "new-secret", "old-secret", "iter-time")


def parse_amend_options(opts: dict[str, str], prefix: str) -> LuksAmend:
    """LuksAmend from amend options as typed, with qemu-img's messages
    (numbers name the option with its prefix, the rest without)."""
    from qimg.options import parse_number

    state = opts.get(prefix + "state")
    if state is None:
        raise BadOptionError("Parameter 'state' is missing")
    if state not in ("active", "inactive"):
        raise BadOptionError(f"Parameter 'state' does not accept value '{state}'")
    numbers = {}
    for name in ("keyslot", "iter-time"):
        text = opts.get(prefix + name)
        numbers[name] = None if text is None else parse_number(prefix + name, text)
    return LuksAmend(
        state=state,
        keyslot=numbers["keyslot"],
        new_secret=opts.get(prefix + "new-secret"),
        old_secret=opts.get(prefix + "old-secret"),
        iter_time_ms=numbers["iter-time"],
    )


Secret = bytes | Callable[[], bytes]


def _value(secret: Secret) -> bytes:
    return secret() if callable(secret) else secret


def amend_keyslots(
    read: Callable[[int, int], bytes],
    write: Callable[[int, bytes], None],
    master_key: bytes,
    *,
    new_secret: Secret | None,
    old_secret: Secret | None,
    keyslot: int | None,
    state: str,
    iter_time_ms: int | None,
    force: bool,
) -> None:
    """QEMU's qcrypto_block_luks_amend_options on an unlocked volume.

    state "active": store `master_key` under `new_secret` in `keyslot` (or
    the first inactive slot); "inactive": erase `keyslot`, or every slot
    `old_secret` opens. Secrets may be callables, looked up where QEMU
    looks them up (so an unknown id fails after the checks before it).
    Refusals (an active slot overwritten, the last slots erased) are
    qemu-img's, lifted by `force` as there.

    Ordering: a new slot's key material is written before the header
    that activates it; an erased slot is deactivated in the header before
    its material is overwritten, so a crash never leaves an active slot
    over garbage."""
    header = _read_header(read)
    if keyslot is not None:
        keyslot &= _UINT32_MAX  # QEMU's int, printed with %u
    if state == "active":
        _add_keyslot(
            header, write, master_key, new_secret, old_secret, keyslot, iter_time_ms, force
        )
    else:
        _erase_keyslots(header, read, write, new_secret, old_secret, keyslot, iter_time_ms, force)


def _check_keyslot(keyslot: int) -> None:
    if keyslot >= NUM_KEY_SLOTS:  # negative ones arrive as large %u values
        raise BadOptionError(
            f"Invalid keyslot {keyslot} specified, must be between 0 and {NUM_KEY_SLOTS - 1}"
        )


def _add_keyslot(header, write, master_key, new_secret, old_secret, keyslot, iter_time, force):
    if new_secret is None:
        raise BadOptionError("'new-secret' is required to activate a keyslot")
    if old_secret is not None:
        raise BadOptionError("'old-secret' must not be given when activating keyslots")
    if keyslot is not None:
        _check_keyslot(keyslot)
    else:
        free = [i for i, s in enumerate(header.slots) if not s.enabled]
        if not free:
            raise BadOptionError("Can't add a keyslot - all keyslots are in use")
        keyslot = free[0]
    if not force and header.slots[keyslot].enabled:
        raise BadOptionError(
            f"Refusing to overwrite active keyslot {keyslot} - please erase it first"
        )
    password = _value(new_secret)
    iter_time = DEFAULT_ITER_TIME_MS if iter_time is None else iter_time
    material = _store_key(header, keyslot, password, master_key, iter_time)
    write(header.slots[keyslot].key_offset * SECTOR_SIZE, material)
    write(0, header.pack())


def _erase_keyslots(header, read, write, new_secret, old_secret, keyslot, iter_time, force):
    if new_secret is not None:
        raise BadOptionError("'new-secret' must not be given when erasing keyslots")
    if iter_time is not None:
        raise BadOptionError("'iter-time' must not be given when erasing keyslots")
    password = None if old_secret is None else _value(old_secret)
    active = sum(s.enabled for s in header.slots)
    if keyslot is not None:
        _check_keyslot(keyslot)
        if password is not None and _load_key(header, keyslot, password, read) is None:
            raise BadOptionError(
                f"Given keyslot {keyslot} doesn't contain the given old password "
                "for erase operation"
            )
        if not force and not header.slots[keyslot].enabled:
            raise BadOptionError(f"Given keyslot {keyslot} is already erased (inactive) ")
        if not force and active == 1:
            raise BadOptionError(
                f"Attempt to erase the only active keyslot {keyslot} which will erase all "
                "the data in the image irreversibly - refusing operation"
            )
        targets = [keyslot]
    elif password is not None:
        targets = [
            i for i in range(NUM_KEY_SLOTS) if _load_key(header, i, password, read) is not None
        ]
        if not targets:
            raise BadOptionError("No keyslots match given (old) password for erase operation")
        if not force and len(targets) == active:
            raise BadOptionError(
                "All the active keyslots match the (old) password that was given and erasing "
                "them will erase all the data in the image irreversibly - refusing operation"
            )
    else:
        raise BadOptionError(
            "To erase keyslot(s), either explicit keyslot index or the password currently "
            "contained in them must be given"
        )
    for index in targets:
        _erase_key(header, index, write)


def _erase_key(header: _Header, index: int, write) -> None:
    """qcrypto_block_luks_erase_key: the slot reset in the header, then its
    key material overwritten with random bytes (QEMU writes 40 random
    passes without a flush between them; only the last reaches the disk,
    so qimg writes one)."""
    slot = header.slots[index]
    slot.salt, slot.iterations, slot.active = bytes(SALT_LEN), 0, KEY_SLOT_DISABLED
    write(0, header.pack())
    write(slot.key_offset * SECTOR_SIZE, os.urandom(header.key_bytes * slot.stripes))
