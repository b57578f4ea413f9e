"""The check reads refcounts through refcount.py's one reader of refcount
blocks: the same counts as the image's own reader, and blocks it cannot
read (unaligned, past what the block layer reads) marked, not fatal."""

from __future__ import annotations

import numpy as np
import pytest

import qimg
from qimg.formats.qcow2.refcount import BlockUnreadable, StoredRefcounts
from tests.conftest import run
from tests.damage import read_u64, write_u64


def _image(tmp_path, qemu_img, qemu_io, refcount_bits: int):
    path = tmp_path / "r.qcow2"
    run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-o"]
        + [f"cluster_size=4096,refcount_bits={refcount_bits}", str(path), "4M"]
    )
    run([qemu_io, "-c", "write -P 7 0 1M", "-c", "write -P 8 2M 64k", str(path)])
    return path


@pytest.mark.parametrize("refcount_bits", [1, 4, 16, 64])
def test_stored_refcounts_equal_the_images_own_reader(tmp_path, qemu_img, qemu_io, refcount_bits):
    path = _image(tmp_path, qemu_img, qemu_io, refcount_bits)
    with qimg.open_image(str(path)) as img:
        live = img.refcounts.all_counts()
        stored = StoredRefcounts(img.storage, img.geo, img.refcounts.table)
        values = stored.full(len(live))
        assert np.array_equal(values[: len(live)].astype(np.uint64), live)
        assert not stored.any_unreadable
        clusters = np.flatnonzero(live).astype(np.uint64)
        refs, ok = stored.lookup(clusters)
        assert ok.all() and (refs == live[clusters.astype(np.intp)]).all()


def test_unaligned_refcount_block_is_marked_unreadable(tmp_path, qemu_img, qemu_io):
    path = _image(tmp_path, qemu_img, qemu_io, 16)
    reftable = read_u64(path, 48)
    block = read_u64(path, reftable)
    write_u64(path, reftable, block + 512)  # block 0 now unaligned
    with qimg.open_image(str(path)) as img:
        table = img.refcounts.table
        stored = StoredRefcounts(img.storage, img.geo, table)
        stored.full(16)
        assert stored.any_unreadable and stored.unreadable[0]
        _refs, ok = stored.lookup(np.array([0, 1], dtype=np.uint64))
        assert not ok.any()
        with pytest.raises(BlockUnreadable):
            StoredRefcounts(img.storage, img.geo, table).block(0)
