"""A file opened with cache=writeback and told that bulk data follows
(stream_writes: its final flush makes every write durable anyway) writes
its long, aligned requests with O_DIRECT, around the page cache, and the
others through it; the bytes land where they were asked to either way.
No other cache mode and no tmpfs file changes how it writes, and a file
system that refuses such a write gets the bytes through the page cache.
commit streams the base's data so, and leaves what qemu-img's commit
leaves."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest
from chaintools import assert_clean, assert_same_guest, io, make, overlay, twins
from infotools import qemu_in

from qimg import libc, storage
from qimg.api import open_image
from qimg.cachemode import parse_cache_mode
from qimg.commit import commit_image
from qimg.storage import FileStorage, aligned_buffer

KiB, MiB = 1 << 10, 1 << 20
TMPFS = 0x01021994


def _direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.fixture
def writes(monkeypatch) -> list[tuple[bool, int]]:
    """(with O_DIRECT, bytes) of every os.pwrite and os.pwritev issued."""
    seen: list[tuple[bool, int]] = []
    pwrite, pwritev = os.pwrite, os.pwritev

    def counted_pwrite(fd, data, offset):
        seen.append((_direct(fd), len(memoryview(data))))
        return pwrite(fd, data, offset)

    def counted_pwritev(fd, buffers, offset):
        seen.append((_direct(fd), sum(len(memoryview(b)) for b in buffers)))
        return pwritev(fd, buffers, offset)

    monkeypatch.setattr(storage.os, "pwrite", counted_pwrite)
    monkeypatch.setattr(storage.os, "pwritev", counted_pwritev)
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


def _pattern(n: int, seed: int) -> memoryview:
    """`n` bytes of a pattern, in page-aligned memory."""
    buf = aligned_buffer(n)
    buf[:] = (bytes((i * 7 + seed) % 251 for i in range(256)) * (n // 256 + 1))[:n]
    return buf


def _streaming(path, cache: str = "writeback") -> FileStorage:
    st = FileStorage(str(path), writable=True, create=True, cache=parse_cache_mode(cache))
    st.stream_writes()
    return st


def test_long_aligned_writes_go_around_the_page_cache_and_land_where_asked(disk, writes):
    one, two, three = _pattern(MiB, 1), _pattern(512 * KiB, 2), _pattern(256 * KiB, 3)
    st = _streaming(disk / "f")
    st.pwrite(64 * KiB, one)
    st.pwritev(64 * KiB + MiB, [two, three])
    st.flush()
    st.close()
    assert writes == [(True, MiB), (True, 768 * KiB)]
    data = (disk / "f").read_bytes()
    assert data == bytes(64 * KiB) + bytes(one) + bytes(two) + bytes(three)


def test_short_or_unaligned_writes_go_through_the_page_cache(disk, writes):
    short = _pattern(64 * KiB, 4)
    long = _pattern(MiB + 4 * KiB, 5)
    st = _streaming(disk / "f")
    st.pwrite(0, short)  # shorter than STREAM_MIN
    st.pwrite(64 * KiB + 512, long[:MiB])  # offset not aligned
    st.pwritev(2 * MiB, [long[1 : MiB + 1]])  # memory not aligned
    st.pwritev(4 * MiB, [long[:MiB], long[:1000]])  # length not aligned
    st.close()
    assert writes and not any(direct for direct, _n in writes)
    data = (disk / "f").read_bytes()
    assert data[: 64 * KiB] == bytes(short)
    assert data[64 * KiB + 512 : 64 * KiB + 512 + MiB] == bytes(long[:MiB])
    assert data[2 * MiB : 3 * MiB] == bytes(long[1 : MiB + 1])
    assert data[4 * MiB :] == bytes(long[:MiB]) + bytes(long[:1000])


@pytest.mark.parametrize("cache", ["unsafe", "writethrough"])
def test_cache_modes_without_a_final_flush_or_with_o_dsync_keep_their_writes(disk, writes, cache):
    data = _pattern(MiB, 6)
    st = _streaming(disk / "f", cache)
    st.pwrite(0, data)
    st.close()
    assert writes == [(False, MiB)]
    assert (disk / "f").read_bytes() == bytes(data)


def test_a_tmpfs_file_keeps_its_writes(writes):
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
        data = _pattern(MiB, 7)
        st = _streaming(path)
        st.pwrite(0, data)
        st.close()
        assert writes == [(False, MiB)]
        with open(path, "rb") as f:
            assert f.read() == bytes(data)
    finally:
        os.unlink(path)


def test_a_refused_direct_write_goes_through_the_page_cache(disk, writes, monkeypatch):
    counted = storage.os.pwritev
    refused: list[int] = []

    def refusing(fd, buffers, offset):
        if _direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return counted(fd, buffers, offset)

    monkeypatch.setattr(storage.os, "pwritev", refusing)
    one, two = _pattern(MiB, 8), _pattern(MiB, 9)
    st = _streaming(disk / "f")
    st.pwrite(0, one)
    st.pwrite(MiB, two)
    st.close()
    assert len(refused) == 1  # not asked again
    assert writes == [(False, MiB), (False, MiB)]
    assert (disk / "f").read_bytes() == bytes(one) + bytes(two)


def test_commit_streams_the_base_data_and_leaves_what_qemu_img_leaves(
    qemu_img, qemu_io, disk, writes
):
    src = disk / "src"
    src.mkdir()
    make(src, "base.qcow2", "8M")
    io(src, "base.qcow2", "write -P 1 0 8M")
    overlay(src, "top.qcow2", "base.qcow2")
    io(src, "top.qcow2", "write -P 2 64k 1M", "write -P 3 3M 2M", "write -P 4 7M 4k")
    mine, theirs = twins(src, disk)
    here = os.getcwd()
    os.chdir(mine)
    try:
        with open_image("top.qcow2", "qcow2", writable=True) as image:
            commit_image(image, "top.qcow2")
    finally:
        os.chdir(here)
    proc = qemu_in(theirs, "qemu-img", "commit", "-q", "top.qcow2")
    assert proc.returncode == 0, proc.stderr
    assert sum(n for direct, n in writes if direct) == 3 * MiB
    assert_clean(mine, "base.qcow2", "top.qcow2")
    assert_same_guest(mine, theirs, "base.qcow2")
    assert_same_guest(mine, theirs, "top.qcow2")


@pytest.mark.parametrize("target_format", ["qcow2", "raw"])
def test_convert_with_writeback_streams_its_data_and_reads_as_its_source(
    qemu_img, disk, writes, target_format
):
    from qimg.convert import convert

    source = disk / "source.raw"
    with open(source, "wb") as f:
        for k in range(6):  # 1 MiB of data every 2 MiB, a short tail
            f.seek(k * 2 * MiB)
            f.write(bytes(_pattern(MiB, k)))
        f.write(bytes(_pattern(4 * KiB, 9)))
    target = disk / f"target.{target_format}"
    convert([str(source)], str(target), target_format=target_format, cache="writeback")
    assert sum(n for direct, n in writes if direct) >= 5 * MiB
    proc = qemu_in(disk, "qemu-img", "compare", "-f", "raw", "-F", target_format,
                   str(source), str(target))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if target_format == "qcow2":
        assert_clean(disk, target.name)
