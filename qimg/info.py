"""ImageInfo as qemu-img reports it (qapi/block-core.json: ImageInfo)."""

from __future__ import annotations

import contextlib
import os

from qimg.driver import Driver
from qimg.formats.qcow2 import layout as L


def image_info(img: Driver) -> dict:
    """The keys and values of `qemu-img info --output=json` for one image."""
    info: dict = {}
    if img.format_name == "qcow2":
        h = img.header
        # bdrv_query_image_info: the format only beside a backing file name.
        if h.backing_format and h.backing_file:
            info["backing-filename-format"] = h.backing_format
        # QEMU's qcow2_snapshot_list refuses an image whose data lies in an
        # external file: info lists no snapshots there (the incompatible bit).
        snapshots = [] if h.has_data_file else _snapshots(img)
        if snapshots:
            info["snapshots"] = snapshots
    # QEMU counts a raw file's length in whole sectors (refresh_total_sectors
    # rounds up): a 1000-byte file is 1024 bytes to qemu-img, as convert
    # copies it.
    size = img.size if img.format_name in ("qcow2", "qcow") else -(-img.size // 512) * 512
    info["virtual-size"] = size
    info["filename"] = img.filename
    if img.format_name == "qcow2":
        info["cluster-size"] = img.geo.cluster_size
    elif img.format_name == "qcow":
        info["cluster-size"] = img.cluster_size
    info["format"] = img.format_name
    info["actual-size"] = img.storage.allocated_size()
    if img.format_name == "qcow2":
        info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(img)}
    if img.format_name in ("qcow", "qcow2"):
        # qcow (version 1) has no format-specific data and no dirty bit.
        h = img.header
        if h.backing_file:
            from qimg.api import resolve_backing_path

            info["full-backing-filename"] = resolve_backing_path(img.filename, h.backing_file)
        if h.crypt_method:
            info["encrypted"] = True
        if h.backing_file:
            info["backing-filename"] = h.backing_file
    info["dirty-flag"] = img.format_name == "qcow2" and bool(img.header.dirty)
    return info


def describe(
    filename: str, fmt: str | None, *, force_share: bool = False, backing_chain: bool = False
) -> list[dict]:
    """`qemu-img info [--backing-chain]`: each image of the chain opened on its
    own (metadata only, no backing), as collect_image_info_list does, so
    errors name the image that failed and a loop ends with an error."""
    from qimg.api import open_image, resolve_backing_path
    from qimg.errors import BackingChainError, ImageLockedError, QimgError

    infos: list[dict] = []
    seen: set[str] = set()
    seen_real: set[str] = set()
    name: str | None = filename
    while name is not None:
        real = _real_path(name)
        if name in seen or real in seen_real:
            raise BackingChainError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        seen_real.add(real)
        try:
            img = open_image(name, fmt, force_share=force_share, backing=False, data_file=False)
            with _closed_on_error(img):
                if img.format_name == "qcow2" and img.header.crypt_method:
                    _encrypt_info(img)  # qcrypto_block_open's checks, part of the open
        except QimgError as exc:
            # qemu-img doubles the prefix of a failed file open, but a lock
            # conflict comes from the permission update and carries one.
            if not isinstance(exc, ImageLockedError):
                exc.args = (f"Could not open '{name}': {exc}",)
            raise
        with img:
            info = image_info(img)
        infos.append(info)
        if not backing_chain:
            break
        backing = info.get("backing-filename")
        name = resolve_backing_path(name, backing) if backing else None
        # collect_image_info_list: the backing file's format is the one its
        # parent names, else probed (not the format given for the top).
        fmt = info.get("backing-filename-format")
    return infos


def _real_path(name: str) -> str:
    """The real path of the file an image name opens (a json: or file:
    name resolved); the name itself if it cannot be parsed (opening it
    then fails with the parser's message)."""
    from qimg.errors import QimgError
    from qimg.filenames import parse_filename

    try:
        return os.path.realpath(parse_filename(name).path)
    except QimgError:
        return name


@contextlib.contextmanager
def _closed_on_error(img: Driver):
    try:
        yield
    except BaseException:
        img.close()
        raise


def chain_info(img: Driver) -> list[dict]:
    """image_info for the image and each backing file below it."""
    out = []
    node = img
    while node is not None:
        out.append(image_info(node))
        node = node.backing
    return out


