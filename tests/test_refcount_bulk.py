"""Refcounts in bulk (issue 10, item 2).

Bulk changes (change_many / change_runs / free_runs, all_counts) are judged
against a plain dict model on real images made by qemu-img with several
refcount widths; a whole-image discard through the library is judged by
qemu-img against the same discard made by qemu-io on a copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import qemu_check_clean, qemu_json, qemu_read_raw, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qimg import open_image
from qimg.errors import CorruptImageError, QimgError
from qimg.formats.qcow2.refcount import expand_runs

# Small clusters so that the preallocated image has many refcount blocks
# (512-byte clusters: 4096 / refcount_bits clusters per block).
REFCOUNT_BITS = (1, 4, 16, 64)


@pytest.fixture(scope="module")
def prealloc_images(qemu_img, tmp_path_factory) -> dict[int, Path]:
    """One preallocated 2 MiB image per refcount width: every cluster of
    the file in use, covered by existing refcount blocks."""
    directory = tmp_path_factory.mktemp("refcount-bulk")
    images = {}
    for bits in REFCOUNT_BITS:
        path = directory / f"prealloc-{bits}.qcow2"
        opts = f"cluster_size=512,refcount_bits={bits},preallocation=metadata"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), "2M"])
        images[bits] = path
    return images


def test_expand_runs_lists_each_runs_clusters_in_order() -> None:
    got = expand_runs(np.array([5, 0, 9, 7]), np.array([2, 0, 3, 1]))
    assert got.tolist() == [5, 6, 9, 10, 11, 7]
    assert expand_runs(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).size == 0


def test_all_counts_equals_per_cluster_get(prealloc_images) -> None:
    with open_image(str(prealloc_images[16])) as img:
        counts = img.refcounts.all_counts()
        assert len(counts) == img.refcounts.covered_clusters() or len(counts) > 0
        assert [int(c) for c in counts] == [img.refcounts.get(i) for i in range(len(counts))]
        assert int(counts.sum()) == len(counts[counts != 0])  # all 0 or 1 here


def _ops(n_clusters: int):
    run_ = st.tuples(st.integers(0, n_clusters - 1), st.integers(0, min(64, n_clusters))).map(
        lambda t: (t[0], min(t[1], n_clusters - t[0]))
    )
    array_op = st.tuples(
        st.sampled_from(["raise", "lower"]),
        st.integers(1, 3),
        st.lists(st.integers(0, n_clusters - 1), min_size=1, max_size=40),
    )
    runs_op = st.tuples(
        st.sampled_from(["raise_runs", "free_runs"]),
        st.just(1),
        st.lists(run_, min_size=1, max_size=6),
    )
    return st.lists(st.one_of(array_op, runs_op), min_size=1, max_size=12)


def _apply_model(model: dict[int, int], kind: str, step: int, arg, refcount_max: int):
    """The expected counts after one op, or None when the op must raise."""
    if kind in ("raise_runs", "free_runs"):
        clusters = [s + i for s, n in arg for i in range(n)]
        delta = 1 if kind == "raise_runs" else -1
    else:
        clusters = list(arg)
        delta = step if kind == "raise" else -step
    new = dict(model)
    for c in clusters:
        new[c] = new[c] + delta
    if any(v < 0 or v > refcount_max for v in new.values()):
        return None, clusters, delta
    return new, clusters, delta


@pytest.mark.parametrize("bits", REFCOUNT_BITS)
def test_bulk_changes_match_a_dict_model(bits: int, prealloc_images, tmp_path) -> None:
    """Random raise / lower / free of arrays (with repeats) and runs agree
    with a dict model; an op that would overflow or fall below zero raises
    and changes nothing; the counts read back from disk after close agree."""
    base = prealloc_images[bits]
    with open_image(str(base)) as img:
        n_clusters = len(img.refcounts.all_counts())
        refcount_max = img.refcounts.geo.refcount_max

    @settings(
        max_examples=15,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(ops=_ops(n_clusters))
    def prop(ops) -> None:
        path = tmp_path / "work.qcow2"
        shutil.copyfile(base, path)
        with open_image(str(path), writable=True) as img:
            rc = img.refcounts
            model = dict(enumerate(int(c) for c in rc.all_counts()))
            for kind, step, arg in ops:
                new, clusters, delta = _apply_model(model, kind, step, arg, refcount_max)
                if new is None:
                    error = QimgError if delta > 0 else CorruptImageError
                    with pytest.raises(error):
                        _apply(rc, kind, step, arg, clusters, delta)
                else:
                    _apply(rc, kind, step, arg, clusters, delta)
                    model = new
                assert rc.all_counts().tolist() == [model[i] for i in range(n_clusters)]
            rc.blocks.flush()
        with open_image(str(path)) as img:
            assert img.refcounts.all_counts().tolist() == [model[i] for i in range(n_clusters)]

    prop()


def _apply(rc, kind: str, step: int, arg, clusters: list[int], delta: int) -> None:
    if kind == "raise_runs":
        rc.change_runs(np.array([s for s, _ in arg]), np.array([n for _, n in arg]), 1)
    elif kind == "free_runs":
        rc.free_runs(np.array([s for s, _ in arg]), np.array([n for _, n in arg]))
    else:
        rc.change_many(np.array(clusters), delta)


def test_lowering_a_cluster_without_refcount_block_is_refused(prealloc_images) -> None:
    with open_image(str(prealloc_images[16])) as img:
        far = img.refcounts.covered_clusters() + 5
        before = img.refcounts.all_counts()
        with pytest.raises(CorruptImageError, match="no refcount block"):
            img.refcounts.change_many(np.array([0, far]), -1)
        assert img.refcounts.all_counts().tolist() == before.tolist()


def _make_source(kind: str, path: Path, tmp_path: Path) -> None:
    """A small image of `kind`: preallocated metadata, data, or compressed data."""
    if kind == "prealloc":
        opts = "cluster_size=4096,preallocation=metadata"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), "32M"])
        return
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(range(256)) * (8 << 12))  # 8 MiB
    args = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096"]
    if kind == "compressed":
        args.append("-c")
    run(args + [str(raw), str(path)])
    raw.unlink()


@pytest.mark.parametrize("kind", ["prealloc", "data", "compressed"])
def test_whole_image_discard_leaves_what_qemu_io_leaves(kind, qemu_io, tmp_path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    _make_source(kind, ours, tmp_path)
    shutil.copyfile(ours, theirs)
    with open_image(str(ours), writable=True) as img:
        size = img.size
        img.discard(0, size)
    step = 8 << 20
    cmds = [a for off in range(0, size, step) for a in ("-c", f"discard {off} {step}")]
    run(["qemu-io", "-f", "qcow2", *cmds, str(theirs)])
    qemu_check_clean(ours)
    assert qemu_json("map", "--output=json", ours) == qemu_json("map", "--output=json", theirs)
    assert qemu_read_raw(ours, tmp_path) == qemu_read_raw(theirs, tmp_path)


@pytest.mark.parametrize(
    "opts,backing",
    [
        ("compat=1.1", False),
        ("compat=0.10", False),
        ("extended_l2=on", False),
        ("compat=1.1", True),
        ("extended_l2=on", True),
    ],
    ids=["v3", "v2", "extended-l2", "v3-backing", "extended-l2-backing"],
)
def test_discard_of_mixed_clusters_leaves_what_qemu_io_leaves(
    opts: str, backing: bool, qemu_io, tmp_path
) -> None:
    """Data, zero-with-allocation and plain zero clusters, a partial first
    cluster: QEMU 7.2 turns allocated clusters (and, over a backing file,
    every cluster) into zero clusters and leaves the others as they are."""
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        raw = tmp_path / "backing.raw"
        raw.write_bytes(b"\x5a" * (4 << 20))
        args += ["-b", str(raw), "-F", "raw"]
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run(args + [str(ours), "4M"])
    writes = ["write -P 7 0 192k", "write -z 256k 64k", "write -z -u 384k 64k"]
    run(["qemu-io", "-f", "qcow2", *[a for w in writes for a in ("-c", w)], str(ours)])
    shutil.copyfile(ours, theirs)
    with open_image(str(ours), writable=True) as img:
        img.discard(32768, 2 << 20)
    run(["qemu-io", "-f", "qcow2", "-c", "discard 32768 2M", str(theirs)])
    qemu_check_clean(ours)
    assert qemu_json("map", "--output=json", ours) == qemu_json("map", "--output=json", theirs)
    assert qemu_read_raw(ours, tmp_path) == qemu_read_raw(theirs, tmp_path)
