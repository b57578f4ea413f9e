"""QEMU's block status, as qemu-img map and measure see it.

QEMU's bdrv_co_block_status (want_zero) answers one query at a time for
one image of a chain: the flags of the run starting at the queried offset
and its length (pnum). Map and measure are loops of such queries, and what
they print depends on where the runs end, so the runs are reproduced as
QEMU cuts them:

- qcow2 (qimg.formats.qcow2.blockstatus): one subcluster-type run inside
  one L2 table, at most INT_MAX bytes; an unallocated run is a zero run
  where there is no backing file or it lies past the backing file's end;
  where the image looks preallocated, a data run is refined by the host
  file's holes (BDRV_BLOCK_RECURSE: a hole, or a run reaching the end of
  the file, reads as zeros).
- raw: the host file's data and holes (file-posix's SEEK_DATA/SEEK_HOLE),
  allocated, mapped 1:1.
- qcow (version 1): its extents (data, compressed, unallocated).
- luks: data throughout, without host offsets.

Lengths are those of QEMU's bdrv_getlength: whole 512-byte sectors.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

from qimg.driver import COMPRESSED, DATA, UNALLOCATED, ZERO, Driver
from qimg.errors import CorruptImageError

# QEMU's BDRV_BLOCK_* flags.
BLOCK_DATA = 0x01
BLOCK_ZERO = 0x02
BLOCK_OFFSET_VALID = 0x04
BLOCK_ALLOCATED = 0x10
BLOCK_EOF = 0x20


class Status(NamedTuple):
    """One answer: `flags` for guest [offset, offset + pnum); `host` the
    offset in the file named `file` where OFFSET_VALID is set; `depth` the
    image of the chain that answered (0: the top)."""

    flags: int
    pnum: int
    host: int
    file: str | None
    depth: int


def sector_length(image: Driver) -> int:
    """bdrv_getlength: the size rounded up to whole 512-byte sectors."""
    return -(-image.size // 512) * 512


class _FileMap:
    """The data runs of a host file (file-posix's block status), scanned
    once: the file does not change while map or measure has it open."""

    def __init__(self, storage):
        self.total = -(-storage.size() // 512) * 512
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.data: list[bool] = []
        for start, n, is_data in storage.data_extents(0, self.total) if self.total else []:
            if self.data and self.data[-1] == is_data and self.ends[-1] == start:
                self.ends[-1] = start + n
                continue
            self.starts.append(start)
            self.ends.append(start + n)
            self.data.append(is_data)

    def status(self, offset: int, nbytes: int) -> tuple[int, int]:
        """(flags, pnum) of the file at `offset` for at most `nbytes`."""
        if offset >= self.total:
            return BLOCK_EOF, 0
        nbytes = min(nbytes, self.total - offset)
        k = bisect.bisect_right(self.starts, offset) - 1
        if k < 0 or offset >= self.ends[k]:  # not covered: read as a hole
            end = self.starts[k + 1] if k + 1 < len(self.starts) else self.total
            flags, pnum = BLOCK_ZERO, min(end, offset + nbytes) - offset
        else:
            flags = BLOCK_DATA if self.data[k] else BLOCK_ZERO
            pnum = min(self.ends[k], offset + nbytes) - offset
        if offset + pnum == self.total:
            flags |= BLOCK_EOF
        return flags, pnum


class BlockStatus:
    """Block status queries over one image and its backing chain, with the
    state QEMU keeps between them (each image's preallocation guess, the
    runs of the last L2 table asked about, the host files' runs)."""

    def __init__(self, top: Driver):
        self.top = top
        self._files: dict[int, _FileMap] = {}
        self._prealloc: dict[int, bool] = {}
        self._tables: dict[int, object] = {}

    def query(self, offset: int, nbytes: int) -> Status:
        """qemu-img map's get_block_status: from the top down to the first
        image that has data or zeros there (the last one if none has)."""
        node, depth = self.top, 0
        while True:
            flags, pnum, host, name = self.layer(node, offset, nbytes)
            nbytes = pnum
            if flags & (BLOCK_DATA | BLOCK_ZERO) or node.backing is None:
                return Status(flags, pnum, host, name, depth)
            node, depth = node.backing, depth + 1

    def layer(self, image: Driver, offset: int, nbytes: int) -> tuple[int, int, int, str | None]:
        """bdrv_co_block_status of one image: (flags, pnum, host, file)."""
        nbytes = min(nbytes, sector_length(image) - offset)
        if image.format_name == "raw":
            flags, pnum = self._file(image.storage).status(offset, nbytes)
            return flags | BLOCK_OFFSET_VALID | BLOCK_ALLOCATED, pnum, offset, image.storage.path
        if image.format_name == "qcow2":
            flags, pnum, host, name = self._qcow2(image, offset, nbytes)
        elif image.format_name == "luks":
            # QEMU's crypto driver has no block status: all data, no offset.
            flags, pnum, host, name = BLOCK_DATA, nbytes, 0, None
        else:
            flags, pnum, host, name = _extent_status(image, offset, nbytes)
        if flags & (BLOCK_DATA | BLOCK_ZERO):
            flags |= BLOCK_ALLOCATED
        elif image.backing is None or offset >= sector_length(image.backing):
            flags |= BLOCK_ZERO
        return flags, pnum, host, name

    def _qcow2(self, image, offset: int, nbytes: int) -> tuple[int, int, int, str | None]:
        from qimg.formats.qcow2 import blockstatus as qs

        key = id(image)
        if key not in self._prealloc:
            self._prealloc[key] = qs.detect_metadata_preallocation(image)
        runs = self._tables.get(key)
        if runs is None or not runs.lo <= offset < runs.hi:
            runs = self._tables[key] = qs.table_runs(image, offset)
        kind, start, end, host, after = runs.find(offset)
        if kind == qs.SC_CORRUPT:
            image.clusters.checked_table(start, end)  # signals the corruption, raises EIO
            raise CorruptImageError("Input/output error", start)
        stop = min(offset + nbytes, offset + qs.INT_MAX)
        if kind == qs.SC_INVALID or (after == qs.SC_INVALID and stop > end):
            _invalid_entry(image, start if kind == qs.SC_INVALID else end)
        pnum = min(end, stop) - offset
        flags = 0
        name = None
        # An encrypted image's host offsets are not given out (its data
        # reads through the cipher).
        if kind in qs.HAS_OFFSET and not image.header.crypt_method:
            flags |= BLOCK_OFFSET_VALID
            host += offset - start
            name = image.data_storage.path
        if kind in (qs.SC_ZERO_PLAIN, qs.SC_ZERO_ALLOC):
            flags |= BLOCK_ZERO
        elif kind in (qs.SC_NORMAL, qs.SC_COMPRESSED):
            flags |= BLOCK_DATA
        if self._prealloc[key] and flags == BLOCK_DATA | BLOCK_OFFSET_VALID:
            # BDRV_BLOCK_RECURSE: the host file says which bytes are holes;
            # a hole (or nothing) up to its end makes the whole run zeros.
            fflags, fpnum = self._file(image.data_storage).status(host, pnum)
            if fflags & BLOCK_EOF and (not fpnum or fflags & BLOCK_ZERO):
                flags |= BLOCK_ZERO
            else:
                pnum = fpnum
                flags |= fflags & BLOCK_ZERO
        return flags, pnum, host, name

    def _file(self, storage) -> _FileMap:
        found = self._files.get(id(storage))
        if found is None:
            found = self._files[id(storage)] = _FileMap(storage)
        return found


def _invalid_entry(image, guest: int) -> None:
    """qcow2_get_host_offset meeting an extended L2 entry whose bitmap is
    invalid (at guest offset `guest`): the corruption, then EIO."""
    geo = image.geo
    l1_index = guest >> (geo.cluster_bits + geo.l2_bits)
    image.signal_corruption(
        f"Invalid cluster entry found  (L2 offset: {image.clusters.l2_offset(l1_index):#x}, "
        f"L2 index: {geo.offset_to_l2_index(guest):#x})"
    )
    raise CorruptImageError("Input/output error", guest)


def _extent_status(image: Driver, offset: int, nbytes: int) -> tuple[int, int, int, str | None]:
    """Block status from the driver's extents (qcow version 1: data with
    its host offset, compressed data without one, unallocated)."""
    ext = image.block_status(offset, nbytes)[0]
    if ext.kind == DATA:
        return BLOCK_DATA | BLOCK_OFFSET_VALID, ext.length, ext.host, image.storage.path
    if ext.kind == COMPRESSED:
        return BLOCK_DATA, ext.length, 0, None
    if ext.kind == ZERO:
        return BLOCK_ZERO, ext.length, 0, None
    assert ext.kind == UNALLOCATED
    return 0, ext.length, 0, None
