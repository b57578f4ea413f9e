"""Sharing expected from the start: where source and target lie on one
file system of a kind that shares extents (XFS, btrfs), convert scans the
data it will share where the source's storage maps it, from its first
chunk, in the writer's thread; where that file system then refuses (an
XFS made without reflink), the copy goes on reading and writing, as on
ext4, and the target is what qemu-img writes.

The file systems are mounted as tests/test_reflink.py mounts them (root,
loop device; skipped without them, failed under CI=true).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import qemu_check_clean, run
from test_reflink import (
    _unavailable,
    qemu_map,
    shared_fs,  # noqa: F401  (the fixture)
    write_source,
)

from qimg import reflink
from qimg.api import open_image
from qimg.convert import convert, pipeline, sharing
from qimg.convert.source import Concat
from qimg.driver import Driver
from qimg.storage import FileStorage

MiB = 1 << 20
KiB = 1 << 10

# 1 MiB data runs every 3 MiB, one 64 KiB zero block inside the second,
# and a run ending 4 KiB into a cluster (the plan rounds it out to the
# cluster: the chunk holds a hole's head, written, not shared).
RUNS = [(k * 3 * MiB, MiB) for k in range(8)] + [(25 * MiB, 4 * KiB)]
ZERO_BLOCK = (3 * MiB + 256 * KiB, 64 * KiB)
SIZE = 28 * MiB


def _make_source(path: str) -> None:
    write_source(path, SIZE, RUNS, ZERO_BLOCK)


@pytest.fixture
def xfs_without_reflink(tmp_path):
    """A mounted XFS made with reflink=0: of a kind that shares, but this
    one refuses; unmounted after the test."""
    if os.geteuid() != 0:
        _unavailable("loop mounts need root")
    if shutil.which("mkfs.xfs") is None:
        _unavailable("mkfs.xfs is not installed (xfsprogs)")
    image, mnt = tmp_path / "noreflink.img", tmp_path / "noreflink-mnt"
    with open(image, "wb") as f:
        f.truncate(300 * MiB)
    mnt.mkdir()
    for cmd in (
        ["mkfs.xfs", "-q", "-m", "reflink=0", str(image)],
        ["mount", "-o", "loop", str(image), str(mnt)],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            _unavailable(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _expected(src: str, tgt: str) -> bool:
    """sharing.expected of raw files `src` and `tgt`."""
    source = open_image(src, "raw", lock=False)
    target = open_image(tgt, "raw", writable=True, lock=False)
    try:
        return sharing.expected(Concat([source]), target)
    finally:
        source.close()
        target.close()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_expected_sharing_maps_from_the_first_chunk_and_shares_what_the_scan_calls_data(
    shared_fs,  # noqa: F811
    fmt,
    monkeypatch,
    qemu_img,
):
    src = os.path.join(shared_fs, "src.raw")
    _make_source(src)
    ours, theirs = os.path.join(shared_fs, f"ours.{fmt}"), os.path.join(shared_fs, f"theirs.{fmt}")
    read, started = [], []
    original = pipeline.Pipeline._read

    def counted(self, offset, *rest):
        read.append(offset)
        original(self, offset, *rest)

    monkeypatch.setattr(pipeline.Pipeline, "_read", counted)
    monkeypatch.setattr(pipeline.Pipeline, "_start", lambda self: started.append(self))
    convert([src], ours, target_format=fmt)
    # Every chunk in this thread, mapped but the cluster holding a hole's head.
    assert started == [] and read == ([RUNS[-1][0]] if fmt == "qcow2" else [])
    run(["qemu-img", "convert", "-O", fmt, src, theirs])
    run(["qemu-img", "compare", src, ours])
    assert qemu_map(ours, fmt) == qemu_map(theirs, fmt)
    if fmt == "qcow2":
        qemu_check_clean(ours)
    data = sum(n for _o, n in RUNS[:-1]) - ZERO_BLOCK[1]
    assert reflink.shared_bytes(ours) >= data


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_where_an_expected_file_system_refuses_the_copy_writes_what_qemu_img_writes(
    xfs_without_reflink, fmt, monkeypatch, qemu_img
):
    # Small batches: the refusal comes after the first, and the producer
    # thread takes the rest.
    monkeypatch.setattr(sharing, "PENDING_BYTES", 2 * MiB)
    monkeypatch.setattr(pipeline, "MAPPED_BATCH", 2 * MiB)
    src = os.path.join(xfs_without_reflink, "src.raw")
    _make_source(src)
    ours = os.path.join(xfs_without_reflink, f"ours.{fmt}")
    theirs = os.path.join(xfs_without_reflink, f"theirs.{fmt}")
    started = []
    start = pipeline.Pipeline._start

    def counted(self):
        started.append(self)
        start(self)

    monkeypatch.setattr(pipeline.Pipeline, "_start", counted)
    other = os.path.join(xfs_without_reflink, "other.raw")
    with open(other, "wb") as f:
        f.truncate(MiB)
    assert _expected(src, other)
    convert([src], ours, target_format=fmt)
    assert len(started) == 1
    run(["qemu-img", "convert", "-O", fmt, src, theirs])
    run(["qemu-img", "compare", src, ours])
    assert qemu_map(ours, fmt) == qemu_map(theirs, fmt)
    if fmt == "qcow2":
        qemu_check_clean(ours)
    assert reflink.shared_bytes(ours) == 0


def test_sharing_is_expected_only_on_one_file_system_that_shares(shared_fs, tmp_path):  # noqa: F811
    on_fs, elsewhere = os.path.join(shared_fs, "a.raw"), str(tmp_path / "b.raw")
    for path in (on_fs, os.path.join(shared_fs, "c.raw"), elsewhere):
        with open(path, "wb") as f:
            f.truncate(MiB)
    assert _expected(on_fs, os.path.join(shared_fs, "c.raw"))
    assert not _expected(on_fs, elsewhere)
    assert not _expected(elsewhere, on_fs)
    # A driver that cannot share (Driver's write_shared) is never expected to.
    plain = open_image(os.path.join(shared_fs, "c.raw"), "raw", writable=True, lock=False)
    source = open_image(on_fs, "raw", lock=False)
    try:
        plain.__class__ = type("Plain", (type(plain),), {"write_shared": Driver.write_shared})
        assert not sharing.expected(Concat([source]), plain)
    finally:
        plain.close()
        source.close()
    if os.path.isdir("/dev/shm"):
        shm = f"/dev/shm/qimg-expected-{os.getpid()}.raw"
        with open(shm, "wb") as f:
            f.truncate(MiB)
        try:
            assert not _expected(shm, shm)
        finally:
            os.unlink(shm)


def test_chunks_of_one_window_are_views_of_one_mapping(tmp_path):
    path = tmp_path / "f.raw"
    data = os.urandom(3 * MiB)
    path.write_bytes(data)
    storage = FileStorage(str(path))
    try:
        maps = sharing.SourceMaps()
        a, b = maps.view(storage, 4 * KiB, MiB), maps.view(storage, 2 * MiB, MiB)
        assert a.obj is b.obj  # one mmap
        assert bytes(a) == data[4 * KiB : 4 * KiB + MiB] and bytes(b) == data[2 * MiB :]
        assert maps.view(storage, 2 * MiB, MiB + 1) is None  # past the end
        mapping = storage.mapping(MiB, MiB)
        assert mapping.view(MiB - 1, 2) is None and mapping.view(2 * MiB - 1, 2) is None
        assert bytes(mapping.view(MiB + 7, 9)) == data[MiB + 7 : MiB + 16]
        assert bytes(storage.mapped(5, 11)) == data[5:16]
        del a, b, mapping
    finally:
        storage.close()
