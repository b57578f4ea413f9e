"""Persistent dirty bitmaps (spec: "Bitmaps"; QEMU's block/qcow2-bitmap.c).

- `check_extension` (header parsing) and `open_bitmaps` (every open): the
  extension, directory and tables checked as QEMU 7.2 loads them on open, in
  its words; an image it would refuse is refused whatever the command.
- `read_bitmap_directory`: the directory as it is on disk (info, check).
- `load_bitmap`: the bits of one bitmap, as QEMU loads them.
- `PersistentBitmaps`: the bitmaps of an image open read-write. Guest writes
  mark enabled (auto) bitmaps dirty; on close they are stored back.
- `bitmaps_to_copy` / `copy_bitmaps`: `convert --bitmaps`.

Bits in memory: a numpy uint8 array, one bit per granule, granule i at byte
i // 8, bit i % 8 (LSB first): QEMU serializes its bitmaps as little-endian
64-bit words, which is the same order. Bits past the last granule are zero.

Crash safety, as QEMU keeps it: before the first write that a bitmap must
record, the bitmap is flagged in-use on disk (an in-use bitmap is
inconsistent: nobody trusts its bits). Storing writes the bitmap data and
tables to new clusters, flushes, writes a new directory, flushes, then points
the header at it (with the autoclear bit) and flushes; only then are the old
directory, tables and data freed. A crash in between leaks clusters at worst.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qimg.errors import BadOptionError, InvalidImageError, QimgError, warn
from qimg.formats.qcow2 import layout as L

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BitmapEntry",
    "Bitmap",
    "PersistentBitmaps",
    "read_bitmap_directory",
    "load_bitmap",
    "load_bitmaps",
    "bitmaps_of",
    "bitmaps_to_copy",
    "copy_bitmaps",
]


_FLAGS_OFFSET = 12  # of `flags` in BITMAP_DIRECTORY_ENTRY (>QIIBBHI)


@dataclass
class BitmapEntry:
    name: str
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data: bytes = b""
    name_size: int | None = None  # as on disk, where a NUL ends the name early

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


@dataclass
class Bitmap:
    """A bitmap in memory: what `convert --bitmaps` copies."""

    name: str
    granularity_bits: int
    enabled: bool  # BME_FLAG_AUTO: tracks writes
    bits: np.ndarray | None  # None: inconsistent (found in-use), data not loaded
    size: int  # guest bytes covered

    @property
    def inconsistent(self) -> bool:
        return self.bits is None


# QEMU 7.2 knows flags in-use and auto only: bit 2 (the spec's
# extra_data_compatible) is reserved to it, like every other bit.
_RESERVED_FLAGS = 0xFFFFFFFF & ~(L.BME_FLAG_IN_USE | L.BME_FLAG_AUTO)


def check_extension(header, nb: int, reserved: int, dir_size: int, dir_offset: int) -> None:
    """QEMU's checks of the bitmaps extension (qcow2_read_extensions), in its
    order. Without the autoclear bit the extension is ignored (open_bitmaps warns)."""
    if not header.autoclear_features & L.QCOW2_AUTOCLEAR_BITMAPS:
        return
    if reserved:
        raise InvalidImageError("bitmaps_ext: Reserved field is not zero")
    if nb > L.QCOW2_MAX_BITMAPS:
        raise InvalidImageError(
            f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum "
            f"of {L.QCOW2_MAX_BITMAPS}"
        )
    if nb == 0:
        raise InvalidImageError("found bitmaps extension with zero bitmaps")
    if dir_offset % (1 << header.cluster_bits):
        raise InvalidImageError("bitmaps_ext: invalid bitmap directory offset")
    if dir_size > L.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        raise InvalidImageError(
            f"bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum supported "
            f"size ({L.QCOW2_MAX_BITMAP_DIRECTORY_SIZE})"
        )


def has_bitmaps(image) -> bool:
    """Whether QEMU reads the image's bitmaps: an extension, and the
    autoclear bit saying no program unaware of them wrote the image since."""
    h = image.header
    return h.bitmaps_ext is not None and bool(h.autoclear_features & L.QCOW2_AUTOCLEAR_BITMAPS)


def read_bitmap_directory(image) -> list[BitmapEntry]:
    """The bitmap directory, checked as QEMU's bitmap_list_load checks it
    (every entry, in order; then the count); [] without bitmaps."""
    if not has_bitmaps(image):
        return []
    nb, size, offset = image.header.bitmaps_ext
    if size == 0:
        raise InvalidImageError("Requested bitmap directory size is zero")
    raw = pread_padded(image, offset, size)
    entries = []
    pos = 0
    while pos < size:
        if pos + L.BITMAP_DIRECTORY_ENTRY.size > size:
            raise InvalidImageError("Broken bitmap directory")
        if len(entries) == nb:
            raise InvalidImageError("More bitmaps found than specified in header extension")
        e, end = _parse_entry(raw, pos)
        if end > size:
            raise InvalidImageError("Broken bitmap directory")
        if e.extra_data:
            raise InvalidImageError("Bitmap extra data is not supported")
        _check_dir_entry(image, e)
        entries.append(e)
        pos = end
    if len(entries) != nb:
        raise InvalidImageError("Less bitmaps found than specified in header extension")
    return entries


def _parse_entry(raw: bytes, pos: int) -> tuple[BitmapEntry, int]:
    """The entry at `pos` and where the next one starts (8-byte aligned);
    the name ends at its first NUL, as QEMU copies it (g_strndup)."""
    (table_offset, table_size, flags, btype, gran, name_size, extra_size) = (
        L.BITMAP_DIRECTORY_ENTRY.unpack_from(raw, pos)
    )
    start = pos + L.BITMAP_DIRECTORY_ENTRY.size
    extra = raw[start : start + extra_size]
    name = raw[start + extra_size : start + extra_size + name_size].split(b"\0", 1)[0]
    end = (start + extra_size + name_size + 7) & ~7
    name = name.decode("utf-8", "replace")
    return BitmapEntry(name, table_offset, table_size, flags, btype, gran, extra, name_size), end


def _entry_spans(raw: bytes, nb: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of each of the `nb` directory entries in `raw` (a
    directory read_bitmap_directory accepted)."""
    spans = []
    pos = 0
    for _ in range(nb):
        _e, end = _parse_entry(raw, pos)
        spans.append((pos, end))
        pos = end
    return spans


