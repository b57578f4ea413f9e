"""QEMU's qcow2_co_block_status, answered from whole L2 tables at once.

A query at guest offset `pos` answers for the run of subclusters of one
QEMU subcluster type (QCow2SubclusterType) that contains `pos`, inside one
L2 table; runs of types that have a host offset also end where the host
offsets stop being contiguous (count_contiguous_subclusters). The runs of
a table are computed with numpy when the table is first asked about; a
query is a bisection.

Also QEMU's qcow2_detect_metadata_preallocation: the guess, made on an
image's first block status, that its data clusters were preallocated (then
block status asks the host file which of them are holes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.entries import (
    CLUSTER_COMPRESSED,
    CLUSTER_NORMAL,
    CLUSTER_ZERO_ALLOC,
    CLUSTER_ZERO_PLAIN,
    cluster_types,
    descriptors,
)

if TYPE_CHECKING:
    from qimg.formats.qcow2.image import Qcow2Image

# QEMU's QCow2SubclusterType (the values are qimg's own).
SC_NORMAL = 0
SC_COMPRESSED = 1
SC_ZERO_PLAIN = 2
SC_ZERO_ALLOC = 3
SC_UNALLOCATED_PLAIN = 4
SC_UNALLOCATED_ALLOC = 5

# Types whose block status carries a host offset (BDRV_BLOCK_OFFSET_VALID).
HAS_OFFSET = (SC_NORMAL, SC_ZERO_ALLOC, SC_UNALLOCATED_ALLOC)

_OFFSET_MASK = np.uint64(L.L2E_OFFSET_MASK)
_ZERO_FLAG = np.uint64(L.QCOW_OFLAG_ZERO)
_COMPRESSED_FLAG = np.uint64(L.QCOW_OFLAG_COMPRESSED)

# qcow2_co_block_status asks for at most INT_MAX bytes at once.
INT_MAX = (1 << 31) - 1


# A run whose first cluster fails qcow2_get_host_offset's checks.
SC_CORRUPT = -1
# An extended L2 entry with a bitmap QEMU refuses: a query fails if it
# starts there or its run reaches it (count_contiguous_subclusters).
SC_INVALID = -2


class TableRuns:
    """The subcluster-type runs of guest [lo, hi), one L1 entry's range:
    run k is [starts[k], ends[k]) of type types[k], its first byte at host
    hosts[k] where the type has a host offset; corrupt entries are
    SC_CORRUPT runs, entries with an invalid subcluster bitmap SC_INVALID."""

    def __init__(self, lo: int, hi: int, starts, ends, types, hosts):
        self.lo, self.hi = lo, hi
        self.starts = starts
        self.ends = ends
        self.types = types
        self.hosts = hosts

    def find(self, pos: int) -> tuple[int, int, int, int, int | None]:
        """(type, run start, run end, host at the run start, type of the
        next run or None) of the run holding `pos`."""
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        after = int(self.types[k + 1]) if k + 1 < len(self.types) else None
        return int(self.types[k]), int(self.starts[k]), int(self.ends[k]), int(self.hosts[k]), after


def table_runs(image: Qcow2Image, pos: int) -> TableRuns:
    """The runs of the L1 entry range holding guest `pos` (< image.size)."""
    geo = image.geo
    span_bits = geo.cluster_bits + geo.l2_bits
    lo = pos >> span_bits << span_bits
    hi = min(image.size, lo + (1 << span_bits))
    clusters = image.clusters
    l2 = clusters.l2_offset(lo >> span_bits, lo)
    if not l2:
        return _one_run(lo, hi, SC_UNALLOCATED_PLAIN)
    has_data_file = image.header.has_data_file
    rows = clusters.l2_cache.get(l2)[: geo.offset_to_l2_index(hi - 1) + 1]
    if geo.extended_l2 or has_data_file:
        types, hosts = _subcluster_types(rows, geo, has_data_file)
        suspect = True
    else:
        types, hosts, suspect = _standard_types(rows, geo, image.header.version)
    unit = geo.subcluster_size
    count = -(-(hi - lo) // unit)
    types, hosts = types[:count], hosts[:count]
    if suspect:
        # A query starting at a corrupt entry fails with EIO
        # (qcow2_get_host_offset checks the first entry of each); runs
        # break before it anyway (its type or host offset differs).
        bad = _bad_clusters(rows, geo, image.header.version, has_data_file, lo)
        if bad is not None:
            types = types.copy()
            bad = np.repeat(bad, geo.subclusters_per_cluster)[:count]
            types[bad & (types != SC_INVALID)] = SC_CORRUPT
    brk = types[1:] != types[:-1]
    brk |= _WITH_OFFSET[types[1:]] & (hosts[1:] - hosts[:-1] != np.uint64(unit))
    first = np.concatenate(([0], np.flatnonzero(brk) + 1))
    starts = lo + first.astype(np.int64) * unit
    types, hosts = types[first], hosts[first]
    ends = np.concatenate((starts[1:], [hi])).astype(np.int64)
    return TableRuns(lo, hi, starts, ends, types, hosts)


def _one_run(lo: int, hi: int, kind: int) -> TableRuns:
    one = np.array([lo], dtype=np.int64)
    return TableRuns(lo, hi, one, np.array([hi], dtype=np.int64), np.array([kind]), one * 0)


def _bad_clusters(rows, geo, version: int, has_data_file: bool, lo: int) -> np.ndarray | None:
    """Which entries qcow2_get_host_offset refuses, as
    ClusterMap.checked_table checks them (None if none): an allocated
    cluster whose host offset is unaligned (or, with a data file, not the
    guest offset), a zero cluster in a version 2 image, a compressed
    cluster with a data file."""
    entries = descriptors(rows)
    ctypes = cluster_types(entries, geo.extended_l2, has_data_file)
    host = entries & _OFFSET_MASK
    allocated = (ctypes == CLUSTER_NORMAL) | (ctypes == CLUSTER_ZERO_ALLOC)
    bad = allocated & ((host & np.uint64(geo.cluster_size - 1)) != 0)
    if version < 3:
        bad |= (ctypes == CLUSTER_ZERO_PLAIN) | (ctypes == CLUSTER_ZERO_ALLOC)
    if has_data_file:
        guest = np.arange(len(entries), dtype=np.uint64) * np.uint64(geo.cluster_size)
        bad |= (ctypes == CLUSTER_COMPRESSED) | (allocated & (host != guest + np.uint64(lo)))
    return bad if bad.any() else None


# SC_* of a standard entry by (has offset) | (zero flag) << 1 | (compressed) << 2.
_STANDARD = np.array(
    [SC_UNALLOCATED_PLAIN, SC_NORMAL, SC_ZERO_PLAIN, SC_ZERO_ALLOC] + [SC_COMPRESSED] * 4,
    dtype=np.int8,
)
_WITH_OFFSET = np.zeros(8, dtype=bool)  # by SC_*; SC_CORRUPT, SC_INVALID index from the end
_WITH_OFFSET[list(HAS_OFFSET)] = True


def _standard_types(rows, geo, version: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """SC_* and host offset of each standard L2 entry (no data file), and
    whether any entry may be corrupt (an unaligned host cluster, a zero
    flag in a version 2 image): few passes, as a whole disk goes through
    here (compressed descriptors have other bits there)."""
    off = rows & _OFFSET_MASK
    code = (off != 0).view(np.int8) | ((rows & _ZERO_FLAG) != 0).view(np.int8) << 1
    code |= ((rows & _COMPRESSED_FLAG) != 0).view(np.int8) << 2
    types = _STANDARD[code]
    unaligned = (off & np.uint64(geo.cluster_size - 1)) != 0
    suspect = bool(np.any(unaligned & ((code & 5) == 1)))  # normal or allocated zero
    if version < 3:
        suspect = suspect or bool(np.any(code & 2))
    return types, off, suspect


def _subcluster_types(rows, geo, has_data_file: bool) -> tuple[np.ndarray, np.ndarray]:
    """SC_* and host offset of each subcluster of extended L2 entries
    (QEMU's qcow2_get_subcluster_type); an entry whose bitmap QEMU refuses
    (a subcluster both allocated and zero, or allocated without a host
    cluster) is SC_INVALID throughout. With standard entries and a data
    file, each cluster is one unit."""
    entries = descriptors(rows)
    ctypes = cluster_types(entries, geo.extended_l2, has_data_file)
    off = entries & _OFFSET_MASK
    if not geo.extended_l2:
        code = (ctypes == CLUSTER_NORMAL) | (ctypes == CLUSTER_ZERO_ALLOC)
        code = (
            code.view(np.int8)
            | ((ctypes == CLUSTER_ZERO_PLAIN) | (ctypes == CLUSTER_ZERO_ALLOC)).view(np.int8) << 1
        )
        code |= (ctypes == CLUSTER_COMPRESSED).view(np.int8) << 2
        return _STANDARD[code], off
    n = geo.subclusters_per_cluster
    bitmap = rows[:, 1]
    sc = np.arange(n, dtype=np.uint64)
    alloc = ((bitmap[:, None] >> sc) & np.uint64(1)) != 0
    zero = ((bitmap[:, None] >> (sc + np.uint64(32))) & np.uint64(1)) != 0
    normal = (ctypes == CLUSTER_NORMAL)[:, None]
    types = np.where(
        normal,
        np.where(zero, SC_ZERO_ALLOC, np.where(alloc, SC_NORMAL, SC_UNALLOCATED_ALLOC)),
        np.where(zero, SC_ZERO_PLAIN, SC_UNALLOCATED_PLAIN),
    ).astype(np.int8)
    low = bitmap & np.uint64(L.QCOW_L2_BITMAP_ALL_ALLOC)
    invalid = np.where(ctypes == CLUSTER_NORMAL, ((bitmap >> np.uint64(32)) & low) != 0, low != 0)
    types[invalid & (ctypes != CLUSTER_COMPRESSED)] = SC_INVALID
    types[ctypes == CLUSTER_COMPRESSED] = SC_COMPRESSED
    hosts = off[:, None] + sc * np.uint64(geo.subcluster_size)
    return types.reshape(-1), hosts.reshape(-1)


def detect_metadata_preallocation(image: Qcow2Image) -> bool:
    """QEMU's qcow2_detect_metadata_preallocation: true where at least
    max(real * 10 / 9, real + 2) clusters of the file have a reference,
    `real` being the clusters' worth of bytes the file occupies on its
    host. A failure to tell is false."""
    from qimg.errors import QimgError

    try:
        cs = image.geo.cluster_size
        length = -(-image.storage.size() // 512) * 512
        real = image.storage.allocated_size() // cs
        threshold = max(real * 10 // 9, real + 2)
        end = -(-length // cs)
        per_block = image.geo.refcount_block_size
        seen = 0
        for start in range(0, end, per_block):
            counts = image.refcounts.get_range(start, min(per_block, end - start))
            seen += int(np.count_nonzero(counts))
            if seen >= threshold:
                return True
        return False
    except (QimgError, OSError):
        return False
