"""Shared runs written together (Driver.write_shared_runs): a qcow2 target
places a batch of runs with one allocation and one L2 update per table,
and the image is what one write per run makes of it.

The file systems are mounted as tests/test_reflink.py mounts them (root,
loop device; skipped without them, failed under CI=true).
"""

from __future__ import annotations

import os

import pytest
from conftest import qemu_check_clean, qimg, run
from test_reflink import (
    qemu_map,
    shared_fs,  # noqa: F401  (the fixture)
    write_source,
)

from qimg import reflink
from qimg.api import create_image, open_image
from qimg.storage import FileStorage

MiB = 1 << 20
KiB = 1 << 10

# 4 KiB clusters: an L2 table maps 2 MiB, so the runs below fill several
# tables and every other one crosses from one table into the next.
RUNS = [(k * MiB + (960 * KiB if k % 2 else 256 * KiB), 128 * KiB) for k in range(24)]
SIZE = 32 * MiB


def _make_source(path: str) -> None:
    write_source(path, SIZE, RUNS)


def test_many_runs_over_several_l2_tables_are_shared_and_mapped_as_qemu_img_maps_them(
    shared_fs,  # noqa: F811
    qemu_img,
):
    src = os.path.join(shared_fs, "src.raw")
    _make_source(src)
    ours, theirs = os.path.join(shared_fs, "ours.qcow2"), os.path.join(shared_fs, "theirs.qcow2")
    opts = ["-O", "qcow2", "-o", "cluster_size=4096"]
    qimg("convert", *opts, src, ours)
    run(["qemu-img", "convert", *opts, src, theirs])
    run(["qemu-img", "compare", src, ours])
    qemu_check_clean(ours)
    assert reflink.shared_bytes(ours) == sum(n for _o, n in RUNS)
    assert qemu_map(ours, "qcow2") == qemu_map(theirs, "qcow2")


def test_an_existing_target_with_allocated_clusters_gets_every_run(shared_fs, qemu_img):  # noqa: F811
    """-n into a target whose clusters are partly allocated (written in
    place, not placed anew) and not known zero (zero runs written between
    the shared ones)."""
    src = os.path.join(shared_fs, "src.raw")
    _make_source(src)
    tgt = os.path.join(shared_fs, "tgt.qcow2")
    run(["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", tgt, str(SIZE)])
    for off in (0, 3 * MiB, 9 * MiB + 512 * KiB, 20 * MiB):
        run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {off} 192k", tgt])
    qimg("convert", "-n", "-O", "qcow2", src, tgt)
    run(["qemu-img", "compare", src, tgt])
    qemu_check_clean(tgt)
    assert reflink.shared_bytes(tgt) > 0


def test_write_shared_runs_places_what_it_is_given_and_says_shared(shared_fs, qemu_img):  # noqa: F811
    src_path = os.path.join(shared_fs, "src.raw")
    _make_source(src_path)
    tgt_path = os.path.join(shared_fs, "tgt.qcow2")
    create_image(tgt_path, "qcow2", SIZE, options={"cluster_size": "4096"})
    source = FileStorage(src_path, lock=False)
    tgt = open_image(tgt_path, "qcow2", writable=True)
    try:
        runs = [(off, source.pread(off, n), source, off) for off, n in RUNS]
        assert tgt.write_shared_runs(runs) is True
    finally:
        tgt.close()
        source.close()
    run(["qemu-img", "compare", src_path, tgt_path])
    qemu_check_clean(tgt_path)
    assert reflink.shared_bytes(tgt_path) == sum(n for _o, n in RUNS)


def test_write_shared_runs_writes_everything_where_the_file_system_cannot_share(tmp_path, qemu_img):
    src_path, tgt_path = str(tmp_path / "src.raw"), str(tmp_path / "tgt.qcow2")
    _make_source(src_path)
    create_image(tgt_path, "qcow2", SIZE, options={"cluster_size": "4096"})
    source = FileStorage(src_path, lock=False)
    tgt = open_image(tgt_path, "qcow2", writable=True)
    try:
        first, n = RUNS[0]
        if tgt.write_shared_runs([(first, source.pread(first, n), source, first)]):
            pytest.skip(f"{tmp_path} shares extents")
        runs = [(off, source.pread(off, n), source, off) for off, n in RUNS[1:]]
        assert tgt.write_shared_runs(runs) is False
    finally:
        tgt.close()
        source.close()
    run(["qemu-img", "compare", src_path, tgt_path])
    qemu_check_clean(tgt_path)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_runs_that_continue_each_other_in_the_source_are_shared_with_one_clone(
    shared_fs,  # noqa: F811
    fmt,
    qemu_img,
    monkeypatch,
):
    """Runs contiguous in the source and in the target (a raw file at the
    same offsets; a qcow2 image's clusters allocated together) take one
    FICLONERANGE; a gap in the source starts another."""
    src_path = os.path.join(shared_fs, "src.raw")
    with open(src_path, "wb") as f:
        f.write(os.urandom(8 * MiB))
    tgt_path = os.path.join(shared_fs, f"tgt.{fmt}")
    create_image(tgt_path, fmt, 8 * MiB)
    calls = []
    clone = reflink.clone_range

    def counted(*args):
        calls.append(args)
        return clone(*args)

    monkeypatch.setattr(reflink, "clone_range", counted)
    source = FileStorage(src_path, lock=False)
    tgt = open_image(tgt_path, fmt, writable=True)
    try:
        # Three runs that continue each other, then two after a gap.
        spans = [(0, MiB), (MiB, MiB), (2 * MiB, 2 * MiB), (5 * MiB, MiB), (6 * MiB, 2 * MiB)]
        runs = [(off, source.pread(off, n), source, off) for off, n in spans]
        assert tgt.write_shared_runs(runs) is True
    finally:
        tgt.close()
        source.close()
    assert [c[4] for c in calls] == [4 * MiB, 3 * MiB]
    assert reflink.shared_bytes(tgt_path) == 7 * MiB
    with open(src_path, "r+b") as f:  # the gap, which was never written
        f.seek(4 * MiB)
        f.write(bytes(MiB))
    run(["qemu-img", "compare", "-f", "raw", "-F", fmt, src_path, tgt_path])
    if fmt == "qcow2":
        qemu_check_clean(tgt_path)