# --- geometry -----------------------------------------------------------------------


def _granules(size: int, granularity_bits: int) -> int:
    return (size + (1 << granularity_bits) - 1) >> granularity_bits


def _bitmap_bytes(size: int, granularity_bits: int) -> int:
    """Bytes of bits for a guest of `size` bytes (QEMU's get_bitmap_bytes_needed)."""
    return (_granules(size, granularity_bits) + 7) >> 3


def _table_size(size: int, granularity_bits: int, cluster_size: int) -> int:
    """Bitmap table entries: one per cluster of bits."""
    return -(-_bitmap_bytes(size, granularity_bits) // cluster_size)


def _dir_entry_size(name: bytes, extra: bytes) -> int:
    return (L.BITMAP_DIRECTORY_ENTRY.size + len(name) + len(extra) + 7) & ~7


# --- loading ------------------------------------------------------------------------


def _check_dir_entry(image, e: BitmapEntry) -> None:
    """QEMU's check_dir_entry. An in-use bitmap may be too small for the
    image (it was not stored after a resize): nobody reads its bits."""
    cs = image.geo.cluster_size
    bad = (
        e.table_size == 0
        or e.table_offset == 0
        or e.table_offset % cs
        or e.table_size > L.BME_MAX_TABLE_SIZE
        or not L.BME_MIN_GRANULARITY_BITS <= e.granularity_bits <= L.BME_MAX_GRANULARITY_BITS
        or e.flags & _RESERVED_FLAGS
        or _name_size(e) > L.BME_MAX_NAME_SIZE
        or e.type != L.BT_DIRTY_TRACKING
    )
    phys = e.table_size * cs
    if not bad and phys > L.BME_MAX_PHYS_SIZE:
        bad = True
    if not bad and not e.flags & L.BME_FLAG_IN_USE:
        bad = image.size > (phys * 8) << e.granularity_bits
    if bad:
        raise InvalidImageError(f"Bitmap '{e.name}' doesn't satisfy the constraints")


def _name_size(e: BitmapEntry) -> int:
    return len(e.name.encode()) if e.name_size is None else e.name_size


def pread_padded(image, offset: int, length: int) -> bytes:
    """Bytes at offset; past the end of the file they read as zeros (as QEMU's file driver)."""
    data = image.storage.pread(offset, length)
    return data if len(data) == length else data.ljust(length, b"\0")


def read_bitmap_table(image, e: BitmapEntry) -> np.ndarray:
    """The bitmap table of `e` as stored (uint64), unchecked; past the end of
    the file it reads as zeros."""
    import numpy as np

    raw = pread_padded(image, e.table_offset, e.table_size * L.BME_TABLE_ENTRY_SIZE)
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def invalid_table_entries(table: np.ndarray, cluster_size: int) -> np.ndarray:
    """Mask of the bitmap table entries QEMU's bitmap_table_load refuses:
    reserved bits, or a data cluster that is unaligned or also "all ones"."""
    import numpy as np

    offsets = table_data_offsets(table)
    bad = (table & np.uint64(L.BME_TABLE_ENTRY_RESERVED_MASK)) != 0
    bad |= (offsets != 0) & ((table & np.uint64(L.BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0)
    bad |= offsets % np.uint64(cluster_size) != 0
    return bad


def table_data_offsets(table: np.ndarray) -> np.ndarray:
    """Host offset of each entry's data cluster (0: none)."""
    import numpy as np

    return table & np.uint64(L.BME_TABLE_ENTRY_OFFSET_MASK)


def mark_all_ones(image, e: BitmapEntry, table: np.ndarray, lost: np.ndarray) -> np.ndarray:
    """Entries `lost` (a mask) of `e`'s table become "all ones" (every
    granule dirty: safe for incremental backups); the table is written in
    place and the new one returned."""
    table = table.copy()
    table[lost] = L.BME_TABLE_ENTRY_FLAG_ALL_ONES
    image.write_metadata(e.table_offset, table.astype(">u8").tobytes(), "bitmap-table")
    image.flush_file()
    return table


def load_bitmap_table(image, e: BitmapEntry) -> np.ndarray:
    """The bitmap table of `e` (uint64), each entry checked (QEMU's bitmap_table_load)."""
    table = read_bitmap_table(image, e)
    if invalid_table_entries(table, image.geo.cluster_size).any():
        raise InvalidImageError(
            f"Could not read bitmap_table table from image for bitmap '{e.name}': Invalid argument"
        )
    return table


def _check_table_size(image, e: BitmapEntry, table: np.ndarray) -> None:
    """QEMU's load_bitmap_data: one table entry per cluster of bits."""
    if len(table) != _table_size(image.size, e.granularity_bits, image.geo.cluster_size):
        raise InvalidImageError(f"Could not read bitmap '{e.name}' from image: Invalid argument")


def load_bitmap(image, e: BitmapEntry, table: np.ndarray | None = None) -> np.ndarray:
    """The bits of a consistent bitmap (QEMU's load_bitmap_data)."""
    import numpy as np

    cs = image.geo.cluster_size
    if table is None:
        table = load_bitmap_table(image, e)
    _check_table_size(image, e, table)
    bits = np.zeros(len(table) * cs, dtype=np.uint8)
    offsets = table & np.uint64(L.BME_TABLE_ENTRY_OFFSET_MASK)
    ones = (offsets == 0) & ((table & np.uint64(L.BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0)
    for i in np.flatnonzero(ones):
        bits[i * cs : (i + 1) * cs] = 0xFF
    for i in np.flatnonzero(offsets):
        raw = pread_padded(image, int(offsets[i]), cs)
        bits[i * cs : (i + 1) * cs] = np.frombuffer(raw, dtype=np.uint8)
    return _trimmed(bits, image.size, e.granularity_bits)


def _trimmed(bits: np.ndarray, size: int, granularity_bits: int) -> np.ndarray:
    """`bits` cut to the guest size, bits past the last granule cleared."""
    n = _granules(size, granularity_bits)
    out = bits[: (n + 7) >> 3].copy()
    if n & 7:
        out[-1] &= (1 << (n & 7)) - 1
    return out


def _resized(bits: np.ndarray, size: int, granularity_bits: int) -> np.ndarray:
    """`bits` for a guest of `size` bytes: cut (as _trimmed) or zero-extended."""
    import numpy as np

    need = _bitmap_bytes(size, granularity_bits)
    if need <= len(bits):
        return _trimmed(bits, size, granularity_bits)
    out = np.zeros(need, dtype=np.uint8)
    out[: len(bits)] = bits
    return out


def _validated_directory(image) -> list[BitmapEntry]:
    """The directory, after every check QEMU makes as it loads the bitmaps on
    open (qcow2_load_dirty_bitmaps): names are unique, but an in-use bitmap
    named like one loaded before it is skipped; a consistent bitmap's table
    is readable and of the size the image needs."""
    entries = read_bitmap_directory(image)
    names = set()
    consistent = []  # in order, up to the first duplicate name
    duplicate = None
    for e in entries:
        in_use = e.flags & L.BME_FLAG_IN_USE
        if e.name in names:
            if in_use:
                continue
            duplicate = e
            break
        names.add(e.name)
        if not in_use:
            consistent.append(e)
    _check_tables(image, consistent)
    if duplicate is not None:
        raise InvalidImageError(f"Bitmap already exists: {duplicate.name}")
    return entries


# Most bytes of bitmap tables one read takes when tables are checked in bulk.
_TABLES_READ_LIMIT = 16 << 20


def _check_tables(image, entries: list[BitmapEntry]) -> None:
    """load_bitmap_table and _check_table_size for each of `entries`, in
    order (the first failure raises), with the tables read in runs of
    neighbours and checked in one pass: an image may hold 65535 bitmaps."""
    import numpy as np

    if not entries:
        return
    cs = image.geo.cluster_size
    sizes = np.array([e.table_size for e in entries], dtype=np.int64)
    expected = np.array(
        [_table_size(image.size, e.granularity_bits, cs) for e in entries], dtype=np.int64
    )
    try:
        failing = _bad_tables(image, entries) | (sizes != expected)
    except QimgError:
        failing = np.ones(len(entries), dtype=bool)  # a read QEMU refuses: entry by entry
    for i in np.flatnonzero(failing):
        e = entries[int(i)]
        _check_table_size(image, e, load_bitmap_table(image, e))  # raises the message


def _bad_tables(image, entries: list[BitmapEntry]) -> np.ndarray:
    """For each entry, whether its table holds an entry QEMU refuses (see
    load_bitmap_table); tables that lie near each other are read at once."""
    import numpy as np

    offsets = np.array([e.table_offset for e in entries], dtype=np.int64)
    lengths = np.array([e.table_size for e in entries], dtype=np.int64) * L.BME_TABLE_ENTRY_SIZE
    bad = np.zeros(len(entries), dtype=bool)
    order = np.argsort(offsets, kind="stable")
    ends = offsets[order] + lengths[order]
    # A new read starts where a table begins more than a cluster past the
    # furthest end so far, or where the read would pass the limit.
    reach = np.maximum.accumulate(ends)
    gap = offsets[order][1:] > reach[:-1] + image.geo.cluster_size
    cuts = [0]
    start = 0
    for k in np.flatnonzero(gap).tolist() + [len(order) - 1]:
        k += 1
        while start < k:  # split runs past the limit
            stop = start + 1
            lo = int(offsets[order[start]])
            while stop < k and int(reach[stop]) - lo <= _TABLES_READ_LIMIT:
                stop += 1
            cuts.append(stop)
            start = stop
    # Table offsets are cluster aligned (read_bitmap_directory checked them).
    cs_mask = np.uint64(image.geo.cluster_size - 1)
    for a, b in zip(cuts[:-1], cuts[1:]):
        idx = order[a:b]
        lo = int(offsets[idx[0]])
        raw = pread_padded(image, lo, int(reach[b - 1]) - lo)
        table = np.frombuffer(raw[: len(raw) // 8 * 8], dtype=">u8").astype(np.uint64)
        off = table & np.uint64(L.BME_TABLE_ENTRY_OFFSET_MASK)
        wrong = (table & np.uint64(L.BME_TABLE_ENTRY_RESERVED_MASK)) != 0
        wrong |= (off != 0) & ((table & np.uint64(L.BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0)
        wrong |= (off & cs_mask) != 0
        counts = np.concatenate(([0], np.cumsum(wrong, dtype=np.int64)))
        first = (offsets[idx] - lo) // 8
        bad[idx] = counts[first + lengths[idx] // 8] != counts[first]
    return bad


def _loaded(entries: list[BitmapEntry]) -> list[BitmapEntry]:
    """The entries QEMU makes bitmaps of: not an in-use one named like an
    earlier one (see _validated_directory)."""
    names: set[str] = set()
    out = []
    for e in entries:
        if e.name not in names:
            out.append(e)
        names.add(e.name)
    return out


def open_bitmaps(image) -> None:
    """What opening a qcow2 image does with its bitmaps in QEMU: refuse it
    where they cannot be loaded; warn where the extension is ignored."""
    h = image.header
    if h.bitmaps_ext is None:
        return
    if has_bitmaps(image):
        _validated_directory(image)
    elif h.version < 3:
        warn(
            "This qcow2 v2 image contains bitmaps, but they may have been modified by a "
            "program without persistent bitmap support; so now they must all be considered "
            "inconsistent\nSome clusters may be leaked, run 'qemu-img check -r' on the image "
            "file to fix."
        )
    else:
        warn(
            "a program lacking bitmap support modified this file, so all bitmaps are now "
            "considered inconsistent\nSome clusters may be leaked, run 'qemu-img check -r' "
            "on the image file to fix."
        )


def load_bitmaps(image) -> list[Bitmap]:
    """Every persistent bitmap, in directory order, as QEMU loads them: a
    bitmap found in-use is inconsistent and its data is not read."""
    out = []
    for e in _loaded(_validated_directory(image)):
        in_use = bool(e.flags & L.BME_FLAG_IN_USE)
        bits = None if in_use else load_bitmap(image, e)
        out.append(
            Bitmap(e.name, e.granularity_bits, bool(e.flags & L.BME_FLAG_AUTO), bits, image.size)
        )
    return out


# --- marking ------------------------------------------------------------------------


def set_bits(bits: np.ndarray, start: int, end: int) -> None:
    """Set bits [start, end) of an LSB-first bit array (no loop per bit)."""
    if end <= start:
        return
    b0, b1 = start >> 3, (end - 1) >> 3
    head = (0xFF << (start & 7)) & 0xFF
    tail = (1 << (((end - 1) & 7) + 1)) - 1
    if b0 == b1:
        bits[b0] |= head & tail
        return
    bits[b0] |= head
    bits[b0 + 1 : b1] = 0xFF
    bits[b1] |= tail


def _mark(bits: np.ndarray, granularity_bits: int, offset: int, length: int) -> None:
    g0 = offset >> granularity_bits
    g1 = (offset + length + (1 << granularity_bits) - 1) >> granularity_bits
    set_bits(bits, g0, min(g1, len(bits) * 8))


# --- the bitmaps of an image open read-write -----------------------------------------


class PersistentBitmaps:
    """The persistent bitmaps of a writable qcow2 image (one per image, made
    on first use by Qcow2Image's write hook or by `bitmaps_of`).

    Enabled bitmaps start tracking on the first guest write: they are loaded
    and flagged in-use on disk before that write lands. `store()` (on close)
    writes every tracked or added bitmap back and clears the flag.
    """

    def __init__(self, image):
        self.image = image
        self.entries: list[BitmapEntry] = read_bitmap_directory(image)
        # entry index -> (bits, old table); None until tracking starts.
        self._tracked: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
        self._live: list[tuple[np.ndarray, int]] = []  # (bits, granularity_bits) marked by writes
        self.added: list[Bitmap] = []

    # -- tracking --

    def mark_dirty(self, offset: int, length: int) -> None:
        """Guest range [offset, offset + length) is about to be written."""
        if self._tracked is None:
            self._start_tracking()
        for bits, gb in self._live:
            _mark(bits, gb, offset, length)

    def _start_tracking(self) -> None:
        """Load the enabled, consistent bitmaps and flag them in-use on disk
        (durably) before any write they must record (QEMU does this on open)."""
        image = self.image
        tracked = {}
        if self.entries:
            self.entries = _validated_directory(image)
            for i, e in enumerate(self.entries):
                if e.flags & L.BME_FLAG_AUTO and not e.flags & L.BME_FLAG_IN_USE:
                    table = load_bitmap_table(image, e)
                    tracked[i] = (load_bitmap(image, e, table), table)
        if tracked:
            self._write_flags_in_place(
                {i: self.entries[i].flags | L.BME_FLAG_IN_USE for i in tracked}
            )
        self._tracked = tracked
        self._live = [(bits, self.entries[i].granularity_bits) for i, (bits, _t) in tracked.items()]
        self._live += [(bm.bits, bm.granularity_bits) for bm in self.added if bm.enabled]

    def _write_flags_in_place(self, flags: dict[int, int]) -> None:
        """Rewrite the directory where it is with new flags (only 4-byte flag
        fields change, so a torn write still leaves a valid directory)."""
        image = self.image
        nb, size, offset = image.header.bitmaps_ext
        raw = bytearray(image.storage.pread(offset, size))
        spans = _entry_spans(raw, nb, size)
        for i, value in flags.items():
            pos = spans[i][0] + _FLAGS_OFFSET
            raw[pos : pos + 4] = value.to_bytes(4, "big")
            self.entries[i].flags = value
        image.write_metadata(offset, bytes(raw), "bitmap-directory")
        image.flush_file()

    # -- resizing --

    def truncate(self, new_size: int) -> None:
        """Make every bitmap cover a guest of `new_size` bytes (QEMU's
        qcow2_truncate_bitmaps_check, then bdrv_dirty_bitmap_truncate): an
        in-use (inconsistent) one refuses the resize, with nothing written;
        bits past the new end go, new bits are clear. Called before the
        image's size changes; `store()` writes all of them back then."""
        image = self.image
        tracked = self._tracked or {}
        loaded = {id(e) for e in _loaded(self.entries)}
        for i, e in enumerate(self.entries):
            if id(e) in loaded and e.flags & L.BME_FLAG_IN_USE and i not in tracked:
                raise QimgError(
                    f"Bitmap '{e.name}' is inconsistent and cannot be used\n"
                    "Try block-dirty-bitmap-remove to delete this bitmap from disk"
                )
        if self._tracked is None:
            self._start_tracking()
        loaded = {id(e) for e in _loaded(self.entries)}
        for i, e in enumerate(self.entries):
            if i not in self._tracked and id(e) in loaded:  # disabled ones too
                table = load_bitmap_table(image, e)
                self._tracked[i] = (load_bitmap(image, e, table), table)
        self._tracked = {
            i: (_resized(bits, new_size, self.entries[i].granularity_bits), table)
            for i, (bits, table) in self._tracked.items()
        }
        for bm in self.added:
            bm.bits = _resized(bm.bits, new_size, bm.granularity_bits)
            bm.size = new_size
        enabled = [i for i in self._tracked if self.entries[i].flags & L.BME_FLAG_AUTO]
        self._live = [(self._tracked[i][0], self.entries[i].granularity_bits) for i in enabled]
        self._live += [(bm.bits, bm.granularity_bits) for bm in self.added if bm.enabled]

    # -- adding (convert --bitmaps) --

    def add(self, bm: Bitmap) -> None:
        """A new persistent bitmap with the contents of `bm`, stored on close
        (QEMU's block-dirty-bitmap-add with persistent=on, then a merge)."""
        image = self.image
        name = bm.name
        if not name:  # QEMU's block-dirty-bitmap-add (an image may hold such a name)
            raise QimgError(f"Failed to create bitmap {name}: Bitmap name cannot be empty")
        if any(e.name == name for e in self.entries) or any(b.name == name for b in self.added):
            raise QimgError(f"Failed to create bitmap {name}: Bitmap already exists: {name}")
        reason = self._cannot_store(bm)
        if reason:
            raise QimgError(
                f"Failed to create bitmap {name}: Can't make bitmap '{name}' persistent in "
                f"'{image.filename}': {reason}"
            )
        if bm.size != image.size:
            raise QimgError(
                f"Failed to populate bitmap {name}: Bitmaps are of different sizes (destination "
                f"size is {image.size}, source size is {bm.size}) and can't be merged"
            )
        copy = Bitmap(name, bm.granularity_bits, bm.enabled, bm.bits.copy(), image.size)
        self.added.append(copy)
        if copy.enabled and self._tracked is not None:
            self._live.append((copy.bits, copy.granularity_bits))

    def _cannot_store(self, bm: Bitmap) -> str | None:
        """QEMU's qcow2_co_can_store_new_dirty_bitmap and check_constraints_on_bitmap."""
        dir_size = sum(_dir_entry_size(e.name.encode(), e.extra_data) for e in self.entries)
        dir_size += sum(_dir_entry_size(b.name.encode(), b"") for b in self.added)
        return storing_refused(
            self.image, bm.name, bm.granularity_bits, len(self.entries) + len(self.added), dir_size
        )

    # -- storing --

    def store(self) -> None:
        """Write tracked and added bitmaps back (QEMU's
        qcow2_store_persistent_dirty_bitmaps); nothing when none changed."""
        tracked = self._tracked or {}
        if not tracked and not self.added:
            return
        image = self.image
        old_dir = image.header.bitmaps_ext if self.entries else None
        rows: list[tuple[BitmapEntry, bytes]] = []
        frees: list[tuple[int, int]] = []
        for i, e in enumerate(self.entries):
            if i in tracked:
                bits, old_table = tracked[i]
                offset, size = _write_bitmap(image, bits, e.granularity_bits)
                frees += _table_clusters(e, old_table)
                e = BitmapEntry(
                    e.name, offset, size, e.flags & ~L.BME_FLAG_IN_USE, e.type,
                    e.granularity_bits, e.extra_data,
                )  # fmt: skip
            rows.append((e, e.extra_data))
        # QEMU lists its bitmaps newest first; new ones join the directory so.
        for bm in reversed(self.added):
            offset, size = _write_bitmap(image, bm.bits, bm.granularity_bits)
            flags = L.BME_FLAG_AUTO if bm.enabled else 0
            e = BitmapEntry(bm.name, offset, size, flags, L.BT_DIRTY_TRACKING, bm.granularity_bits)
            rows.append((e, b""))
        image.flush()  # data, tables and their refcounts durable before the directory
        directory = _pack_directory(rows)
        cs = image.geo.cluster_size
        dir_offset = image.refcounts.alloc(-(-len(directory) // cs))
        image.write_metadata(dir_offset, directory, "bitmap")
        image.flush()  # the directory durable before the header points at it
        _write_bitmaps_extension(image, (len(rows), len(directory), dir_offset))
        if old_dir is not None and old_dir[1]:
            frees.append((old_dir[2], old_dir[1]))
        for offset, length in frees:
            image.refcounts.free(offset, length)
        self.entries = [e for e, _x in rows]
        self.added = []
        self._tracked = None
        self._live = []


def _write_bitmap(image, bits: np.ndarray, granularity_bits: int) -> tuple[int, int]:
    """Data clusters (only where some bit is set, as QEMU's store_bitmap) and
    the bitmap table, in new clusters; (table offset, table size)."""
    import numpy as np

    cs = image.geo.cluster_size
    size = _table_size(image.size, granularity_bits, cs)
    padded = np.zeros(size * cs, dtype=np.uint8)
    padded[: len(bits)] = bits
    clusters = padded.reshape(size, cs)
    used = np.flatnonzero(clusters.any(axis=1))
    table = np.zeros(size, dtype=np.uint64)
    if len(used):
        data = image.refcounts.alloc(len(used))
        table[used] = np.uint64(data) + np.arange(len(used), dtype=np.uint64) * np.uint64(cs)
        image.write_metadata(data, clusters[used].tobytes(), "bitmap")
    raw = table.astype(">u8").tobytes()
    raw += bytes(-len(raw) % cs)
    offset = image.refcounts.alloc(len(raw) // cs)
    image.write_metadata(offset, raw, "bitmap")
    return offset, size


def _table_clusters(e: BitmapEntry, table: np.ndarray) -> list[tuple[int, int]]:
    """(offset, length) of the table of `e` and every data cluster it points at."""
    import numpy as np

    offsets = table & np.uint64(L.BME_TABLE_ENTRY_OFFSET_MASK)
    out = [(int(o), 1) for o in offsets[offsets != 0]]
    out.append((e.table_offset, e.table_size * L.BME_TABLE_ENTRY_SIZE))
    return out


def _pack_directory(rows: list[tuple[BitmapEntry, bytes]]) -> bytes:
    out = bytearray()
    for e, extra in rows:
        name = e.name.encode()
        out += L.BITMAP_DIRECTORY_ENTRY.pack(
            e.table_offset, e.table_size, e.flags, e.type, e.granularity_bits, len(name), len(extra)
        )
        out += extra + name
        out += bytes(-len(out) % 8)
    return bytes(out)


def _write_bitmaps_extension(image, ext: tuple[int, int, int]) -> None:
    """Point the header at a new bitmap directory and set the autoclear bit
    (QEMU's update_header_sync: the whole header cluster, then a flush)."""
    h = image.header
    h.bitmaps_ext = ext
    h.autoclear_features |= L.QCOW2_AUTOCLEAR_BITMAPS
    image.rewrite_header()


# --- convert --bitmaps ----------------------------------------------------------------


def bitmaps_of(image) -> PersistentBitmaps:
    """The PersistentBitmaps of a writable qcow2 image (made on first use)."""
    if image._bitmaps is None:
        image._bitmaps = PersistentBitmaps(image)
    return image._bitmaps


def supports_bitmaps(image) -> bool:
    """QEMU's bdrv_supports_persistent_dirty_bitmap: qcow2 version 3."""
    return image.format_name == "qcow2" and image.header.version >= 3


def bitmaps_to_copy(sources: list, skip_broken: bool) -> list[Bitmap]:
    """The source's persistent bitmaps, checked as qemu-img's
    convert_check_bitmaps does (before anything is copied)."""
    if len(sources) > 1:
        raise BadOptionError("Copying bitmaps only possible with single source")
    source = sources[0]
    if not supports_bitmaps(source):
        raise BadOptionError("Source lacks bitmap support")
    bitmaps = load_bitmaps(source)
    # QEMU walks its bitmap list newest first: the last one in the directory.
    for bm in reversed(bitmaps):
        if bm.inconsistent and not skip_broken:
            raise QimgError(
                f"Cannot copy inconsistent bitmap '{bm.name}'\nTry --skip-broken-bitmaps, "
                "or use 'qemu-img bitmap --remove' to delete it"
            )
    return bitmaps


def copy_bitmaps(target, bitmaps: list[Bitmap]) -> list[str]:
    """Add `bitmaps` to the target (stored when it is closed), skipping
    inconsistent ones with a warning; the names skipped (convert_copy_bitmaps)."""
    if not supports_bitmaps(target):
        raise BadOptionError(f"Format driver '{target.format_name}' does not support bitmaps")
    store = bitmaps_of(target)
    skipped = []
    # Newest first, as QEMU walks them; a failure keeps the ones added so far.
    for bm in reversed(bitmaps):
        if bm.inconsistent:
            warn(f"Skipping inconsistent bitmap '{bm.name}'")
            skipped.append(bm.name)
        else:
            store.add(bm)
    return skipped


def storing_refused(image, name: str, gb: int, count: int, dir_size: int) -> str | None:
    """Why a new persistent bitmap `name` of granularity 2**gb cannot be
    stored beside `count` others whose directory entries take `dir_size`
    bytes (QEMU's check_constraints_on_bitmap and the limits of
    qcow2_co_can_store_new_dirty_bitmap), or None."""
    if gb > L.BME_MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << L.BME_MAX_GRANULARITY_BITS} bytes)"
    if gb < L.BME_MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << L.BME_MIN_GRANULARITY_BITS} bytes)"
    nbytes = _bitmap_bytes(image.size, gb)
    if nbytes > L.BME_MAX_PHYS_SIZE or nbytes > L.BME_MAX_TABLE_SIZE * image.geo.cluster_size:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    raw = name.encode()
    if len(raw) > L.BME_MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({L.BME_MAX_NAME_SIZE} characters)"
    if count >= L.QCOW2_MAX_BITMAPS:
        return "Maximum number of persistent bitmaps is already reached"
    if dir_size + _dir_entry_size(raw, b"") > L.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        return "Not enough space in the bitmap directory"
    return None
