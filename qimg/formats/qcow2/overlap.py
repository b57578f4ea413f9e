"""The metadata overlap map: QEMU's qcow2_check_metadata_overlap in its
default overlap-check=cached mode.

The regions checked are the header, the active L1 table, the active L2
tables, the refcount table, the refcount blocks, the snapshot table, the
inactive (snapshot) L1 tables and the bitmap directory; inactive L2 tables
are checked only in QEMU's "all" mode, so not here.

The map is maintained as tables come and go, not rebuilt per write:
- the few multi-cluster regions (`fixed`) are recomputed only when one of
  the header fields locating them changes (`regions_key`), or when a writer
  of the snapshot table or bitmap directory calls `invalidate_regions`;
- L2 tables are added and removed by the cluster map (`l2_moved`) as L1
  entries change; a replaced L1 array is taken in whole;
- refcount blocks follow the refcount table: when its `generation` counter
  moves, only the entries that differ from a shadow copy are applied; a
  replaced (grown) table is taken in whole.
A data write then costs one bisect per kind of single-cluster table.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter

import numpy as np

from qimg.formats.qcow2 import layout as L


def ignored(kind: str, region: str) -> bool:
    """Whether a write of `kind` may land on a region of kind `region`
    (QEMU's `ign` mask: a structure is rewritten in place)."""
    return region == kind


class ClusterSet:
    """Sorted distinct cluster indexes, each with how many table entries
    name it (a damaged image may name one cluster twice)."""

    def __init__(self, clusters: list[int]):
        self.count = Counter(clusters)
        self.sorted = sorted(self.count)

    def add(self, cluster: int) -> None:
        n = self.count.get(cluster, 0)
        if not n:
            insort(self.sorted, cluster)
        self.count[cluster] = n + 1

    def remove(self, cluster: int) -> None:
        n = self.count.get(cluster, 0)
        if n > 1:
            self.count[cluster] = n - 1
        elif n == 1:
            del self.count[cluster]
            del self.sorted[bisect_left(self.sorted, cluster)]

    def hits(self, first: int, last: int) -> bool:
        """Whether a cluster in [first, last] is in the set."""
        s = self.sorted
        i = bisect_left(s, first)
        return i < len(s) and s[i] <= last


def _clusters(table: np.ndarray, mask: int, cluster_bits: int) -> list[int]:
    """Cluster indexes of the non-zero offsets in `table`."""
    offsets = table & np.uint64(mask)
    return (offsets[offsets != 0] >> np.uint64(cluster_bits)).tolist()


class OverlapMap:
    """Every metadata structure of one image, by host offset.

    Invariant (after `sync`): `l2s` holds the clusters the live L1 table
    names, `blocks` those the live refcount table names, and `fixed` the
    image's other regions as `image.metadata_regions()` lists them.
    """

    def __init__(self, image):
        self.image = image
        self.cluster_bits = image.geo.cluster_bits
        self.regions_key: tuple | None = None
        self.fixed: list[tuple[int, int, str]] = []
        self.l1: np.ndarray | None = None  # the L1 array `l2s` was built from
        self.l2s = ClusterSet([])
        self.reftable: np.ndarray | None = None  # the refcount table `blocks` follows
        self.reftable_generation = -1
        self.reftable_shadow: np.ndarray | None = None
        self.blocks = ClusterSet([])

    # --- maintenance ------------------------------------------------------------

    def invalidate_regions(self) -> None:
        """A multi-cluster region (snapshot table, bitmap directory...) was
        rewritten in place: list them again on the next check."""
        self.regions_key = None

    def l2_moved(self, l1: np.ndarray, old: int, new: int) -> None:
        """An entry of L1 array `l1` went from L2 table `old` to `new` (host
        offsets, 0 for none). Only the array the map was built from counts:
        another (a snapshot's, or a new one) is taken in whole at the next
        sync, if it becomes the live one."""
        if l1 is not self.l1:
            return
        cb = self.cluster_bits
        if old:
            self.l2s.remove(old >> cb)
        if new:
            self.l2s.add(new >> cb)

    def l1_moved(self, l1: np.ndarray) -> None:
        """The active L1 table moved to a new, longer array holding the
        same L2 offsets (ClusterMap.grow_l1): the L2 set stays; the fixed
        regions (the L1 table's place) are listed again."""
        if self.l1 is not None:
            self.l1 = l1
        self.regions_key = None

    def sync(self) -> None:
        image = self.image
        rc, cl, h = image.refcounts, image.clusters, image.header
        key = (
            rc.table_offset,
            rc.table_clusters,
            cl.l1_offset,
            cl.l1_size,
            h.nb_snapshots,
            h.snapshots_offset,
            h.bitmaps_ext,
        )
        if key != self.regions_key:
            self.fixed = [r for r in image.metadata_regions() if r[1]]
            self.regions_key = key
        if cl.l1 is not self.l1:
            self.l1 = cl.l1
            self.l2s = ClusterSet(_clusters(cl.l1, L.L1E_OFFSET_MASK, self.cluster_bits))
        if rc.table is not self.reftable:
            self.reftable = rc.table
            self.reftable_shadow = rc.table.copy()
            self.reftable_generation = rc.generation
            self.blocks = ClusterSet(_clusters(rc.table, L.REFT_OFFSET_MASK, self.cluster_bits))
        elif rc.generation != self.reftable_generation:
            self._apply_reftable_changes(rc.table)
            self.reftable_generation = rc.generation

    def _apply_reftable_changes(self, table: np.ndarray) -> None:
        shadow = self.reftable_shadow
        changed = np.flatnonzero(table != shadow).tolist()
        mask, cb = L.REFT_OFFSET_MASK, self.cluster_bits
        for i in changed:
            old, new = int(shadow[i]) & mask, int(table[i]) & mask
            if old:
                self.blocks.remove(old >> cb)
            if new:
                self.blocks.add(new >> cb)
            shadow[i] = table[i]

    # --- the check ----------------------------------------------------------------

    def may_overlap(self, offset: int, length: int, kind: str) -> bool:
        """Whether a write of `kind` to [offset, offset+length) touches
        metadata of another kind (length > 0)."""
        self.sync()
        end = offset + length
        for r_off, r_len, r_kind in self.fixed:
            if offset < r_off + r_len and r_off < end and not ignored(kind, r_kind):
                return True
        cb = self.cluster_bits
        first, last = offset >> cb, (end - 1) >> cb
        if kind != "refcount-block" and self.blocks.hits(first, last):
            return True
        return kind != "l2" and self.l2s.hits(first, last)
