"""qimg and QEMU's tools refuse each other's conflicting access to an image.

Each conflict is checked both ways against real qemu-io/qemu-img 7.2 holding
or probing the same file, and the error text is compared with what qemu-img
itself prints in the same situation.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from qimg import locking
from qimg.errors import BadOptionError, ImageIOError, ImageLockedError
from qimg.locking import ImageLock, image_perms
from qimg.storage import FileStorage

WRITE_LOCK = 'Failed to get "write" lock'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock'


# --- helpers (self-contained; shared fixtures may move to conftest.py) -------


def _require_tool(name: str) -> str:
    """Path of a QEMU tool; skip without it, but fail when CI=true."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required when CI=true but was not found")
        pytest.skip(f"{name} is not installed")
    return found


@pytest.fixture
def qemu_img() -> str:
    return _require_tool("qemu-img")


@pytest.fixture
def qemu_io() -> str:
    return _require_tool("qemu-io")


@pytest.fixture
def raw_image(tmp_path) -> str:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return str(path)


@pytest.fixture
def qcow2_image(tmp_path, qemu_img) -> str:
    path = str(tmp_path / "disk.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", path, "1M"], check=True)
    return path


def locked_bytes(path: str) -> list[int]:
    """Every locked byte of `path` by any process, from /proc/locks (OFD
    locks show pid -1; adjacent bytes of one owner are merged into a range)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields or len(fields) < 8 or fields[5] != dev:
                continue
            found.extend(range(int(fields[6]), int(fields[7]) + 1))
    return sorted(found)


HoldFn = Callable[..., subprocess.Popen]


@pytest.fixture
def hold(qemu_io) -> Iterator[HoldFn]:
    """Start `qemu-io -f FMT [flags] PATH`, kept alive on an open stdin pipe,
    and wait until its locks are visible.  Every holder is killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(path: str, fmt: str, *flags: str) -> subprocess.Popen:
        before = locked_bytes(path)
        proc = subprocess.Popen(
            [qemu_io, "-f", fmt, *flags, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        # Every qemu-io open holds byte 100 (consistent read) once it is done.
        while locked_bytes(path) == before:
            if proc.poll() is not None:
                pytest.fail(f"qemu-io exited early: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("qemu-io did not lock the image within 10s")
            time.sleep(0.02)
        time.sleep(0.1)  # let it finish any remaining permission updates
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stderr):
                if stream is not None:
                    stream.close()


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def lock_message(path: str, what: str) -> str:
    return f"Could not open '{path}': {what}\nIs another process using the image [{path}]?"


def open_lock(path: str, writable: bool, **kwargs) -> tuple[int, ImageLock]:
    """An fd on `path` and an ImageLock on it; the caller closes the fd."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        return fd, ImageLock(fd, path, writable, kwargs.pop("force_share", False), **kwargs)
    except BaseException:
        os.close(fd)
        raise


# --- the bytes taken are QEMU's ------------------------------------------------


@pytest.mark.parametrize(
    "flags, writable, force_share, expected",
    [
        ((), True, False, [100, 101, 103, 201, 203]),
        (("-r",), False, False, [100, 201, 203]),
        (("-r", "-U"), False, True, [100]),
    ],
    ids=["read-write", "read-only", "force-share"],
)
def test_qcow2_lock_bytes_match_qemu_io(qcow2_image, hold, flags, writable, force_share, expected):
    proc = hold(qcow2_image, "qcow2", *flags)
    assert locked_bytes(qcow2_image) == expected
    proc.kill()
    proc.wait()
    assert locked_bytes(qcow2_image) == []

    storage = FileStorage(qcow2_image, writable=writable, force_share=force_share)
    try:
        assert locked_bytes(qcow2_image) == expected
    finally:
        storage.close()


@pytest.mark.parametrize(
    "flags, writable, expected",
    [((), True, [100, 101]), (("-r",), False, [100])],
    ids=["read-write", "read-only"],
)
def test_raw_masks_match_qemu_io_on_raw_image(raw_image, hold, flags, writable, expected):
    proc = hold(raw_image, "raw", *flags)
    assert locked_bytes(raw_image) == expected
    proc.kill()
    proc.wait()

    perm, shared = image_perms(writable, metadata=False)
    fd, lock = open_lock(raw_image, writable, perm=perm, shared=shared)
    try:
        assert locked_bytes(raw_image) == expected
    finally:
        lock.release()
        os.close(fd)


def test_image_perms_table():
    R, W, RS, ALL = (
        locking.BLK_PERM_CONSISTENT_READ,
        locking.BLK_PERM_WRITE,
        locking.BLK_PERM_RESIZE,
        locking.BLK_PERM_ALL,
    )
    assert ALL == 0x0F
    assert image_perms(True) == (R | W | RS, ALL & ~(W | RS))
    assert image_perms(False) == (R, ALL & ~(W | RS))
    assert image_perms(False, True) == (R, ALL)
    assert image_perms(True, metadata=False) == (R | W, ALL)
    assert image_perms(True, metadata=False, resize=True) == (R | W | RS, ALL)
    assert image_perms(False, True, metadata=False) == (R, ALL)
    assert locking.create_perms() == (W | RS, ALL & ~RS)


# --- qemu-io holds the image; qimg opens it ----------------------------------


def test_writable_open_refused_while_qemu_io_writes(qcow2_image, hold, qemu_img):
    hold(qcow2_image, "qcow2")
    with pytest.raises(ImageLockedError) as info:
        FileStorage(qcow2_image, writable=True)
    assert str(info.value) == lock_message(qcow2_image, WRITE_LOCK)
    # Word for word what qemu-img prints for a writable open of the same file.
    qemu = run(qemu_img, "resize", "-f", "qcow2", qcow2_image, "2M")
    assert qemu.returncode == 1
    assert qemu.stderr == f"qemu-img: {info.value}\n"


def test_read_only_open_refused_while_qemu_io_writes(qcow2_image, hold, qemu_img):
    hold(qcow2_image, "qcow2")
    with pytest.raises(ImageLockedError) as info:
        FileStorage(qcow2_image, writable=False)
    assert str(info.value) == lock_message(qcow2_image, SHARED_WRITE_LOCK)
    qemu = run(qemu_img, "check", "-f", "qcow2", qcow2_image)
    assert qemu.returncode == 1
    assert qemu.stderr == f"qemu-img: {info.value}\n"


def test_force_share_open_allowed_while_qemu_io_writes(qcow2_image, hold):
    hold(qcow2_image, "qcow2")
    storage = FileStorage(qcow2_image, writable=False, force_share=True)
    try:
        assert storage.pread(0, 4) == b"QFI\xfb"
    finally:
        storage.close()


def test_refused_open_leaves_no_lock_behind(qcow2_image, hold):
    hold(qcow2_image, "qcow2")
    before = locked_bytes(qcow2_image)
    fd = os.open(qcow2_image, os.O_RDWR)
    try:
        with pytest.raises(ImageLockedError):
            ImageLock(fd, qcow2_image, True, False)
        # The fd is still open, so any byte left locked would still show.
        assert locked_bytes(qcow2_image) == before
    finally:
        os.close(fd)


def test_qcow2_style_open_of_raw_file_refused_while_qemu_io_writes(raw_image, hold):
    # qemu-io -f raw holds consistent read + write and shares everything.  A
    # file node under a metadata format (the default masks) refuses to share
    # write, so it sees qemu-io's write as a conflict either way.
    hold(raw_image, "raw")
    for writable in (True, False):
        with pytest.raises(ImageLockedError) as info:
            FileStorage(raw_image, writable=writable)
        assert str(info.value) == lock_message(raw_image, SHARED_WRITE_LOCK)
    FileStorage(raw_image, writable=False, force_share=True).close()


def test_raw_masks_share_raw_image_with_qemu_io_like_qemu_img(raw_image, hold, qemu_img):
    # QEMU tools never exclude each other on a raw image: qemu-img resize and
    # info succeed while qemu-io writes it, and so does qimg with raw masks.
    hold(raw_image, "raw")
    assert run(qemu_img, "resize", "-f", "raw", raw_image, "2M").returncode == 0
    assert run(qemu_img, "info", "-f", "raw", raw_image).returncode == 0
    for writable in (True, False):
        perm, shared = image_perms(writable, metadata=False)
        fd, lock = open_lock(raw_image, writable, perm=perm, shared=shared)
        lock.release()
        os.close(fd)


def test_writable_open_refused_while_qemu_io_reads(qcow2_image, hold, qemu_img):
    # qemu-io -r on qcow2 shares consistent read only: readers are welcome,
    # writers are not, exactly as for qemu-img resize.
    hold(qcow2_image, "qcow2", "-r")
    with pytest.raises(ImageLockedError) as info:
        FileStorage(qcow2_image, writable=True)
    assert str(info.value) == lock_message(qcow2_image, WRITE_LOCK)
    qemu = run(qemu_img, "resize", "-f", "qcow2", qcow2_image, "2M")
    assert qemu.returncode == 1
    assert qemu.stderr == f"qemu-img: {info.value}\n"

    FileStorage(qcow2_image, writable=False).close()
    assert run(qemu_img, "check", "-f", "qcow2", qcow2_image).returncode == 0


def test_writable_open_allowed_while_qemu_io_reads_raw(raw_image, hold):
    # qemu-io -f raw -r holds consistent read only and shares everything.
    hold(raw_image, "raw", "-r")
    FileStorage(raw_image, writable=True).close()


# --- qimg holds the image; QEMU's tools open it -------------------------------


def test_qemu_tools_refused_while_qimg_writes(qcow2_image, qemu_img, qemu_io):
    storage = FileStorage(qcow2_image, writable=True)
    try:
        info = run(qemu_img, "info", qcow2_image)
        assert info.returncode == 1
        assert info.stderr == f"qemu-img: {lock_message(qcow2_image, SHARED_WRITE_LOCK)}\n"

        assert run(qemu_img, "info", "-U", qcow2_image).returncode == 0

        write = run(qemu_io, "-f", "qcow2", "-c", "write 0 512", qcow2_image)
        assert write.returncode == 1
        assert WRITE_LOCK in write.stderr
        assert f"Is another process using the image [{qcow2_image}]?" in write.stderr
    finally:
        storage.close()


def test_qemu_readers_allowed_while_qimg_reads(qcow2_image, qemu_img, qemu_io):
    storage = FileStorage(qcow2_image, writable=False)
    try:
        assert run(qemu_img, "info", qcow2_image).returncode == 0
        assert run(qemu_img, "check", qcow2_image).returncode == 0
        assert run(qemu_io, "-r", "-c", "read 0 512", qcow2_image).returncode == 0
        write = run(qemu_io, "-f", "qcow2", "-c", "write 0 512", qcow2_image)
        assert write.returncode == 1
        assert WRITE_LOCK in write.stderr
    finally:
        storage.close()


def test_qemu_writer_allowed_while_qimg_force_shares(qcow2_image, qemu_io):
    storage = FileStorage(qcow2_image, writable=False, force_share=True)
    try:
        assert run(qemu_io, "-f", "qcow2", "-c", "write 0 512", qcow2_image).returncode == 0
    finally:
        storage.close()


def test_qemu_io_can_write_after_qimg_closes(qcow2_image, qemu_io):
    storage = FileStorage(qcow2_image, writable=True)
    storage.close()
    assert locked_bytes(qcow2_image) == []
    write = run(qemu_io, "-f", "qcow2", "-c", "write 0 512", qcow2_image)
    assert write.returncode == 0, write.stderr


# --- within one process, and odd filesystems --------------------------------


def test_second_writable_open_in_same_process_refused(raw_image):
    # OFD locks belong to the open file description, not the process, so two
    # opens in one process exclude each other as two QEMU processes would.
    first = FileStorage(raw_image, writable=True)
    try:
        with pytest.raises(ImageLockedError, match='Failed to get "write" lock'):
            FileStorage(raw_image, writable=True)
        with pytest.raises(ImageLockedError, match='Failed to get shared "write" lock'):
            FileStorage(raw_image, writable=False)
        FileStorage(raw_image, writable=False, force_share=True).close()
    finally:
        first.close()
    FileStorage(raw_image, writable=False).close()


def test_readers_share_in_same_process(raw_image):
    a = FileStorage(raw_image, writable=False)
    b = FileStorage(raw_image, writable=False)
    assert locked_bytes(raw_image) == [100, 100, 201, 201, 203, 203]
    a.close()
    b.close()
    assert locked_bytes(raw_image) == []


def test_release_is_idempotent_and_unlocks_with_fd_open(raw_image):
    fd, lock = open_lock(raw_image, True)
    try:
        assert lock.locked_bytes == (100, 101, 103, 201, 203)
        lock.release()
        lock.release()
        assert lock.locked_bytes == ()
        assert locked_bytes(raw_image) == []
    finally:
        os.close(fd)


def test_force_share_with_writable_is_refused(raw_image):
    with pytest.raises(BadOptionError, match="force-share=on can only be used with read-only"):
        FileStorage(raw_image, writable=True, force_share=True)
    assert locked_bytes(raw_image) == []


def _foreign_write_lock(path: str, byte: int) -> int:
    """Hold an exclusive OFD lock on one byte, as a non-QEMU program might."""
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(
        fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi0q", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    )
    return fd


def test_foreign_exclusive_lock_fails_taking_a_byte(raw_image):
    fd = _foreign_write_lock(raw_image, 100)
    try:
        with pytest.raises(ImageLockedError) as info:
            FileStorage(raw_image, writable=False)
        # No hint: QEMU appends it only to failed checks, not failed locks.
        assert str(info.value) == f"Could not open '{raw_image}': Failed to lock byte 100"
        assert locked_bytes(raw_image) == [100]
    finally:
        os.close(fd)


def test_foreign_exclusive_lock_message_matches_qemu_img(qcow2_image, qemu_img):
    fd = _foreign_write_lock(qcow2_image, 100)
    try:
        with pytest.raises(ImageLockedError) as info:
            FileStorage(qcow2_image, writable=False)
        qemu = run(qemu_img, "check", qcow2_image)
        assert qemu.returncode == 1
        assert qemu.stderr == f"qemu-img: {info.value}\n"
    finally:
        os.close(fd)


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOTSUP, errno.ENOLCK])
def test_no_lock_support_means_no_locking(raw_image, monkeypatch, err):
    def refuse(fd: int, start: int) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(locking, "qemu_lock_fd", refuse)
    storage = FileStorage(raw_image, writable=True)
    try:
        assert storage._locker is not None
        assert not storage._locker.enabled
        assert storage._locker.locked_bytes == ()
    finally:
        storage.close()


def test_lock_error_after_first_byte_is_reported_and_undone(raw_image, monkeypatch):
    real = locking.qemu_lock_fd

    def fail_second(fd: int, start: int) -> None:
        if start != 100:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        real(fd, start)

    monkeypatch.setattr(locking, "qemu_lock_fd", fail_second)
    fd = os.open(raw_image, os.O_RDWR)
    try:
        with pytest.raises(ImageIOError) as info:
            ImageLock(fd, raw_image, True, False)
        assert str(info.value) == (
            f"Could not open '{raw_image}': Failed to lock byte 101: No locks available"
        )
        assert locked_bytes(raw_image) == []
    finally:
        os.close(fd)


def test_create_masks_and_prefix_match_qemu_img_create(qcow2_image, hold, qemu_img):
    # qemu-img create locks write + resize and unshares resize while it
    # truncates, and reports a conflict as "PATH: ..." rather than
    # "Could not open 'PATH': ...".
    hold(qcow2_image, "qcow2")
    perm, shared = locking.create_perms()
    fd = os.open(qcow2_image, os.O_RDWR)
    try:
        with pytest.raises(ImageLockedError) as info:
            ImageLock(
                fd, qcow2_image, True, False, perm=perm, shared=shared, prefix=f"{qcow2_image}: "
            )
    finally:
        os.close(fd)
    qemu = run(qemu_img, "create", "-q", "-f", "qcow2", qcow2_image, "2M")
    assert qemu.returncode == 1
    assert qemu.stderr == f"qemu-img: {info.value}\n"
