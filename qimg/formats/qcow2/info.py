"""What `qemu-img info` reports of a qcow2 image: QEMU's qcow2_get_info,
qcow2_get_specific_info and qcow2_snapshot_list, as QAPI values."""

from __future__ import annotations

from qimg.driver import DriverInfo
from qimg.formats.qcow2 import layout as L


def qcow2_info(img) -> DriverInfo:
    """The DriverInfo of an open Qcow2Image."""
    h = img.header
    # QEMU's qcow2_snapshot_list refuses an image whose data lies in an
    # external file: info lists no snapshots there (the incompatible bit).
    snapshots = [] if h.has_data_file else _snapshots(img)
    return DriverInfo(
        virtual_size=img.size,
        actual_size=img.storage.allocated_size(),
        cluster_size=img.geo.cluster_size,
        backing_file=h.backing_file or None,
        backing_format=h.backing_format,
        encrypted=bool(h.crypt_method),
        dirty=bool(h.dirty),
        snapshots=snapshots,
        format_specific={"type": "qcow2", "data": _qcow2_specific(img)},
    )


def _qcow2_specific(img) -> dict:
    h = img.header
    data: dict = {}
    if h.version < 3:
        data["compat"] = "0.10"
        data["compression-type"] = L.COMPRESSION_TYPE_NAMES[h.compression_type]
        data["refcount-bits"] = h.refcount_bits
        if h.crypt_method:
            data["encrypt"] = encrypt_info(img)
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
        data["encrypt"] = encrypt_info(img)
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


def encrypt_info(img) -> dict:
    """QCryptoBlockInfo of an encrypted image, in qemu-img's key order:
    legacy AES has none but the format; LUKS is read from the header in
    the crypto header extension (no key needed)."""
    h = img.header
    if h.crypt_method == L.QCOW_CRYPT_AES:
        return {"format": "aes"}
    from qimg.crypto.luks1 import HEADER_SIZE, header_info
    from qimg.errors import InvalidImageError

    offset, length = h.crypto_ext
    if length < HEADER_SIZE:  # qcow2_crypto_hdr_read_func
        raise InvalidImageError("Request for data outside of extension header")
    # Past the end of the file QEMU reads zeros.
    return header_info(img.storage.pread(offset, HEADER_SIZE))