def _qcow2_specific(img) -> dict:
    h = img.header
    data: dict = {}
    if h.version < 3:
        data["compat"] = "0.10"
        data["compression-type"] = L.COMPRESSION_TYPE_NAMES[h.compression_type]
        data["refcount-bits"] = h.refcount_bits
        if h.crypt_method:
            data["encrypt"] = _encrypt_info(img)
        return data
    from qimg.formats.qcow2.bitmap import read_bitmap_directory

    data["compat"] = "1.1"
    data["compression-type"] = L.COMPRESSION_TYPE_NAMES[h.compression_type]
    data["lazy-refcounts"] = h.lazy_refcounts
    bitmaps = read_bitmap_directory(img)
    if bitmaps:
        data["bitmaps"] = [
            {"flags": b.flag_names(), "name": b.name, "granularity": b.granularity} for b in bitmaps
        ]
    data["refcount-bits"] = h.refcount_bits
    if h.crypt_method:
        data["encrypt"] = _encrypt_info(img)
    # The name comes from the header extension, whether or not the
    # incompatible bit is set; data-file-raw is reported with the bit.
    if h.data_file is not None:
        data["data-file"] = h.data_file
    if h.has_data_file:
        data["data-file-raw"] = h.data_file_raw
    data["corrupt"] = h.corrupt
    data["extended-l2"] = h.extended_l2
    return data


_U64_MAX = (1 << 64) - 1


def _signed64(value: int) -> int:
    """A uint64 read as C's int64."""
    return value - (1 << 64) if value >> 63 else value


def _snapshots(img) -> list[dict]:
    from qimg.formats.qcow2.snapshot import read_snapshots

    out = []
    for s in read_snapshots(img)[0]:
        entry = {}
        # QEMUSnapshotInfo holds icount and vm_state_size as uint64 and the
        # QAPI SnapshotInfo as int: all ones is "no icount" (the key is
        # omitted), other values wrap to signed.
        if s.icount is not None and s.icount != _U64_MAX:
            entry["icount"] = _signed64(s.icount)
        entry.update(
            {
                "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                "name": s.name,
                "date-sec": s.date_sec,
                "date-nsec": s.date_nsec,
                "vm-clock-sec": s.vm_clock_nsec // 1_000_000_000,
                "id": s.id_str,
                "vm-state-size": _signed64(s.vm_state_size),
            }
        )
        out.append(entry)
    return out


def _encrypt_info(img) -> dict:
    """QCryptoBlockInfo of an encrypted image, in qemu-img's key order:
    legacy AES has none but the format; LUKS is read from the header in
    the crypto header extension (no key needed)."""
    h = img.header
    if h.crypt_method == L.QCOW_CRYPT_AES:
        return {"format": "aes"}
    from qimg.errors import InvalidImageError

    offset, length = h.crypto_ext
    need = L.LUKS_HEADER.size + L.LUKS_NUM_KEY_SLOTS * L.LUKS_KEYSLOT.size
    if length < need:  # qcow2_crypto_hdr_read_func
        raise InvalidImageError("Request for data outside of extension header")
    # Past the end of the file QEMU reads zeros.
    return _luks_info(img.storage.pread(offset, need).ljust(need, b"\0"))


# QEMU 7.2's names (crypto/block-luks.c): cipher name -> usable key sizes.
_LUKS_CIPHERS = {"aes": (16, 24, 32), "cast5": (16,), "serpent": (16, 24, 32)}
_LUKS_CIPHERS.update({"twofish": (16, 24, 32), "sm4": (16,)})
_LUKS_MODES = ("ecb", "cbc", "xts", "ctr")
_LUKS_IVGENS = ("plain", "plain64", "essiv")
_LUKS_HASHES = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48}
_LUKS_HASHES.update({"sha512": 64, "ripemd160": 20})
_LUKS_FAMILY = {"aes": "AES", "cast5": "CAST5", "serpent": "Serpent", "twofish": "Twofish"}
_LUKS_FAMILY["sm4"] = "SM4"
_LUKS_KEY_SLOT_SECTORS = 8  # QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET / 512
_LUKS_STRIPES = 4000


