"""Changing the virtual size of a qcow2 image: QEMU's qcow2_co_truncate.

Growing makes the L1 table as long as the new size needs (moved when it
grows), maps the new area when preallocation asks for it, and hides a
longer backing file's data there with zero clusters. Shrinking drops every
cluster past the new end, the L2 tables past it and the refcount blocks left
counting nothing, then cuts the file after its last cluster in use. The
header's size field changes last, in one write.
"""

from __future__ import annotations

import numpy as np

from qimg.errors import FileTooLargeError, QimgError
from qimg.formats.qcow2 import layout as L

PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def resize(image, size: int, prealloc: str = "off") -> None:
    """Give the writable qcow2 `image` a virtual size of `size` bytes.

    Refusals are QEMU's, before anything is written: a size that is not a
    multiple of 512, a version 2 image with snapshots, an inconsistent
    persistent bitmap, preallocation while shrinking, and (version 2) a
    backing file longer than the old size, whose data qcow2 v2 cannot hide.
    """
    if prealloc not in PREALLOC_MODES:
        raise QimgError(f"Unsupported preallocation mode '{prealloc}'")
    if size % L.BDRV_SECTOR_SIZE:
        raise QimgError(f"The new size must be a multiple of {L.BDRV_SECTOR_SIZE}")
    header = image.header
    if header.nb_snapshots and header.version < 3:
        raise QimgError("Can't resize a v2 image which has snapshots")
    old = image.size
    if size < old and prealloc != "off":
        raise QimgError("Preallocation can't be used for shrinking an image")
    zero_new_area = size > old and _backing_longer(image, old)
    if zero_new_area and header.version < 3:
        raise QimgError("Failed to zero out new clusters: Operation not supported")
    _resize_bitmaps(image, size)
    if size < old:
        _shrink(image, size)
    else:
        try:
            image.clusters.grow_l1(image.geo.l1_entries_for(size), exact_size=True)
        except FileTooLargeError as exc:
            raise QimgError(f"Failed to grow the L1 table: {exc}") from None
    image.size = size
    if prealloc != "off" and size > old:
        _preallocate(image, old, prealloc)
    elif image.data_storage is not image.storage:
        image.data_storage.truncate(size)  # the data file follows, exactly
    if zero_new_area:
        _zero_new_area(image, old, size)
    image.flush()
    _write_size(image, size)
    if size < old:
        _truncate_file(image)


def _backing_longer(image, old: int) -> bool:
    """The block layer's rule: growing over a backing file longer than the
    old size must read zeros there, not the backing file's data."""
    return image.backing is not None and image.backing.size > old


def _resize_bitmaps(image, size: int) -> None:
    from qimg.formats.qcow2.bitmap import bitmaps_of, has_bitmaps

    if has_bitmaps(image):
        bitmaps_of(image).truncate(size)


def _shrink(image, size: int) -> None:
    """Clusters past the new end unallocated, L2 tables past it freed,
    refcount blocks left empty dropped (QEMU's qcow2_cluster_discard with
    full_discard, qcow2_shrink_l1_table, qcow2_shrink_reftable)."""
    geo = image.geo
    cs = geo.cluster_size
    start = -(-size // cs) * cs
    end = -(-image.size // cs) * cs
    if end > start:
        image.clusters.discard_full(start, end - start)
    _shrink_l1(image, geo.l1_entries_for(size))
    image.flush()
    image.refcounts.drop_unused_blocks()


def _shrink_l1(image, new_l1_size: int) -> None:
    """QEMU's qcow2_shrink_l1_table: the entries from `new_l1_size` on are
    cleared (the table keeps its length) and their L2 tables freed.

    Ordering: the L2 cache is written first; the cleared entries are
    durable before the tables they pointed at are released.
    """
    clusters = image.clusters
    tail = clusters.l1[new_l1_size:]
    offsets = tail & np.uint64(L.L1E_OFFSET_MASK)
    if not offsets.any():
        return
    image.flush()
    zeros = bytes(len(tail) * L.L1_ENTRY_SIZE)
    image.write_metadata(clusters.l1_offset + new_l1_size * L.L1_ENTRY_SIZE, zeros, "l1")
    image.flush_file()
    freed = [int(o) for o in offsets[offsets != 0]]
    tail[:] = 0
    for offset in freed:
        clusters.l2_cache.drop(offset)
        image.overlap_map.l2_moved(clusters.l1, offset, 0)
    cb = image.geo.cluster_bits
    image.refcounts.change_many(np.array(freed, dtype=np.int64) >> cb, -1)


def _preallocate(image, old: int, mode: str) -> None:
    """Map the new area (QEMU's preallocate_co for metadata; falloc and
    full also reserve or write its data): the partly used cluster at the
    old end is written with zeros past the old end, the clusters after it
    are mapped whole."""
    from qimg.formats.qcow2.create import preallocate

    cs = image.geo.cluster_size
    head_end = min(image.size, -(-old // cs) * cs)
    if head_end > old:
        image.clusters.write(old, bytes(head_end - old))
    preallocate(image, mode, head_end // cs)


def _zero_new_area(image, old: int, size: int) -> None:
    """Zero clusters over [old, size) (QEMU's qcow2_subcluster_zeroize, and
    explicit zeros for the head of the cluster the old end falls in)."""
    cs = image.geo.cluster_size
    head_end = min(size, -(-old // cs) * cs)
    if head_end > old:
        image.clusters.write(old, bytes(head_end - old))
    end = -(-size // cs) * cs
    if end > head_end:
        image.clusters.zero_clusters(head_end, end - head_end, unmap=False, backing=True)


def _write_size(image, size: int) -> None:
    """The header's size field, in one write, flushed."""
    image.storage.pwrite(L.HEADER_OFF_SIZE, size.to_bytes(8, "big"))
    image.storage.flush()
    image.header.size = size


def _truncate_file(image) -> None:
    """Cut the image file after its last cluster in use (QEMU's shrink
    does, by qcow2_get_last_cluster)."""
    cs = image.geo.cluster_size
    end = image.refcounts.last_used_cluster() * cs
    if end < image.storage.size():
        image.storage.truncate(end)
