"""L2 entries: the one classifier and the one compressed-descriptor codec.

Spec: "Cluster mapping" (standard cluster descriptors), "Compressed Clusters
Descriptor", "Extended L2 Entries". The cluster types are QEMU's
(qcow2_get_cluster_type); every reader of L2 entries (reads, writes, the
allocation map, the check) classifies through here, over whole arrays.
"""

from __future__ import annotations

import numpy as np

from qimg.driver import COMPRESSED, DATA, UNALLOCATED, ZERO
from qimg.errors import CorruptImageError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.header import Geometry

_U64 = np.uint64
_OFFSET_MASK = _U64(L.L2E_OFFSET_MASK)
_COPIED = _U64(L.QCOW_OFLAG_COPIED)
_COMPRESSED = _U64(L.QCOW_OFLAG_COMPRESSED)
_ZERO = _U64(L.QCOW_OFLAG_ZERO)

# QEMU's QCow2ClusterType.
CLUSTER_UNALLOCATED = 0
CLUSTER_ZERO_PLAIN = 1
CLUSTER_ZERO_ALLOC = 2
CLUSTER_NORMAL = 3
CLUSTER_COMPRESSED = 4


def decode_l2(buf: bytes, extended: bool) -> np.ndarray:
    """An L2 table as native uint64: shape (n,) or, extended, (n, 2)."""
    table = np.frombuffer(buf, dtype=">u8").astype(np.uint64)
    return table.reshape(-1, 2) if extended else table


def encode_l2(table: np.ndarray) -> bytes:
    return table.astype(">u8").tobytes()


def descriptors(rows: np.ndarray) -> np.ndarray:
    """The cluster descriptor of each row (the first word of an extended entry)."""
    return rows[:, 0] if rows.ndim == 2 else rows


def host_offsets(entries: np.ndarray) -> np.ndarray:
    """Bits 9-55 of standard descriptors: the host cluster offset (or 0)."""
    return entries & _OFFSET_MASK


def is_compressed(entries: np.ndarray) -> np.ndarray:
    return (entries & _COMPRESSED) != 0


def is_copied(entries: np.ndarray) -> np.ndarray:
    return (entries & _COPIED) != 0


def cluster_types(entries: np.ndarray, extended: bool, has_data_file: bool) -> np.ndarray:
    """QEMU's cluster type of each descriptor (CLUSTER_*), any shape.

    The zero flag (bit 0) is one only in standard L2 entries: with extended
    L2 the subcluster bitmap says what is zero. With an external data file an
    entry with offset 0 and OFLAG_COPIED is a normal cluster at data file
    offset 0.
    """
    off = entries & _OFFSET_MASK
    types = np.full(entries.shape, CLUSTER_UNALLOCATED, dtype=np.int8)
    types[off != 0] = CLUSTER_NORMAL
    if has_data_file:
        types[(off == 0) & ((entries & _COPIED) != 0)] = CLUSTER_NORMAL
    if not extended:
        zero = (entries & _ZERO) != 0
        types[zero] = np.where(off[zero] != 0, CLUSTER_ZERO_ALLOC, CLUSTER_ZERO_PLAIN)
    types[(entries & _COMPRESSED) != 0] = CLUSTER_COMPRESSED
    return types


def has_host_cluster(types: np.ndarray) -> np.ndarray:
    """Entries that hold a host cluster (normal and allocated zero clusters)."""
    return (types == CLUSTER_NORMAL) | (types == CLUSTER_ZERO_ALLOC)


