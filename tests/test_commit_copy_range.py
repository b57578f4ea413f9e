"""On a file system that shares extents, commit copies the plain data
clusters of the images above the base host to host (os.copy_file_range
into freshly placed base clusters, or into the file of a raw base), not
through memory: the base reads, and every image is allocated, as
qemu-img's commit leaves them, with the kernel copying in short pieces,
and where it refuses (EXDEV: the bytes go through a buffer, and the
kernel is not asked again). Elsewhere the bytes are read and written.
These tests take their file system to share extents (the kernel copies
on ext4 and tmpfs too, through its page cache), but one."""

from __future__ import annotations

import errno
import os
import random
import shutil

import pytest
from chaintools import (
    assert_clean,
    assert_same_allocation,
    io,
    make,
    overlay,
)
from conftest import run
from infotools import qemu_in

from qimg import reflink
from qimg.api import open_image
from qimg.commit import commit_image
from qimg.faults import FaultyStorage, SimulatedCrash
from qimg.storage import FileStorage

REAL_COPY = os.copy_file_range


def _chain(src, base_fmt: str = "qcow2", *base_opts: str) -> None:
    """base (24 MiB; 4 KiB clusters by default: an L2 table maps 2 MiB)
    <- top, whose data overlaps the base's in places, lies beside it in
    others, crosses L2 tables, and changes pattern every 64 KiB (a piece
    copied from the wrong host offset would show)."""
    base_opts = base_opts or ("cluster_size=4k",)
    opts = ["-o", ",".join(base_opts)] if base_fmt == "qcow2" else []
    make(src, f"base.{base_fmt}", "24M", *opts, fmt=base_fmt)
    io(src, f"base.{base_fmt}", "write -P 1 0 3M", "write -P 2 10M 1M", fmt=base_fmt)
    overlay(src, "top.qcow2", f"base.{base_fmt}", fmt=base_fmt)
    writes = [f"write -P {10 + k} {1024 + k * 64}k 64k" for k in range(40)]
    writes += [f"write -P {60 + k} {5 * 1024 + k * 192}k 128k" for k in range(30)]
    writes += ["write -P 99 1900k 300k", "write -z 12M 1M", "write -P 98 20M 4M"]
    io(src, "top.qcow2", *writes)


def _commit_in_process(d, **kw) -> None:
    """qimg commit top.qcow2, run in `d` (a data file's name is relative);
    `kw` for commit_image."""
    here = os.getcwd()
    os.chdir(d)
    try:
        image = open_image("top.qcow2", "qcow2", writable=True)
        try:
            commit_image(image, "top.qcow2", **kw)
        finally:
            image.close()
    finally:
        os.chdir(here)


def _compare(src, tmp_path, base: str, **kw) -> None:
    """qimg's commit (in this process; `kw` for commit_image) and
    qemu-img's of copies of `src`: the same guest data in the base, the
    same allocation in both files, both clean."""
    mine, theirs = tmp_path / "qimg", tmp_path / "qemu"
    for d in (mine, theirs):  # holes kept (shutil's copies fill them)
        run(["cp", "-r", "--sparse=always", str(src), str(d)])
    _commit_in_process(mine, **kw)
    proc = qemu_in(theirs, "qemu-img", "commit", "-q", "top.qcow2")
    assert proc.returncode == 0, proc.stderr
    assert_clean(mine, base, "top.qcow2")
    for name in (base, "top.qcow2"):
        assert _guest(mine, name) == _guest(theirs, name), name
    if base.endswith(".qcow2"):
        assert_same_allocation(mine, theirs, base, "top.qcow2")
    else:
        assert (mine / base).read_bytes() == (theirs / base).read_bytes()
        assert_same_allocation(mine, theirs, "top.qcow2")


def _guest(d, name: str) -> bytes:
    """What qemu-img reads of image `name`, opened in `d` (a data file's
    name is relative to it)."""
    proc = qemu_in(d, "qemu-img", "convert", "-U", "-O", "raw", name, "guest.raw")
    assert proc.returncode == 0, proc.stderr
    data = (d / "guest.raw").read_bytes()
    (d / "guest.raw").unlink()
    return data


