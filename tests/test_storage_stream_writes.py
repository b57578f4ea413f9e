"""A file opened with cache=writeback and told that bulk data follows
(stream_writes: its final flush waits for every write anyway) writes its
long writes back as it goes and drops each window of them from the page
cache once it is on the disk; the bytes land where they were asked to.
Short writes stay cached, and no other cache mode and no tmpfs file drops
anything. commit, safe rebase, and convert with -t writeback stream their
data so, and leave what qemu-img leaves."""

from __future__ import annotations

import os

import pytest
from chaintools import assert_clean, assert_same_guest, io, make, overlay, twins
from infotools import qemu_in

from qimg import libc, writeback
from qimg.api import open_image
from qimg.cachemode import parse_cache_mode
from qimg.commit import commit_image
from qimg.storage import STREAM_MIN, FileStorage

KiB, MiB = 1 << 10, 1 << 20
TMPFS = 0x01021994


@pytest.fixture
def dropped(monkeypatch) -> list[tuple[int, int]]:
    """(offset, length) of every range dropped from the page cache, with
    a window of 1 MiB."""
    seen: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def recorded(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            seen.append((offset, length))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(writeback, "WINDOW", MiB)
    monkeypatch.setattr(writeback.os, "posix_fadvise", recorded)
    return seen


@pytest.fixture
def disk(tmp_path):
    """tmp_path, on a file system with a page cache of its own."""
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        if libc.file_system_type(fd) == TMPFS:
            pytest.skip("the test's directory is on tmpfs")
    finally:
        os.close(fd)
    return tmp_path


def _pattern(n: int, seed: int) -> bytes:
    return (bytes((i * 7 + seed) % 251 for i in range(256)) * (n // 256 + 1))[:n]


def _streaming(path, cache: str = "writeback") -> FileStorage:
    st = FileStorage(str(path), writable=True, create=True, cache=parse_cache_mode(cache))
    st.stream_writes()
    return st


def _covered(ranges: list[tuple[int, int]]) -> int:
    return sum(length for _offset, length in ranges)


def test_long_writes_are_dropped_behind_a_window_at_a_time_and_land_where_asked(disk, dropped):
    pieces = [_pattern(512 * KiB, k) for k in range(8)]
    st = _streaming(disk / "f")
    for k, piece in enumerate(pieces[:4]):
        st.pwrite(64 * KiB + k * 512 * KiB, piece)
    st.pwritev(64 * KiB + 2 * MiB, pieces[4:])
    st.flush()
    st.close()
    # Four windows of 1 MiB: each dropped once the next one is full.
    assert dropped == [(64 * KiB, MiB), (64 * KiB + MiB, MiB)]
    data = (disk / "f").read_bytes()
    assert data == bytes(64 * KiB) + b"".join(pieces)


def test_short_writes_stay_in_the_page_cache(disk, dropped):
    piece = _pattern(STREAM_MIN - 4 * KiB, 1)
    st = _streaming(disk / "f")
    for k in range(12):
        st.pwrite(k * STREAM_MIN, piece)
    st.close()
    assert dropped == []
    data = (disk / "f").read_bytes()
    assert all(data[k * STREAM_MIN :][: len(piece)] == piece for k in range(12))


@pytest.mark.parametrize("cache", ["unsafe", "writethrough", "none"])
def test_other_cache_modes_drop_nothing(disk, dropped, cache):
    data = _pattern(4 * MiB, 2)
    st = _streaming(disk / "f", cache)
    for k in range(4):
        st.pwrite(k * MiB, data[k * MiB : (k + 1) * MiB])
    st.close()
    assert dropped == []
    assert (disk / "f").read_bytes() == data


def test_a_tmpfs_file_drops_nothing(dropped):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        pytest.skip("no /dev/shm")
    fd = os.open(shm, os.O_RDONLY)
    try:
        if libc.file_system_type(fd) != TMPFS:
            pytest.skip("/dev/shm is not tmpfs")
    finally:
        os.close(fd)
    path = os.path.join(shm, f"qimg-test-stream-{os.getpid()}")
    try:
        data = _pattern(4 * MiB, 3)
        st = _streaming(path)
        for k in range(4):
            st.pwrite(k * MiB, data[k * MiB : (k + 1) * MiB])
        st.close()
        assert dropped == []
        with open(path, "rb") as f:
            assert f.read() == data
    finally:
        os.unlink(path)


def _chain(disk, base_data: str, *top_writes: str):
    """base.qcow2 (8 MiB, `base_data` written) <- top.qcow2 (`top_writes`),
    twice: (for qimg, for qemu-img)."""
    src = disk / "src"
    src.mkdir()
    make(src, "base.qcow2", "8M")
    io(src, "base.qcow2", base_data)
    overlay(src, "top.qcow2", "base.qcow2")
    io(src, "top.qcow2", *top_writes)
    return twins(src, disk)


def _on_top(d, action) -> None:
    """`action(image)` on top.qcow2 opened writable in `d` (its backing
    file's name is relative to it)."""
    here = os.getcwd()
    os.chdir(d)
    try:
        with open_image("top.qcow2", "qcow2", writable=True) as image:
            action(image)
    finally:
        os.chdir(here)


def test_commit_drops_the_base_data_behind_and_leaves_what_qemu_img_leaves(
    qemu_img, qemu_io, disk, dropped
):
    mine, theirs = _chain(
        disk, "write -P 1 0 8M", "write -P 2 64k 1M", "write -P 3 3M 3M", "write -P 4 7M 4k"
    )
    _on_top(mine, lambda image: commit_image(image, "top.qcow2"))
    proc = qemu_in(theirs, "qemu-img", "commit", "-q", "top.qcow2")
    assert proc.returncode == 0, proc.stderr
    assert _covered(dropped) >= MiB  # 4 MiB written, a window of 1 MiB
    assert_clean(mine, "base.qcow2", "top.qcow2")
    assert_same_guest(mine, theirs, "base.qcow2")
    assert_same_guest(mine, theirs, "top.qcow2")


@pytest.mark.parametrize("target_format", ["qcow2", "raw"])
def test_convert_with_writeback_drops_its_data_behind_and_reads_as_its_source(
    qemu_img, disk, dropped, target_format
):
    from qimg.convert import convert

    source = disk / "source.raw"
    with open(source, "wb") as f:
        for k in range(6):  # 1 MiB of data every 2 MiB, a short tail
            f.seek(k * 2 * MiB)
            f.write(_pattern(MiB, k))
        f.write(_pattern(4 * KiB, 9))
    target = disk / f"target.{target_format}"
    convert([str(source)], str(target), target_format=target_format, cache="writeback")
    assert _covered(dropped) >= 3 * MiB  # 6 MiB of data, a window of 1 MiB
    proc = qemu_in(disk, "qemu-img", "compare", "-f", "raw", "-F", target_format,
                   str(source), str(target))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if target_format == "qcow2":
        assert_clean(disk, target.name)


def test_rebase_drops_the_copied_data_behind_and_leaves_what_qemu_img_leaves(
    qemu_img, qemu_io, disk, dropped
):
    from qimg.rebase import rebase_image

    mine, theirs = _chain(disk, "write -P 1 0 6M", "write -P 2 1M 64k")
    _on_top(mine, lambda image: rebase_image(image, ""))  # flatten: the base's data copied up
    proc = qemu_in(theirs, "qemu-img", "rebase", "-b", "", "top.qcow2")
    assert proc.returncode == 0, proc.stderr
    assert _covered(dropped) >= MiB  # 6 MiB copied, a window of 1 MiB
    assert_clean(mine, "top.qcow2")
    assert_same_guest(mine, theirs, "top.qcow2")
