"""Emptying a qcow2 image (QEMU's qcow2_make_empty, after a commit): every
cluster unallocated, so that the image reads its backing file again.

Two ways, as QEMU chooses them:
- an image in QEMU's fresh layout (version 3; header, refcount table,
  refcount block, L1 table in the first clusters; no snapshots, bitmaps,
  data file or encryption) is made as qemu-img create leaves it: an empty
  L1 table, refcounts for those clusters only, the file cut after them
  (QEMU's make_completely_empty);
- any other image has every cluster discarded (entries 0, references
  dropped; qcow2_cluster_discard with full_discard).

QEMU's make_completely_empty marks the image dirty and rewrites the
refcounts in an order a crash can leave corrupt; here each step leaves an
image that is consistent (at worst leaking clusters): the L1 table is
emptied first, then the refcounts of what nothing references any more are
dropped, then the file is cut.
"""

from __future__ import annotations

from qimg.formats.qcow2 import layout as L

# Guest bytes discarded per step on the discard path.
DISCARD_STEP = 1 << 30


def make_empty(image) -> None:
    """Leave every cluster of `image` (a writable Qcow2Image) unallocated."""
    image.flush()
    if _fresh_layout(image):
        _completely_empty(image)
    else:
        _discard_all(image)
    image.flush()


def _l1_clusters(image) -> int:
    cs = image.geo.cluster_size
    return -(-image.header.l1_size * L.L1_ENTRY_SIZE // cs)


def _fresh_layout(image) -> bool:
    """QEMU's conditions for make_completely_empty, and qemu-img create's
    layout (which that function leaves): refcount table in cluster 1 (one
    cluster), its only block in cluster 2, the L1 table from cluster 3."""
    h = image.header
    cs = image.geo.cluster_size
    l1_clusters = _l1_clusters(image)
    if (
        h.version < 3
        or h.nb_snapshots
        or h.bitmaps_ext is not None
        or h.crypt_method != L.QCOW_CRYPT_NONE
        or h.has_data_file
        or 3 + l1_clusters > image.geo.refcount_block_size
    ):
        return False
    table = image.refcounts.table
    return (
        h.refcount_table_offset == cs
        and h.refcount_table_clusters == 1
        and h.l1_table_offset == 3 * cs
        and int(table[0]) & L.REFT_OFFSET_MASK == 2 * cs
    )


def _completely_empty(image) -> None:
    """Ordering: (1) the L1 table is zeroed and flushed: nothing is mapped,
    every L2 table and data cluster is leaked; (2) the refcount table drops
    every block but the first (what those blocks counted is unreferenced);
    (3) the first block counts only the header, the table, itself and the
    L1 table; (4) the file is cut after the L1 table. A crash between any
    two steps, or inside one (each is one write), leaves leaks only."""
    import numpy as np

    from qimg.formats.qcow2.refcount import encode_refcount_block

    cs = image.geo.cluster_size
    l1_clusters = _l1_clusters(image)
    used = 3 + l1_clusters
    image.write_metadata(3 * cs, bytes(l1_clusters * cs), "l1")
    image.storage.flush()
    table = np.zeros(cs // 8, dtype=">u8")
    table[0] = 2 * cs
    image.write_metadata(cs, table.tobytes(), "refcount-table")
    image.storage.flush()
    counts = np.zeros(image.geo.refcount_block_size, dtype=np.uint64)
    counts[:used] = 1
    image.write_metadata(
        2 * cs, encode_refcount_block(counts, image.geo.refcount_order), "refcount-block"
    )
    image.storage.flush()
    image.storage.truncate(used * cs)
    image.storage.flush()
    # The tables are read again on next use (the overlap map follows them).
    image.clusters = None
    image.refcounts = None


def _discard_all(image) -> None:
    """Every cluster unallocated, whatever it was (QEMU's full discard,
    step by step); the engine's ordering (cluster.py) applies."""
    cs = image.geo.cluster_size
    end = -(-image.size // cs) * cs
    pos = 0
    while pos < end:
        n = min(DISCARD_STEP, end - pos)
        image.clusters.discard_full(pos, n)
        pos += n