@pytest.fixture(autouse=True)
def sharing_file_system(monkeypatch):
    """The test's file system taken to share extents (reflink.may_share)."""
    monkeypatch.setattr(reflink, "may_share", lambda fd: True)


@pytest.fixture
def calls(monkeypatch):
    """The copy_file_range calls made (count asked), the real copy behind."""
    made: list[int] = []

    def counting(src, dst, count, offset_src=None, offset_dst=None):
        made.append(count)
        return REAL_COPY(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", counting)
    return made


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_commit_copies_host_ranges_and_leaves_what_qemu_img_leaves(
    qemu_img, qemu_io, tmp_path, calls, base_fmt
):
    src = tmp_path / "src"
    src.mkdir()
    _chain(src, base_fmt)
    _compare(src, tmp_path, f"base.{base_fmt}")
    assert calls  # the data went host to host


def test_commit_on_a_file_system_that_cannot_share_reads_and_writes(
    qemu_img, qemu_io, tmp_path, calls, monkeypatch
):
    monkeypatch.setattr(reflink, "may_share", lambda fd: False)
    src = tmp_path / "src"
    src.mkdir()
    _chain(src)
    _compare(src, tmp_path, "base.qcow2")
    assert not calls


@pytest.mark.parametrize(
    "opts", [("cluster_size=16k", "extended_l2=on"), ("cluster_size=4k", "data_file=base.data")]
)
def test_commit_into_a_base_that_places_no_runs_reads_and_writes_as_before(
    qemu_img, qemu_io, tmp_path, opts
):
    src = tmp_path / "src"
    src.mkdir()
    _chain(src, "qcow2", *opts)
    _compare(src, tmp_path, "base.qcow2")


def test_commit_with_short_kernel_copies_leaves_what_qemu_img_leaves(
    qemu_img, qemu_io, tmp_path, monkeypatch
):
    """copy_file_range may copy less than asked: the rest is asked for again."""
    made: list[int] = []

    def short(src, dst, count, offset_src=None, offset_dst=None):
        made.append(count)
        return REAL_COPY(src, dst, min(count, 12288), offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", short)
    src = tmp_path / "src"
    src.mkdir()
    _chain(src)
    _compare(src, tmp_path, "base.qcow2")
    assert any(n > 12288 for n in made) and any(n < 12288 for n in made)


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_commit_where_the_kernel_refuses_to_copy_falls_back_to_buffered_writes(
    qemu_img, qemu_io, tmp_path, monkeypatch, err
):
    made: list[int] = []

    def refused(src, dst, count, offset_src=None, offset_dst=None):
        made.append(count)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "copy_file_range", refused)
    src = tmp_path / "src"
    src.mkdir()
    _chain(src)
    _compare(src, tmp_path, "base.qcow2")
    assert len(made) == 1  # refused once: not asked again


def test_commit_into_a_base_opened_with_o_direct_reads_and_writes_as_before(
    qemu_img, qemu_io, tmp_path, calls
):
    """-t none: the kernel's copy would pass the page cache; the bytes are
    read and written as before."""
    src = tmp_path / "src"
    src.mkdir()
    _chain(src)
    _compare(src, tmp_path, "base.qcow2", cache="none")
    assert not calls


def test_commit_reports_a_copy_error_in_one_line(qemu_img, qemu_io, tmp_path, monkeypatch):
    """An error that is no refusal (EIO) fails the commit, as a write would."""
    from qimg.errors import QimgError

    def failing(src, dst, count, offset_src=None, offset_dst=None):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "copy_file_range", failing)
    src = tmp_path / "src"
    src.mkdir()
    _chain(src)
    with pytest.raises(QimgError) as caught:
        _commit_in_process(src)
    assert "\n" not in str(caught.value)
    assert_clean(src, "base.qcow2", "top.qcow2")


