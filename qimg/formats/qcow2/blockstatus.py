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

import numpy as np

from qimg.driver import COMPRESSED, DATA, ZERO
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.entries import (
    CLUSTER_NORMAL,
    CLUSTER_ZERO_ALLOC,
    cluster_types,
    descriptors,
    unit_kinds,
)

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


class TableRuns:
    """The subcluster-type runs of guest [lo, hi), one L1 entry's range:
    run k is [starts[k], ends[k]) of type types[k], its first byte at host
    hosts[k] where the type has a host offset."""

    def __init__(self, lo: int, hi: int, starts, ends, types, hosts):
        self.lo, self.hi = lo, hi
        self.starts = starts
        self.ends = ends
        self.types = types
        self.hosts = hosts

    def find(self, pos: int) -> tuple[int, int, int, int]:
        """(type, run start, run end, host at the run start) of the run holding `pos`."""
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        return int(self.types[k]), int(self.starts[k]), int(self.ends[k]), int(self.hosts[k])


def table_runs(image, pos: int) -> TableRuns:
    """The runs of the L1 entry range holding guest `pos` (< image.size).
    A corrupt entry there raises as a read would (qcow2_get_host_offset's
    checks: the image is marked corrupt, the query fails with EIO)."""
    geo = image.geo
    span_bits = geo.cluster_bits + geo.l2_bits
    lo = pos >> span_bits << span_bits
    hi = min(image.size, lo + (1 << span_bits))
    clusters = image.clusters
    l2 = clusters.l2_offset(lo >> span_bits, lo)
    if not l2:
        one = np.array([lo], dtype=np.int64)
        return TableRuns(
            lo, hi, one, np.array([hi], dtype=np.int64), np.array([SC_UNALLOCATED_PLAIN]), one * 0
        )
    rows = clusters.l2_cache.get(l2)[: geo.offset_to_l2_index(hi - 1) + 1]
    if geo.extended_l2 or image.header.has_data_file:
        clusters.checked_table(lo, hi)
        types, hosts = _subcluster_types(rows, geo, image.header.has_data_file)
    else:
        types, hosts, suspect = _standard_types(rows, geo, image.header.version)
        if suspect:
            clusters.checked_table(lo, hi)  # raises where an entry is corrupt
    unit = geo.subcluster_size
    count = -(-(hi - lo) // unit)
    types, hosts = types[:count], hosts[:count]
    brk = types[1:] != types[:-1]
    brk |= _WITH_OFFSET[types[1:]] & (hosts[1:] - hosts[:-1] != np.uint64(unit))
    first = np.concatenate(([0], np.flatnonzero(brk) + 1))
    starts = lo + first.astype(np.int64) * unit
    ends = np.concatenate((starts[1:], [hi])).astype(np.int64)
    return TableRuns(lo, hi, starts, ends, types[first], hosts[first])


# SC_* of a standard entry by (has offset) | (zero flag) << 1 | (compressed) << 2.
_STANDARD = np.array(
    [SC_UNALLOCATED_PLAIN, SC_NORMAL, SC_ZERO_PLAIN, SC_ZERO_ALLOC] + [SC_COMPRESSED] * 4,
    dtype=np.int8,
)
_WITH_OFFSET = np.zeros(6, dtype=bool)
_WITH_OFFSET[list(HAS_OFFSET)] = True


def _standard_types(rows, geo, version: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """SC_* and host offset of each standard L2 entry (no data file), and
    whether any entry may be corrupt (an unaligned host cluster, a zero
    flag in a version 2 image): few passes, as a whole disk goes through
    here."""
    off = rows & _OFFSET_MASK
    code = (off != 0).view(np.int8) | ((rows & _ZERO_FLAG) != 0).view(np.int8) << 1
    code |= ((rows & _COMPRESSED_FLAG) != 0).view(np.int8) << 2
    types = _STANDARD[code]
    suspect = bool(np.any(off & np.uint64(geo.cluster_size - 1)))
    if version < 3:
        suspect = suspect or bool(np.any(code & 2))
    return types, off, suspect


def _subcluster_types(rows, geo, has_data_file: bool) -> tuple[np.ndarray, np.ndarray]:
    """SC_* and host offset of each unit (subcluster with extended L2)."""
    kinds, hosts = unit_kinds(rows, geo, has_data_file)
    ctypes = cluster_types(descriptors(rows), geo.extended_l2, has_data_file)
    host_cluster = (ctypes == CLUSTER_NORMAL) | (ctypes == CLUSTER_ZERO_ALLOC)
    if geo.subclusters_per_cluster > 1:
        host_cluster = np.repeat(host_cluster, geo.subclusters_per_cluster)
    types = np.full(len(kinds), SC_UNALLOCATED_PLAIN, dtype=np.int8)
    types[host_cluster] = SC_UNALLOCATED_ALLOC
    types[kinds == DATA] = SC_NORMAL
    types[kinds == COMPRESSED] = SC_COMPRESSED
    zero = kinds == ZERO
    types[zero & host_cluster] = SC_ZERO_ALLOC
    types[zero & ~host_cluster] = SC_ZERO_PLAIN
    return types, hosts


def detect_metadata_preallocation(image) -> bool:
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
