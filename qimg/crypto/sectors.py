"""Sector ciphers: QEMU's qcrypto_block_cipher_{en,de}crypt_helper over
whole runs of 512-byte sectors, each sector with its own IV.

A `SectorCipher` (qimg.formats.qcow2.dataio) encrypts or decrypts n whole
sectors, the first numbered `sector`. Every call does a fixed number of
`cryptography` and numpy calls per chunk of sectors, never one per sector:

- IVs (QEMU's ivgen): plain = the low 32 bits of the sector number, plain64
  = its 64 bits, both little-endian and zero-padded to the cipher's block;
  essiv = plain64 encrypted (ECB) under hash(master key), in one call.
- XTS (IEEE 1619, 512-byte data units, no ciphertext stealing): the tweaks
  T0 = E_key2(IV) of a chunk in one ECB call, T_j = T0 * alpha^j for the
  32 blocks of each sector in five numpy steps over the whole chunk
  (GF(2^128), the tweak a little-endian 128-bit number), then
  C = E_key1(P ^ T) ^ T with one ECB call over the chunk.
- CBC: decryption is one CBC stream over the whole run (each sector's
  first block, which the stream chained to the sector before, then
  decrypted again with its IV: one ECB call over the n first blocks);
  in place, through a small buffer a piece at a time;
  encryption chains within a sector, so it runs block column by block
  column across all sectors of the chunk (32 ECB calls for AES).
- CTR: counter blocks IV + j (big-endian, as nettle and gcrypt count) of a
  chunk in one ECB call, XORed in.
- ECB: no IV.

Threads: numpy releases the GIL in its passes; `cryptography` releases it
during a cipher update only in some versions (measured: a Python thread
left to run during one update of 256 MiB and 256 of 1 MiB, AES-CBC and
AES-ECB): up to 42 (the cffi binding, every OpenSSL call) and from 50.0
on; 43.0 to 49.0 (Rust) hold it. Every version computes the same bytes.
The XTS tweaks and XORs (numpy) are most of XTS's work, so a call of
several chunks spreads them over a thread per core, unless its caller
reads from several threads already (split=False: convert's readers,
compare): there the cores are busy with the readers, and the pool
measured no faster (XTS, 1 GiB, same CPU and wall within the noise),
with twice the threads. CBC decryption stays in the calling thread (see
_CBC.decrypt).
`encrypt_writing` (qcow2 data writes) also overlaps the encryption of a
write's later pieces with the writing of its earlier ones.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from qimg.errors import BadOptionError

SECTOR_SIZE = 512  # QCRYPTO_BLOCK_LUKS_SECTOR_SIZE, QCRYPTO_BLOCK_QCOW_SECTOR_SIZE
_CHUNK_SECTORS = 2048  # 1 MiB per pass: the temporaries stay in cache
# encrypt_writing's pieces: at most a chunk (a piece is encrypted on one
# pool thread, never split over the pool again); 512 KiB measured no
# dearer to encrypt a MiB at a time than 1 MiB chunks.
_PIECE_SECTORS = 1024
# Bytes of a CBC stream decrypted in place per call, through a buffer that
# stays in the CPU cache (_CBC._stream_in_place).
STREAM_PIECE = 256 << 10
# Encrypted reads of whole sectors at least this long (qcow2's DataIO, the
# luks format) decrypt from a mapping of the file (Storage.mapped) into the
# caller's buffer instead of reading a copy first: one pass over the data
# fewer (shorter reads: the mapping's system calls cost more than the copy).
MAPPED_READ = 256 << 10

# QEMU's QCryptoCipherAlgorithm names -> (family, key bytes, block bytes).
CIPHER_ALGS = {
    "aes-128": ("aes", 16, 16),
    "aes-192": ("aes", 24, 16),
    "aes-256": ("aes", 32, 16),
    "cast5-128": ("cast5", 16, 8),
}
# Known to QEMU, absent from `cryptography`: refused as QEMU's cipher
# backends refuse an algorithm they lack.
MISSING_ALGS = frozenset(
    f"{family}-{bits}" for family in ("serpent", "twofish") for bits in (128, 192, 256)
)
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
IVGEN_ALGS = ("plain", "plain64", "essiv")
HASH_DIGEST_SIZES = {
    "md5": 16,
    "sha1": 20,
    "sha224": 28,
    "sha256": 32,
    "sha384": 48,
    "sha512": 64,
    "ripemd160": 20,
}


def cipher_key_bytes(cipher_alg: str, cipher_mode: str) -> int:
    """The master key length of a cipher: XTS holds two cipher keys."""
    return CIPHER_ALGS[cipher_alg][1] * (2 if cipher_mode == "xts" else 1)


def check_cipher(cipher_alg: str, cipher_mode: str) -> None:
    """Refuse, in QEMU's cipher backends' words, what cannot be built."""
    if cipher_alg in MISSING_ALGS:
        raise BadOptionError(f"Unsupported cipher algorithm {cipher_alg}")
    if cipher_alg not in CIPHER_ALGS:
        raise BadOptionError(f"Algorithm '{cipher_alg}' not supported")
    if cipher_mode not in CIPHER_MODES:
        raise BadOptionError(f"Cipher mode '{cipher_mode}' not supported")
    if cipher_mode == "xts" and CIPHER_ALGS[cipher_alg][2] != 16:
        raise BadOptionError("Unsupported cipher mode xts")


def essiv_cipher_alg(cipher_alg: str, ivgen_hash_alg: str) -> str:
    """QEMU's qcrypto_block_luks_essiv_cipher: the cipher itself if its key
    is as long as the hash's digest, else the one of its family that is
    (dm-crypt's choice), in QEMU's words where there is none."""
    family, _, bits = cipher_alg.partition("-")
    digest = HASH_DIGEST_SIZES[ivgen_hash_alg]
    if bits.isdigit() and int(bits) == digest * 8:
        return cipher_alg
    labels = {"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}
    if family not in labels:
        raise BadOptionError(f"Cipher {cipher_alg} not supported with essiv")
    if digest not in (16, 24, 32):
        raise BadOptionError(f"No {labels[family]} cipher with key size {digest} available")
    return f"{family}-{digest * 8}"


def sector_cipher(
    cipher_alg: str,
    cipher_mode: str,
    ivgen_alg: str,
    ivgen_hash_alg: str | None,
    key: bytes,
    *,
    iv_from_host: bool = True,
):
    """A SectorCipher for QEMU's cipher, mode and IV generator names and
    the master key (both XTS keys, key1 first)."""
    check_cipher(cipher_alg, cipher_mode)
    if ivgen_alg not in IVGEN_ALGS:
        raise BadOptionError(f"IV generator '{ivgen_alg}' not supported")
    if len(key) != cipher_key_bytes(cipher_alg, cipher_mode):
        raise BadOptionError(f"Key length {len(key)} does not suit cipher {cipher_alg}")
    family, key_len, block = CIPHER_ALGS[cipher_alg]
    essiv_key = None
    essiv_family = family
    if ivgen_alg == "essiv" and cipher_mode != "ecb":
        if ivgen_hash_alg is None:
            raise BadOptionError("Missing IV generator hash specification")
        essiv_alg = essiv_cipher_alg(cipher_alg, ivgen_hash_alg)
        essiv_key = _hash(ivgen_hash_alg, key)[: CIPHER_ALGS[essiv_alg][1]]
    cls = {"xts": _XTS, "cbc": _CBC, "ctr": _CTR, "ecb": _ECB}[cipher_mode]
    return cls(
        _Spec(family, block, ivgen_alg, essiv_family, essiv_key),
        key,
        key_len,
        iv_from_host,
    )


def qcow_aes_cipher(secret: bytes):
    """The legacy qcow/qcow2 cipher (crypt_method 1, QEMU's
    qcrypto_block_qcow_init): AES-128-CBC, IV plain64 of the guest sector,
    the key the secret's bytes up to its first NUL, cut or zero-padded to
    16 bytes. The secret must be UTF-8, as QEMU reads it."""
    try:
        secret.decode("utf-8")
    except UnicodeDecodeError:
        raise BadOptionError("Data from secret is not valid UTF-8") from None
    key = secret.split(b"\0", 1)[0][:16].ljust(16, b"\0")
    return sector_cipher("aes-128", "cbc", "plain64", None, key, iv_from_host=False)


def ciphertext(storage, host: int, view: memoryview):
    """The ciphertext of the whole sectors at `host` for a decrypting read
    into `view`: a mapping of the file (Storage.mapped: the ciphertext
    never copied) where the read is MAPPED_READ bytes or more and the file
    maps it; else `view` itself, read into (to decrypt in place). Bytes
    past the end of the file read as zeros."""
    mapped = storage.mapped(host, len(view)) if len(view) >= MAPPED_READ else None
    if mapped is not None:
        return mapped
    storage.pread_padded(host, view)
    return view


def encrypt_writing(cipher, sector: int, data, out, write) -> None:
    """Encrypt whole sectors `data` (the first numbered `sector`) with the
    SectorCipher `cipher` into `out` (a writable buffer as long), handing
    the ciphertext to write(offset, piece) in pieces in order: the pool
    threads encrypt the later pieces while `write` stores the earlier ones
    (a pwrite releases the GIL), instead of the whole run being encrypted
    first and written after. Once this returns or raises, nothing writes
    into `out` any more."""
    src = memoryview(data).cast("B")
    dst = memoryview(out).cast("B")
    total = len(src)
    piece = _PIECE_SECTORS * SECTOR_SIZE
    if total <= piece:
        cipher.encrypt(sector, src, out=dst)
        write(0, dst)
        return

    def encrypt(at: int) -> None:
        cipher.encrypt(sector + at // SECTOR_SIZE, src[at : at + piece], out=dst[at : at + piece])

    starts = range(0, total, piece)
    futures = [_pool().submit(encrypt, at) for at in starts]
    try:
        for at, future in zip(starts, futures):
            future.result()
            write(at, dst[at : at + piece])
    finally:
        from concurrent.futures import wait

        for future in futures:
            future.cancel()
        wait(futures)


def _hash(name: str, data: bytes) -> bytes:
    import hashlib

    return hashlib.new(name, data).digest()


def _algorithm(family: str, key: bytes):
    if family == "aes":
        from cryptography.hazmat.primitives.ciphers import algorithms

        return algorithms.AES(key)
    from cryptography.hazmat.decrepit.ciphers import algorithms as decrepit

    return decrepit.CAST5(key)


def _gf128_reduce_table():
    """R[v] = v * 0x87 carry-less, for the up to 16 bits a shift pushes
    out of a tweak (512 KiB, made once)."""
    import numpy as np

    v = np.arange(1 << 16, dtype=np.uint64)
    return v ^ (v << np.uint64(1)) ^ (v << np.uint64(2)) ^ (v << np.uint64(7))


_REDUCE = None


def _shift_in(np, lo, hi, lo_out, hi_out, bits, spill, spare) -> None:
    """(lo_out, hi_out) = (lo, hi) * alpha^bits in GF(2^128), `bits` an
    int up to 16. `spill` and `spare` are scratch arrays shaped like the
    outputs (the results of the passes land in them: fresh temporaries
    cost allocations)."""
    global _REDUCE
    if _REDUCE is None:
        _REDUCE = _gf128_reduce_table()
    k = np.uint64(bits)
    back = np.uint64(64) - k
    over = np.right_shift(hi, back, out=spill)  # the bits shifted out, below 2^bits
    np.left_shift(hi, k, out=hi_out)
    hi_out |= np.right_shift(lo, back, out=spare)
    np.left_shift(lo, k, out=lo_out)
    # take() with intp indices, all in range ("clip" only spares take a
    # buffer): fancy indexing casts the indices and runs numpy's general
    # map iterator, 2-3 times slower.
    lo_out ^= np.take(_REDUCE, over.view(np.intp), out=spare, mode="clip")


_POOL = None
_POOL_LOCK = threading.Lock()


def _pool():
    """The threads that share a call's chunks (one per core)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="qimg-crypto")
        return _POOL


def _octets(array) -> memoryview:
    """The bytes of a numpy array as `cryptography` takes them (contiguous
    unsigned bytes; a copy only if `array` is strided)."""
    import numpy as np

    return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _same_start(a, b) -> bool:
    """Whether numpy arrays `a` and `b` begin at the same address."""
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


def _blocks_of(array):
    """The cipher blocks of a (rows, blocks, words) uint64 array whose rows
    are contiguous, as (rows, blocks) opaque elements of a block each:
    numpy transposes these several times faster than pairs of words."""
    rows, blocks, words = array.shape
    return array.reshape(rows, blocks * words).view(f"V{words * 8}")


@dataclass(frozen=True)
class _Spec:
    family: str
    block: int  # cipher block bytes (16 AES, 8 CAST5)
    ivgen_alg: str
    essiv_family: str
    essiv_key: bytes | None


class _Base:
    """Common machinery: chunking, ECB calls, IVs. Data is handled as
    numpy uint64 arrays shaped (sectors, blocks per sector, words per block)."""

    # Their numpy work (tweaks, IVs, XORs), most of it, releases the GIL.
    parallel = True

    def __init__(self, spec: _Spec, key: bytes, key_len: int, iv_from_host: bool):
        import numpy as np
        from cryptography.hazmat.primitives.ciphers import Cipher, modes

        self._np = np
        self.iv_from_host = iv_from_host
        self._spec = spec
        self._words = spec.block // 8
        self._blocks = SECTOR_SIZE // spec.block
        self._key_len = key_len
        self._cipher = Cipher(_algorithm(spec.family, key[:key_len]), modes.ECB())
        self._essiv = None
        if spec.essiv_key is not None:
            self._essiv = Cipher(_algorithm(spec.essiv_family, spec.essiv_key), modes.ECB())
        self._local = threading.local()  # per-thread scratch arrays
        self._sector_numbers = np.arange(_CHUNK_SECTORS, dtype=np.uint64)
        self._init_extra(key, Cipher, modes)

    def _init_extra(self, key: bytes, cipher_cls, modes) -> None:
        pass

    def __repr__(self) -> str:  # never the key
        return f"<{type(self).__name__} {self._spec.family}>"

    def encrypt(self, sector: int, data, out=None):
        """Ciphertext of whole sectors `data`, the first numbered `sector`:
        a new bytearray, or written into `out` (a writable buffer as long
        as `data`; it may be `data` itself) and `out` returned."""
        return self._run(sector, data, self._encrypt_chunk, out)

    def decrypt(self, sector: int, data, out=None, *, split: bool = True):
        """Plaintext of whole sectors `data` (see encrypt); `split` False
        keeps the work in the calling thread (a caller that reads from
        several threads already keeps the cores busy itself)."""
        return self._run(sector, data, self._decrypt_chunk, out, split)

    def _run(self, sector: int, data, chunk_fn, out, split: bool = True):
        np = self._np
        total = len(memoryview(data).cast("B"))
        if total % SECTOR_SIZE:
            raise ValueError(f"encrypted I/O of {total} bytes is not whole sectors")
        if out is None:
            out = bytearray(total)
        src = np.frombuffer(data, dtype="<u8").reshape(-1, self._blocks, self._words)
        dst = np.frombuffer(out, dtype="<u8", count=src.size).reshape(src.shape)
        firsts = range(0, len(src), _CHUNK_SECTORS)

        def run_chunk(first: int) -> None:
            part = slice(first, first + _CHUNK_SECTORS)
            chunk_fn(sector + first, src[part], dst[part])

        if split and len(firsts) > 1:
            # numpy releases the GIL (cryptography in some versions, see
            # the module's docstring): chunks on every core overlap.
            list(_pool().map(run_chunk, firsts))
        else:
            for first in firsts:
                run_chunk(first)
        return out

    def _scratch(self, name: str, size: int):
        """A uint64 array of `size` words, reused by this thread for `name`
        (fresh temporaries of a MiB each would cost page faults per call)."""
        cache = self._local.__dict__
        buf = cache.get(name)
        if buf is None or buf.size < size:
            buf = cache[name] = self._np.empty(size, dtype="<u8")
        return buf[:size]

    def _context(self, cipher, decrypt: bool):
        """This thread's ECB context of `cipher` (one of this object's):
        ECB keeps no state between whole blocks, so a context serves every
        call (making one costs more than a small call's work)."""
        cache = self._local.__dict__
        key = (id(cipher), decrypt)
        ctx = cache.get(key)
        if ctx is None:
            ctx = cache[key] = cipher.decryptor() if decrypt else cipher.encryptor()
        return ctx

    def _ecb(self, data, *, decrypt: bool = False, cipher=None, into: str | None = None):
        """One ECB pass of the whole array `data` (any shape, contiguous):
        an array of the same shape, new or the scratch array `into`."""
        np = self._np
        ctx = self._context(cipher or self._cipher, decrypt)
        size = data.size + self._words  # update_into's slack
        buf = np.empty(size, dtype="<u8") if into is None else self._scratch(into, size)
        ctx.update_into(_octets(data), _octets(buf))
        return buf[: data.size].reshape(data.shape)

    def _ivs(self, sector: int, n: int):
        """The IVs of sectors sector..sector+n-1, shaped (n, words)."""
        np = self._np
        ivs = self._scratch("ivs", n * self._words).reshape(n, self._words)
        ivs[:, 1:] = 0
        numbers = ivs[:, 0]
        if n > len(self._sector_numbers):
            self._sector_numbers = np.arange(n, dtype=np.uint64)
        numbers[:] = self._sector_numbers[:n]
        numbers += np.uint64(sector)
        if self._spec.ivgen_alg == "plain":
            numbers &= np.uint64(0xFFFFFFFF)
        if self._essiv is not None:
            ivs = self._ecb(ivs, cipher=self._essiv)
        return ivs


class _XTSWork:
    """One thread's arrays and views for XTS chunks of `n` sectors, made
    once: a chunk is then its numpy and ECB calls and little else (the
    Python around a call costs about as much as a small call's work).

    The tweaks are built column by column (the j-th block of every
    sector) in `lo` and `hi`, (blocks, n) arrays of the tweaks' low and
    high words, then transposed into `tweaks`, shaped like the data."""

    def __init__(self, np, n: int, blocks: int):
        u8 = "<u8"
        self.lo = np.empty((blocks, n), dtype=u8)
        self.hi = np.empty((blocks, n), dtype=u8)
        spill = np.empty((blocks // 2, n), dtype=u8)
        spare = np.empty((blocks // 2, n), dtype=u8)
        self.tweaks = np.empty((n, blocks, 2), dtype=u8)
        self.mixed = np.empty((n, blocks, 2), dtype=u8)
        ecb = np.empty(n * blocks * 2 + 2, dtype=u8)  # + update_into's slack
        self.ecb = ecb[: n * blocks * 2].reshape(n, blocks, 2)
        t0 = np.empty(n * 2 + 2, dtype=u8)
        self.t0 = t0[: n * 2].reshape(n, 2)
        self.t0_octets = _octets(t0)
        self.mixed_octets = _octets(self.mixed)
        self.ecb_octets = _octets(ecb)
        lo, hi = self.lo, self.hi
        # Columns [k, 2k) are columns [0, k) times alpha^k, k = 1, 2, 4,
        # 8, 16: five steps, each shift one number for all its columns
        # (1 MiB chunks: 13% faster than columns 1..7 in one step of
        # shifts broadcast from a column of them, then k = 8, 16).
        self.steps = []
        k = 1
        while k < blocks:
            rows = slice(k, 2 * k)
            self.steps.append((lo[:k], hi[:k], lo[rows], hi[rows], k, spill[:k], spare[:k]))
            k *= 2


class _XTS(_Base):
    def _init_extra(self, key: bytes, cipher_cls, modes) -> None:
        self._key2 = cipher_cls(_algorithm(self._spec.family, key[self._key_len :]), modes.ECB())

    def _work(self, n: int) -> _XTSWork:
        """This thread's _XTSWork for chunks of n sectors. Two sizes are
        kept (a full chunk's, and a piece's or a call's last chunk's):
        another size replaces all but the full chunk's."""
        works = self._local.__dict__.setdefault("xts", {})
        work = works.get(n)
        if work is None:
            if len(works) >= 2:
                for other in [k for k in works if k != _CHUNK_SECTORS]:
                    del works[other]
            work = works[n] = _XTSWork(self._np, n, self._blocks)
        return work

    def _xts_chunk(self, sector: int, src, dst, decrypt: bool) -> None:
        """C = E_key1(P ^ T) ^ T (decryption: D_key1), T[s, j] =
        E_key2(IV(s)) * alpha^j.

        The tweak is a little-endian 128-bit number (lo, hi words); times
        alpha^k (k < 64) it is the 128-bit shift left by k with the k bits
        shifted out of hi reduced by x^128 = x^7 + x^2 + x + 1 into lo
        (their carry-less product with 0x87, below 2^(k+8)): five steps
        (_XTSWork), each a few numpy calls over all n sectors."""
        np = self._np
        work = self._work(len(src))
        ivs = self._ivs(sector, len(src))
        self._context(self._key2, False).update_into(_octets(ivs), work.t0_octets)
        lo, hi, t0, tweaks = work.lo, work.hi, work.t0, work.tweaks
        lo[0], hi[0] = t0[:, 0], t0[:, 1]
        for step in work.steps:
            _shift_in(np, *step)
        tweaks[:, :, 0] = lo.T
        tweaks[:, :, 1] = hi.T
        np.bitwise_xor(src, tweaks, out=work.mixed)
        self._context(self._cipher, decrypt).update_into(work.mixed_octets, work.ecb_octets)
        np.bitwise_xor(work.ecb, tweaks, out=dst)

    def _encrypt_chunk(self, sector: int, src, dst) -> None:
        self._xts_chunk(sector, src, dst, False)

    def _decrypt_chunk(self, sector: int, src, dst) -> None:
        self._xts_chunk(sector, src, dst, True)


class _CBC(_Base):
    # Decryption is one `cryptography` stream per run: convert reads it on
    # one thread, not on its readers, which measured slower (AES qcow2 ->
    # raw, 1 GiB: 1.4-2.0 s against 0.8-1.6 s, cryptography 51).
    parallel = False

    def _init_extra(self, key: bytes, cipher_cls, modes) -> None:
        self._stream = (cipher_cls, modes.CBC, _algorithm(self._spec.family, key[: self._key_len]))

    def _encrypt_chunk(self, sector: int, src, dst) -> None:
        # Chaining runs along a sector's blocks: block column j of every
        # sector at once, each column one ECB call, on the chunk transposed
        # to (block, sector, word) so that every column is contiguous. The
        # loop does one XOR and one update_into per column on views made
        # once (per-call overhead, not AES, is what a column costs).
        np = self._np
        n, blocks, words = src.shape
        column_words = n * words
        column_bytes = column_words * 8
        plain = self._scratch("plain", src.size).reshape(blocks, n, words)
        _blocks_of(plain)[...] = _blocks_of(src).T
        plain_octets = memoryview(plain.reshape(-1).view(np.uint8))
        # Each column's ECB output needs update_into's slack: the next
        # column's space, rewritten after; one block more past the last.
        cipher = self._scratch("cipher", src.size + words)
        cipher_octets = memoryview(cipher.view(np.uint8))
        columns = cipher[: src.size].reshape(blocks, n, words)
        update_into = self._context(self._cipher, False).update_into
        xor = np.bitwise_xor
        prev = self._ivs(sector, n)
        for j in range(blocks):
            xor(plain[j], prev, out=plain[j])
            at = j * column_bytes
            update_into(
                plain_octets[at : at + column_bytes],
                cipher_octets[at : at + column_bytes + self._spec.block],
            )
            prev = columns[j]
        _blocks_of(dst)[...] = _blocks_of(columns).T

    def decrypt(self, sector: int, data, out=None, *, split: bool = True):
        """Plaintext of whole sectors `data` (see encrypt), as ONE CBC
        stream over the whole run with the first sector's IV: every block
        but a sector's first then comes out right (its predecessor is the
        ciphertext block before it). A sector's first block, which the
        stream chained to the previous sector's last ciphertext block
        instead of to its own IV, is decrypted again on its own: the
        first ciphertext blocks gathered (a strided numpy step over the
        sectors), one ECB call, XORed with the IVs and put back. One
        `cryptography` call decrypts the run into `out`; in place (`out`
        is `data`), a call per STREAM_PIECE through a small buffer copied
        back. No XOR pass over the data. Always in the calling thread
        (`split` is moot): cut into a piece per core on the pool (1 MiB
        pieces and more, cryptography 51, which releases the GIL), it
        measured slower on this 2-core VM under load, in memory (2 MiB:
        0.37 ms against 0.27; 64 MiB: 21.6 ms against 16.6) and in
        AES qcow2 -> raw (0.3 s more CPU a GiB): the stream runs at
        memory speed (0.13-0.18 s a GiB) and the hand-overs cost more."""
        np = self._np
        src_octets = memoryview(data).cast("B")
        total = len(src_octets)
        if total % SECTOR_SIZE:
            raise ValueError(f"encrypted I/O of {total} bytes is not whole sectors")
        if out is None:
            out = bytearray(total)
        dst_octets = memoryview(out).cast("B")[:total]
        if not total:
            return out
        src = np.frombuffer(src_octets, dtype="<u8").reshape(-1, self._blocks, self._words)
        dst = np.frombuffer(dst_octets, dtype="<u8").reshape(src.shape)
        in_place = np.shares_memory(src, dst)
        if in_place and not _same_start(src, dst):
            dst[...] = src  # overlapping otherwise: decrypted in place in dst
            src, src_octets = dst, dst_octets
        n = len(src)
        # Each sector's first ciphertext block, gathered before an
        # in-place stream overwrites it. The strided column moves as whole
        # blocks (numpy loops over pairs of words several times slower).
        first = self._scratch("first", n * self._words).reshape(n, self._words)
        if n > 1:
            _blocks_of(first[:, None])[:, 0] = _blocks_of(src)[:, 0]
        block = self._spec.block
        cipher_cls, cbc, algorithm = self._stream
        ctx = cipher_cls(algorithm, cbc(bytes(_octets(self._ivs(sector, 1))))).decryptor()
        if in_place:
            self._stream_in_place(ctx, dst_octets)
        else:
            # update_into wants a block of slack past its output, which a
            # caller's buffer need not have: the last block goes through
            # a small buffer, the stream's chaining carried over to it.
            ctx.update_into(src_octets[:-block], dst_octets)
            tail = self._scratch("tail", 2 * self._words)
            tail_octets = _octets(tail)
            ctx.update_into(src_octets[total - block :], tail_octets)
            dst_octets[total - block :] = tail_octets[:block]
        if n > 1:
            plain = self._ecb(first, decrypt=True, into="first_plain")
            plain ^= self._ivs(sector, n)
            _blocks_of(dst)[1:, 0] = _blocks_of(plain[:, None])[1:, 0]
        return out

    def _stream_in_place(self, ctx, octets: memoryview) -> None:
        """`ctx`'s stream over `octets`, written back over them: a piece
        at a time through this thread's small buffer (cryptography 51
        refuses an output that overlaps the input; the context carries
        the chaining from piece to piece, and a piece is overwritten only
        once it has been read)."""
        piece = STREAM_PIECE - STREAM_PIECE % self._spec.block
        out = _octets(self._scratch("stream", piece // 8 + self._words))
        for at in range(0, len(octets), piece):
            n = min(piece, len(octets) - at)
            ctx.update_into(octets[at : at + n], out)
            octets[at : at + n] = out[:n]


class _CTR(_Base):
    def _keystream(self, sector: int, n: int):
        """ECB of the counter blocks IV + j, counted as big-endian integers
        across the whole block (carry from the low word into the high)."""
        np = self._np
        ivs = self._ivs(sector, n).view(">u8")  # the IV bytes as big-endian words
        j = np.arange(self._blocks, dtype=np.uint64)
        counters = np.empty((n, self._blocks, self._words), dtype=">u8")
        low = ivs[:, -1:].astype(np.uint64)
        added = low + j
        counters[:, :, -1] = added
        if self._words == 2:
            carry = (added < low).astype(np.uint64)
            counters[:, :, 0] = ivs[:, :1].astype(np.uint64) + carry
        return self._ecb(counters.view("<u8"))

    def _encrypt_chunk(self, sector: int, src, dst) -> None:
        self._np.bitwise_xor(src, self._keystream(sector, len(src)), out=dst)

    _decrypt_chunk = _encrypt_chunk


class _ECB(_Base):
    def _encrypt_chunk(self, sector: int, src, dst) -> None:
        dst[:] = self._ecb(src)

    def _decrypt_chunk(self, sector: int, src, dst) -> None:
        dst[:] = self._ecb(src, decrypt=True)