def test_copy_from_reads_zeros_past_the_end_of_the_source(tmp_path, calls):
    (tmp_path / "src").write_bytes(b"x" * 5000)
    (tmp_path / "dst").write_bytes(b"y" * 20000)
    source = FileStorage(str(tmp_path / "src"), lock=False)
    target = FileStorage(str(tmp_path / "dst"), writable=True, lock=False)
    try:
        target.copy_from(source, 1000, 100, 10000)
    finally:
        source.close()
        target.close()
    assert (tmp_path / "dst").read_bytes() == b"y" * 100 + b"x" * 4000 + bytes(6000) + b"y" * 9900
    assert calls


def test_commit_copies_data_clusters_that_are_holes_in_their_file_as_qemu_img_does(
    qemu_img, qemu_io, tmp_path
):
    """A top preallocated with metadata maps every cluster as data, most of
    them holes in its file: qemu-img's commit copies them as data (zeros),
    it does not make them zero clusters of the base."""
    src = tmp_path / "src"
    src.mkdir()
    make(src, "base.qcow2", "4M")
    io(src, "base.qcow2", "write -P 1 0 3M")
    make(src, "top.qcow2", "4M", "-o", "preallocation=metadata")
    io(src, "top.qcow2", "write -P 2 1M 64k")
    qemu_in(src, "qemu-img", "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    _compare(src, tmp_path, "base.qcow2")


class _CopyingFaults(FaultyStorage):
    """A FaultyStorage that takes host-to-host copies (commit's copy path),
    doing them as Storage.copy_from does: a read of the source, then
    pwrites, each an operation that may crash."""

    copies = 0

    def can_copy_from(self, source) -> bool:
        return True

    def copy_from(self, source, source_offset: int, offset: int, length: int) -> None:
        type(self).copies += 1
        super().copy_from(source, source_offset, offset, length)


@pytest.mark.parametrize("mode", ["kill", "power"])
def test_commit_crash_in_a_host_copy_leaks_but_never_corrupts(qemu_img, qemu_io, tmp_path, mode):
    """The copied data reaches the base before the L2 entries that point
    at it: a crash at any write of the base leaves both images clean for
    qemu-img check (leaks allowed), the top as it read, and each cluster of
    the base as before or as after the commit."""
    src = tmp_path / "src"
    src.mkdir()
    make(src, "base.qcow2", "2M", "-o", "cluster_size=4k")
    io(src, "base.qcow2", "write -P 1 0 256k")
    overlay(src, "top.qcow2", "base.qcow2")
    io(src, "top.qcow2", "write -P 3 128k 200k", "write -P 4 900k 20k", "write -P 5 1M 600k")
    top = _guest(src, "top.qcow2")
    before = _guest(src, "base.qcow2")

    def commit(work, faults: dict) -> _CopyingFaults:
        made = []

        def wrap(storage):
            made.append(_CopyingFaults(storage, sync=False, **faults))
            return made[-1]

        image = open_image(str(work / "top.qcow2"), "qcow2", writable=True)
        try:
            commit_image(image, str(work / "top.qcow2"), base_storage_wrapper=wrap)
        except SimulatedCrash:
            pass
        try:
            image.close()
        except SimulatedCrash:
            pass
        return made[0]

    work = tmp_path / "w"
    run(["cp", "-r", str(src), str(work)])
    _CopyingFaults.copies = 0
    total = len(commit(work, {}).log)
    assert _CopyingFaults.copies  # the copy path ran
    after = _guest(work, "base.qcow2")
    rng = random.Random(mode)
    points = set(rng.sample(range(total), min(total, 10))) | set(range(max(0, total - 3), total))
    for point in sorted(points):
        for name in ("top.qcow2", "base.qcow2"):
            shutil.copy(src / name, work / name)
        commit(work, {"crash_at": point, "mode": mode, "seed": point})
        for name in ("top.qcow2", "base.qcow2"):
            proc = run(["qemu-img", "check", "-f", "qcow2", str(work / name)], check=False)
            assert proc.returncode in (0, 3), f"{name}, crash at {point}: {proc.stdout}"
        assert _guest(work, "top.qcow2") == top, point
        base = _guest(work, "base.qcow2")
        for pos in range(0, len(base), 4096):
            got = base[pos : pos + 4096]
            assert got in (before[pos : pos + 4096], after[pos : pos + 4096]), (point, pos)
