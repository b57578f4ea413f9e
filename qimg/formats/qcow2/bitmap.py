"""Persistent dirty bitmaps (spec: "Bitmaps"): the bitmap directory."""

from __future__ import annotations

from dataclasses import dataclass

from qimg.errors import InvalidImageError
from qimg.formats.qcow2 import layout as L


@dataclass
class BitmapEntry:
    name: str
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data: bytes = b""

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def flag_names(self) -> list[str]:
        names = []
        if self.flags & L.BME_FLAG_IN_USE:
            names.append("in-use")
        if self.flags & L.BME_FLAG_AUTO:
            names.append("auto")
        return names


def read_bitmap_directory(image) -> list[BitmapEntry]:
    """The bitmap directory, bounded by QEMU's limits; [] without bitmaps."""
    h = image.header
    if h.bitmaps_ext is None or not (h.autoclear_features & L.QCOW2_AUTOCLEAR_BITMAPS):
        return []
    nb, size, offset = h.bitmaps_ext
    if nb > L.QCOW2_MAX_BITMAPS:
        raise InvalidImageError("bitmaps_ext: Image has too many bitmaps")
    if size > L.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        raise InvalidImageError("bitmaps_ext: Bitmap directory is too large")
    if offset % image.geo.cluster_size or offset + size > image.storage.size():
        raise InvalidImageError("bitmaps_ext: Invalid bitmap directory offset")
    raw = image.storage.pread(offset, size)
    entries = []
    pos = 0
    for _ in range(nb):
        if pos + L.BITMAP_DIRECTORY_ENTRY.size > size:
            raise InvalidImageError("Bitmap directory is corrupt")
        (table_offset, table_size, flags, btype, gran, name_size, extra_size) = (
            L.BITMAP_DIRECTORY_ENTRY.unpack_from(raw, pos)
        )
        pos += L.BITMAP_DIRECTORY_ENTRY.size
        end = pos + extra_size + name_size
        if end > size or name_size > L.BME_MAX_NAME_SIZE:
            raise InvalidImageError("Bitmap directory is corrupt")
        extra = raw[pos : pos + extra_size]
        name = raw[pos + extra_size : end].decode("utf-8", "replace")
        pos = (end + 7) & ~7
        entries.append(BitmapEntry(name, table_offset, table_size, flags, btype, gran, extra))
    return entries