def _luks_info(raw: bytes) -> dict:
    """The LUKS1 header checked as QEMU's qcrypto_block_luks_open checks it
    without a key (check_header, then parse_header), in its order and words."""
    from qimg.errors import InvalidImageError as Bad

    fields = L.LUKS_HEADER.unpack_from(raw)
    (magic, version, cipher_raw, mode_raw, hash_raw, payload, key_bytes) = fields[:7]
    mk_iters, uuid_raw = fields[9], fields[10]
    if magic != L.LUKS_MAGIC:
        raise Bad("Volume is not in LUKS format")
    if version != 1:
        raise Bad(f"LUKS version {version} is not supported")
    for value, what in ((cipher_raw, "cipher name"), (mode_raw, "cipher mode")):
        if b"\0" not in value:
            raise Bad(f"LUKS header {what} is not NUL terminated")
    if b"\0" not in hash_raw:
        raise Bad("LUKS header hash spec is not NUL terminated")
    if payload < _LUKS_KEY_SLOT_SECTORS:
        raise Bad("LUKS payload is overlapping with the header")
    if mk_iters == 0:
        raise Bad("LUKS key iteration count is zero")
    slots = [
        L.LUKS_KEYSLOT.unpack_from(raw, L.LUKS_HEADER.size + i * L.LUKS_KEYSLOT.size)
        for i in range(L.LUKS_NUM_KEY_SLOTS)
    ]
    _luks_check_slots(slots, key_bytes, payload)
    cipher, mode_spec, hash_spec = (_c_str(v) for v in (cipher_raw, mode_raw, hash_raw))
    mode, dash, ivgen = mode_spec.partition("-")
    if not dash:
        raise Bad(f"Unexpected cipher mode string format '{mode_spec}'")
    ivgen, colon, ivgen_hash = ivgen.partition(":")
    if colon and ivgen_hash not in _LUKS_HASHES:
        raise Bad(f"Hash algorithm '{ivgen_hash}' not supported")
    if mode not in _LUKS_MODES:
        raise Bad(f"Cipher mode '{mode}' not supported")
    # XTS keys hold two cipher keys (qcrypto_block_luks_cipher_name_lookup).
    cipher_key = key_bytes // 2 if mode == "xts" else key_bytes
    if cipher_key not in _LUKS_CIPHERS.get(cipher, ()):
        raise Bad(f"Algorithm '{cipher}' with key size {cipher_key} bytes not supported")
    if hash_spec not in _LUKS_HASHES:
        raise Bad(f"Hash algorithm '{hash_spec}' not supported")
    if ivgen not in _LUKS_IVGENS:
        raise Bad(f"IV generator '{ivgen}' not supported")
    if ivgen == "essiv":
        if not colon:
            raise Bad("Missing IV generator hash specification")
        digest = _LUKS_HASHES[ivgen_hash]
        if digest not in _LUKS_CIPHERS[cipher]:
            raise Bad(f"No {_LUKS_FAMILY[cipher]} cipher with key size {digest} available")
    out: dict = {"ivgen-alg": ivgen, "hash-alg": hash_spec}
    out["cipher-alg"] = f"{cipher}-{cipher_key * 8}"
    out["uuid"] = _c_str(uuid_raw)
    if ivgen == "essiv":  # the hash is ignored by the other generators
        out["ivgen-hash-alg"] = ivgen_hash
    out.update({"format": "luks", "cipher-mode": mode})
    out["slots"] = [_luks_slot(slot) for slot in slots]
    out["payload-offset"] = payload * L.BDRV_SECTOR_SIZE
    out["master-key-iters"] = mk_iters
    return out


def _luks_check_slots(slots: list[tuple], key_bytes: int, payload: int) -> None:
    """qcrypto_block_luks_check_header's key slot checks."""
    from qimg.errors import InvalidImageError as Bad

    def extent(slot) -> tuple[int, int]:
        sectors = -(-key_bytes * slot[4] // L.BDRV_SECTOR_SIZE)
        return slot[3], -(-sectors // _LUKS_KEY_SLOT_SECTORS) * _LUKS_KEY_SLOT_SECTORS

    for i, slot in enumerate(slots):
        active, iters, _salt, _key_offset, stripes = slot
        if stripes != _LUKS_STRIPES:
            raise Bad(f"Keyslot {i} is corrupted (stripes {stripes} != {_LUKS_STRIPES})")
        if active not in (L.LUKS_KEY_SLOT_ENABLED, L.LUKS_KEY_SLOT_DISABLED):
            raise Bad(f"Keyslot {i} state (active/disable) is corrupted")
        if active == L.LUKS_KEY_SLOT_ENABLED and iters == 0:
            raise Bad(f"Keyslot {i} iteration count is zero")
        start, length = extent(slot)
        if start < _LUKS_KEY_SLOT_SECTORS:
            raise Bad(f"Keyslot {i} is overlapping with the LUKS header")
        if start + length > payload:
            raise Bad(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, len(slots)):
            start2, length2 = extent(slots[j])
            if start < start2 + length2 and start2 < start + length:
                raise Bad(f"Keyslots {i} and {j} are overlapping in the header")


def _luks_slot(slot: tuple) -> dict:
    active, iters, _salt, key_offset, stripes = slot
    out: dict = {"active": active == L.LUKS_KEY_SLOT_ENABLED}
    if out["active"]:
        out["iters"] = iters
    out["key-offset"] = key_offset * L.BDRV_SECTOR_SIZE
    if out["active"]:
        out["stripes"] = stripes
    return out


def _c_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")