def unit_kinds(
    rows: np.ndarray, geo: Geometry, has_data_file: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The kind (driver DATA/ZERO/UNALLOCATED/COMPRESSED) and host offset of
    each unit of `rows`: clusters, or with extended L2 subclusters.

    Compressed units carry their whole descriptor as host offset. An
    extended entry whose bitmap marks a subcluster both allocated and zero,
    or allocated without a host cluster, is a corruption.
    """
    entries = descriptors(rows)
    types = cluster_types(entries, geo.extended_l2, has_data_file)
    off = entries & _OFFSET_MASK
    compressed = types == CLUSTER_COMPRESSED
    if not geo.extended_l2:
        kinds = np.full(len(entries), UNALLOCATED, dtype=np.int8)
        kinds[types == CLUSTER_NORMAL] = DATA
        kinds[(types == CLUSTER_ZERO_PLAIN) | (types == CLUSTER_ZERO_ALLOC)] = ZERO
        kinds[compressed] = COMPRESSED
        return kinds, np.where(compressed, entries, off)
    has_host = types == CLUSTER_NORMAL
    bitmap = rows[:, 1]
    n = geo.subclusters_per_cluster
    sc = np.arange(n, dtype=np.uint64)
    alloc = ((bitmap[:, None] >> sc) & _U64(1)) != 0
    zero = ((bitmap[:, None] >> (sc + _U64(32))) & _U64(1)) != 0
    kinds = np.full((len(entries), n), UNALLOCATED, dtype=np.int8)
    kinds[alloc & has_host[:, None]] = DATA
    kinds[zero] = ZERO
    kinds[compressed, :] = COMPRESSED
    bad = (alloc & zero) | (alloc & ~has_host[:, None])
    bad[compressed, :] = False
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        raise CorruptImageError(
            f"Invalid extended L2 entry: bitmap {int(bitmap[i]):#x}", int(off[i])
        )
    hosts = off[:, None] + sc * _U64(geo.subcluster_size)
    hosts = np.where(compressed[:, None], entries[:, None], hosts)
    return kinds.reshape(-1), hosts.reshape(-1)


# --- compressed cluster descriptors ----------------------------------------------


def compressed_spans(entries: np.ndarray, geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Host byte offset and byte length of each compressed descriptor (QEMU's
    qcow2_parse_compressed_l2_entry): the sector count covers whole 512-byte
    sectors from the one the data starts in. Not clamped to the file's end."""
    entries = np.asarray(entries, dtype=np.uint64)
    coffset = (entries & _U64(geo.cluster_offset_mask)).astype(np.int64)
    nb_sectors = ((entries >> _U64(geo.csize_shift)) & _U64(geo.csize_mask)).astype(np.int64) + 1
    return coffset, nb_sectors * L.QCOW2_COMPRESSED_SECTOR_SIZE - (coffset & 511)


def compressed_span(entry: int, geo: Geometry) -> tuple[int, int]:
    """[start, end) host bytes of one compressed descriptor."""
    coffset = entry & geo.cluster_offset_mask
    nb_sectors = ((entry >> geo.csize_shift) & geo.csize_mask) + 1
    return coffset, coffset + nb_sectors * L.QCOW2_COMPRESSED_SECTOR_SIZE - (coffset & 511)


def compressed_clusters(entries: np.ndarray, geo: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """First host cluster and number of host clusters each compressed
    descriptor's bytes touch (each holds one reference to each)."""
    coffset, csize = compressed_spans(entries, geo)
    first = coffset >> geo.cluster_bits
    last = (coffset + csize - 1) >> geo.cluster_bits
    return first, last - first + 1


def compressed_descriptors(hosts: np.ndarray, sizes: np.ndarray, geo: Geometry) -> np.ndarray:
    """Descriptors of compressed data of `sizes` bytes stored at `hosts`."""
    host = np.asarray(hosts, dtype=np.uint64)
    last = host + np.asarray(sizes, dtype=np.uint64) - _U64(1)
    nb_sectors = (last >> _U64(9)) - (host >> _U64(9))
    return host | (nb_sectors << _U64(geo.csize_shift)) | _COMPRESSED


# --- the rules of writes and discards (QEMU's qcow2-cluster.c), whole arrays ---


def is_allocated(entries: np.ndarray, extended: bool, has_data_file: bool) -> np.ndarray:
    """QEMU's qcow2_cluster_is_allocated over descriptors: the cluster type
    (cluster_types) is normal, compressed or an allocated zero cluster, i.e.
    it holds a reference to host clusters. Computed from the bits in two
    passes (discard runs it over every entry of a disk)."""
    allocated = (entries & (_OFFSET_MASK | _COMPRESSED)) != 0
    if has_data_file:
        # Offset 0 with OFLAG_COPIED is a normal cluster there, unless the
        # zero flag makes it a plain zero cluster.
        mask = _COPIED if extended else _COPIED | _ZERO
        allocated |= (entries & mask) == _COPIED
    return allocated


def writable_in_place(entries: np.ndarray, types: np.ndarray) -> np.ndarray:
    """The negation of QEMU's cluster_needs_new_alloc: a normal or allocated
    zero cluster with OFLAG_COPIED (refcount 1) takes guest data in its own
    host cluster; any other cluster needs a new one (copy on write)."""
    return has_host_cluster(types) & is_copied(entries)


def is_zero_flagged(entries: np.ndarray) -> np.ndarray:
    """Bit 0 of standard descriptors: the cluster reads as zeros (its host
    cluster, if any, holds stale data). Not used with extended L2."""
    return (entries & _ZERO) != 0


def subcluster_allocated(bitmaps: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Whether subcluster `index` of each extended L2 bitmap is allocated."""
    return ((bitmaps >> np.asarray(index, dtype=np.uint64)) & _U64(1)) != 0
