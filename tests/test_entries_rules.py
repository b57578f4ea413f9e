"""The write and discard rules of entries.py agree with the one classifier."""

from __future__ import annotations

import numpy as np
import pytest

from qimg.formats.qcow2 import entries as E
from qimg.formats.qcow2 import layout as L


def _random_entries(n: int = 4096) -> np.ndarray:
    """Descriptors mixing every flag with zero and non-zero offsets."""
    rng = np.random.default_rng(3)
    offsets = rng.integers(0, 4, n, dtype=np.uint64) << np.uint64(16)
    flags = rng.choice(
        np.array([0, 1, L.QCOW_OFLAG_COPIED, L.QCOW_OFLAG_COPIED | 1], dtype=np.uint64), n
    )
    compressed = rng.random(n) < 0.2
    entries = offsets | flags
    entries[compressed] = (entries[compressed] | np.uint64(L.QCOW_OFLAG_COMPRESSED)) & ~np.uint64(
        L.QCOW_OFLAG_COPIED
    )
    return entries


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("has_data_file", [False, True])
def test_is_allocated_is_qemus_cluster_is_allocated_over_the_cluster_types(extended, has_data_file):
    entries = _random_entries()
    types = E.cluster_types(entries, extended, has_data_file)
    expect = np.isin(types, [E.CLUSTER_NORMAL, E.CLUSTER_ZERO_ALLOC, E.CLUSTER_COMPRESSED])
    assert np.array_equal(E.is_allocated(entries, extended, has_data_file), expect)


@pytest.mark.parametrize("extended", [False, True])
def test_writable_in_place_is_a_copied_cluster_with_a_host_cluster(extended):
    entries = _random_entries()
    types = E.cluster_types(entries, extended, False)
    expect = np.isin(types, [E.CLUSTER_NORMAL, E.CLUSTER_ZERO_ALLOC]) & (
        (entries & np.uint64(L.QCOW_OFLAG_COPIED)) != 0
    )
    assert np.array_equal(E.writable_in_place(entries, types), expect)
    assert not (E.writable_in_place(entries, types) & E.is_compressed(entries)).any()


def test_subcluster_allocated_reads_the_allocation_bits():
    bitmaps = np.array([0b101, 1 << 31 | 1 << 32], dtype=np.uint64)
    assert E.subcluster_allocated(bitmaps, [2, 0]).tolist() == [True, False]
    assert E.subcluster_allocated(bitmaps, [1, 31]).tolist() == [False, True]
