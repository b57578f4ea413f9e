"""Refcount changes over long runs (Refcounts.change_runs' slice path, used
by discard): the same counts, checks and errors as change_many over every
cluster of the runs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import run

from qimg import open_image
from qimg.errors import CorruptImageError, QimgError


@pytest.fixture(params=[1, 16], ids=["refcount_bits=1", "refcount_bits=16"])
def prealloc(request, qemu_img, tmp_path):
    """A preallocated image of 512-byte clusters (blocks of 4096 / bits
    clusters): every cluster of the file in use."""
    path = tmp_path / "prealloc.qcow2"
    opts = f"cluster_size=512,refcount_bits={request.param},preallocation=metadata"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), "2M"])
    return path


def _counts_after(path, tmp_path, name, change) -> list[int] | type:
    """Counts after `change(refcounts)` on a copy (the error type if it raised)."""
    work = tmp_path / name
    shutil.copyfile(path, work)
    with open_image(str(work), writable=True) as img:
        try:
            change(img.refcounts)
        except QimgError as exc:
            assert img.refcounts.all_counts().tolist() == _counts(path)
            return type(exc)
        return img.refcounts.all_counts().tolist()


def _counts(path) -> list[int]:
    with open_image(str(path)) as img:
        return img.refcounts.all_counts().tolist()


@pytest.mark.parametrize(
    "runs, delta",
    [
        ([(100, 900), (1200, 3000)], -1),  # across block boundaries
        ([(1200, 3000), (100, 900)], -1),  # out of order
        ([(0, 2000), (1999, 500)], -1),  # overlapping: each cluster twice
        ([(100, 900), (1200, 3000)], 1),  # raised past refcount_max with 1 bit
        ([(4000, 200)], -1),
    ],
)
def test_change_runs_matches_change_many_over_every_cluster(prealloc, tmp_path, runs, delta):
    starts = np.array([s for s, _n in runs])
    counts = np.array([n for _s, n in runs])
    clusters = np.concatenate([np.arange(s, s + n) for s, n in runs])
    n_clusters = len(_counts(prealloc))
    if any(s + n > n_clusters for s, n in runs):
        pytest.skip("runs past the clusters this image covers")
    got = _counts_after(prealloc, tmp_path, "a", lambda rc: rc.change_runs(starts, counts, delta))
    want = _counts_after(prealloc, tmp_path, "b", lambda rc: rc.change_many(clusters, delta))
    assert got == want


def test_freeing_runs_twice_is_refused_with_nothing_changed(prealloc, tmp_path):
    work = tmp_path / "work.qcow2"
    shutil.copyfile(prealloc, work)
    with open_image(str(work), writable=True) as img:
        rc = img.refcounts
        rc.free_runs(np.array([10, 500]), np.array([400, 1000]))
        before = rc.all_counts().tolist()
        with pytest.raises(CorruptImageError, match=r"below zero \(cluster 500\)"):
            rc.free_runs(np.array([2000, 500]), np.array([400, 1000]))
        assert rc.all_counts().tolist() == before


def test_freeing_runs_without_refcount_block_is_refused(prealloc, tmp_path):
    work = tmp_path / "work.qcow2"
    shutil.copyfile(prealloc, work)
    with open_image(str(work), writable=True) as img:
        rc = img.refcounts
        far = rc.covered_clusters() + 5
        before = rc.all_counts().tolist()
        with pytest.raises(CorruptImageError, match="no refcount block"):
            rc.free_runs(np.array([0, far]), np.array([1000, 1000]))
        assert rc.all_counts().tolist() == before
