"""The refcount pass of snapshot operations hands data clusters over as runs:
Refcounts.change_runs and get_runs on sorted, disjoint, long runs (worked
as slices of refcount blocks) give exactly what the per-cluster path gives,
and refuse an underflow or overflow with nothing changed."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qimg.api import open_image
from qimg.errors import QimgError
from qimg.formats.qcow2.refcount import expand_runs

N = 2048  # clusters of the image (4 KiB each, 16-bit refcounts: 2 blocks' worth)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,preallocation=metadata",
         str(path), str(N * 4096)],
        check=True,
    )  # fmt: skip
    return path


def _runs(draw_gaps: list[int], lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    starts, pos = [], 0
    for gap, n in zip(draw_gaps, lengths):
        pos += gap
        starts.append(pos)
        pos += n
    return np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.int64)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    gaps=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    lengths=st.lists(st.integers(16, 400), min_size=6, max_size=6),
    delta=st.sampled_from([1, -1, 2, -2]),
)
def test_runs_change_and_read_as_the_clusters_they_hold(image, gaps, lengths, delta):
    starts, counts = _runs(gaps, lengths[: len(gaps)])
    keep = starts + counts <= N
    starts, counts = starts[keep], counts[keep]
    clusters = expand_runs(starts, counts)
    with open_image(str(image)) as img:
        rc = img.refcounts
        before = rc.all_counts().copy()
        assert np.array_equal(rc.get_runs(starts, counts), rc.get_many(clusters))
        expected = before.astype(np.int64)
        np.add.at(expected, clusters, delta)
        if len(clusters) and expected.min() < 0:
            with pytest.raises(QimgError):
                rc.change_runs(starts, counts, delta)
            assert np.array_equal(rc.all_counts(), before)
            return
        rc.change_runs(starts, counts, delta)
        assert np.array_equal(rc.all_counts().astype(np.int64), expected)
        assert np.array_equal(rc.get_runs(starts, counts), rc.get_many(clusters))
        rc.blocks.invalidate()  # read-only image: nothing is written back
