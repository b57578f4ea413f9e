"""ImageInfo as qemu-img reports it (qapi/block-core.json: ImageInfo)."""

from __future__ import annotations

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
    size = img.size if img.format_name == "qcow2" else -(-img.size // 512) * 512
    info["virtual-size"] = size
    info["filename"] = img.filename
    if img.format_name == "qcow2":
        info["cluster-size"] = img.geo.cluster_size
    info["format"] = img.format_name
    info["actual-size"] = img.storage.allocated_size()
    if img.format_name == "qcow2":
        info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(img)}
        if h.backing_file:
            from qimg.api import resolve_backing_path

            info["full-backing-filename"] = resolve_backing_path(img.filename, h.backing_file)
        if h.crypt_method:
            info["encrypted"] = True
        if h.backing_file:
            info["backing-filename"] = h.backing_file
        info["dirty-flag"] = h.dirty
    else:
        info["dirty-flag"] = False
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
        real = os.path.realpath(name)
        if name in seen or real in seen_real:
            raise BackingChainError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        seen_real.add(real)
        try:
            img = open_image(name, fmt, force_share=force_share, backing=False, data_file=False)
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
        fmt = info.get("backing-filename-format", fmt)
    return infos


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
    raw = img.storage.pread(offset, min(length, need)) if length else b""
    if len(raw) < need or not raw.startswith(L.LUKS_MAGIC):
        raise InvalidImageError("Volume is not in LUKS format")
    (_magic, _version, cipher, mode, hash_spec, payload, key_bytes, _d, _s, mk_iters, uuid) = (
        L.LUKS_HEADER.unpack_from(raw)
    )
    cipher, mode, hash_spec, uuid = (_c_str(v) for v in (cipher, mode, hash_spec, uuid))
    mode, _, ivgen = mode.partition("-")
    ivgen, _, ivgen_hash = ivgen.partition(":")
    # XTS keys hold two cipher keys (qcrypto_block_luks_cipher_name_lookup).
    key_bits = key_bytes * 8 // (2 if mode == "xts" else 1)
    out: dict = {"ivgen-alg": ivgen, "hash-alg": hash_spec, "cipher-alg": f"{cipher}-{key_bits}"}
    out["uuid"] = uuid
    if ivgen_hash:
        out["ivgen-hash-alg"] = ivgen_hash
    out.update({"format": "luks", "cipher-mode": mode})
    slots = []
    for i in range(L.LUKS_NUM_KEY_SLOTS):
        active, iters, _salt, key_offset, stripes = L.LUKS_KEYSLOT.unpack_from(
            raw, L.LUKS_HEADER.size + i * L.LUKS_KEYSLOT.size
        )
        slot: dict = {"active": active == L.LUKS_KEY_SLOT_ENABLED}
        if slot["active"]:
            slot["iters"] = iters
        slot["key-offset"] = key_offset * L.BDRV_SECTOR_SIZE
        if slot["active"]:
            slot["stripes"] = stripes
        slots.append(slot)
    out["slots"] = slots
    out["payload-offset"] = payload * L.BDRV_SECTOR_SIZE
    out["master-key-iters"] = mk_iters
    return out


def _c_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")
