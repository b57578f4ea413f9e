"""Cache modes (-t / -T) as qemu-img has them: what each does to the host
file (open flags, flushes), and images written in every mode read back
identically through qemu-img."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import uuid

import pytest
from conftest import IN_CI, qemu_check_clean, qimg, run

from qimg import api
from qimg.cachemode import CACHE_MODES
from qimg.convert import convert
from qimg.storage import DIRECT_ALIGNMENT, FileStorage

WRITES = (
    "write -P 1 0 256k",
    "write -P 2 3M 100k",
    "write -c -P 3 5M 64k",
    "write -P 4 7339520 1536",
    "write -z 2M 64k",
)


def make_source(tmp_path, cluster_size: int = 65536):
    """A qcow2 image with data, a compressed cluster (unaligned on the
    host) and a zeroed range; 8 MiB and 3 sectors (not a whole 4 KiB)."""
    path = tmp_path / f"src-{cluster_size}.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
         str(path), str((8 << 20) + 1536)])  # fmt: skip
    args = ["qemu-io", "-f", "qcow2"]
    for w in WRITES:
        args += ["-c", w]
    run([*args, str(path)])
    return path


class SyncSpy:
    """os.fsync / os.fdatasync / os.pwrite replaced by recorders: each call
    as (what, path of the fd, thread name)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str, str]] = []
        for name in ("fsync", "fdatasync", "pwrite"):
            monkeypatch.setattr(os, name, self._recorder(name, getattr(os, name)))

    def _recorder(self, name, real):
        def call(fd, *args):
            path = os.readlink(f"/proc/self/fd/{fd}")
            self.calls.append((name, path, threading.current_thread().name))
            return real(fd, *args)

        return call

    def syncs(self, path=None) -> list[tuple[str, str, str]]:
        return [
            c
            for c in self.calls
            if c[0] != "pwrite" and (path is None or c[1] == os.path.realpath(path))
        ]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_under_unsafe_calls_no_fsync_or_fdatasync(qemu_img, tmp_path, monkeypatch, fmt):
    src = make_source(tmp_path)
    spy = SyncSpy(monkeypatch)
    convert([str(src)], str(tmp_path / "new"), target_format=fmt)
    # qemu-img's create flushes between its steps (a qcow2 target is
    # created in its own thread); the copy into the target flushes nothing.
    assert all(c[2] == "qimg-convert-create" for c in spy.syncs())
    if fmt == "raw":
        assert spy.syncs() == []
    shutil.copy(tmp_path / "new", tmp_path / "existing")
    spy.calls.clear()
    convert([str(src)], str(tmp_path / "existing"), target_format=fmt, skip_create=True)
    assert spy.syncs() == []
    for name in ("new", "existing"):
        run(["qemu-img", "compare", "-F", fmt, str(src), str(tmp_path / name)])


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_under_writeback_flushes_the_target_after_its_last_write(
    qemu_img, tmp_path, monkeypatch, fmt
):
    src = make_source(tmp_path)
    target = tmp_path / "t"
    spy = SyncSpy(monkeypatch)
    convert([str(src)], str(target), target_format=fmt, cache="writeback")
    copy = [
        c
        for c in spy.calls
        if c[1] == os.path.realpath(target) and c[2] != "qimg-convert-create" and c[0] != "fsync"
    ]
    assert copy[-1][0] == "fdatasync"
    if fmt == "raw":  # no metadata to order: the final flush is the only one
        assert [c[0] for c in copy].count("fdatasync") == 1
    run(["qemu-img", "compare", "-F", fmt, str(src), str(target)])


@pytest.mark.parametrize(
    "mode,direct,dsync",
    [
        ("none", True, False),
        ("off", True, False),
        ("writeback", False, False),
        ("writethrough", False, True),
        ("directsync", True, True),
        ("unsafe", False, False),
    ],
)
def test_cache_mode_sets_the_open_flags_on_ext4(tmp_path, mode, direct, dsync):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    image = api.open_image(str(path), "raw", writable=True, cache=mode)
    try:
        flags = fcntl.fcntl(image.storage._fd, fcntl.F_GETFL)
    finally:
        image.close()
    assert bool(flags & os.O_DIRECT) == direct
    assert bool(flags & os.O_DSYNC) == dsync


@pytest.mark.parametrize("mode", CACHE_MODES)
@pytest.mark.parametrize(
    "fmts,cluster_size", [(("qcow2", "raw"), 65536), (("qcow2", "qcow2"), 512)]
)
def test_every_mode_writes_what_qemu_img_reads_back(qemu_img, tmp_path, mode, fmts, cluster_size):
    src = make_source(tmp_path, 65536)
    mid = tmp_path / f"mid.{fmts[1]}"
    opts = ["-o", f"cluster_size={cluster_size}"] if fmts[1] == "qcow2" else []
    qimg("convert", "-t", mode, "-T", mode, "-O", fmts[1], *opts, src, mid)
    back = tmp_path / "back.qcow2"
    # and back into qcow2, reading what was written in the same mode
    qimg("convert", "-t", mode, "-T", mode, "-f", fmts[1], "-O", "qcow2", mid, back)
    for path, fmt in ((mid, fmts[1]), (back, "qcow2")):
        run(["qemu-img", "compare", "-F", fmt, str(src), str(path)])
        if fmt == "qcow2":
            qemu_check_clean(path)
    if fmts[1] == "raw":
        assert mid.stat().st_size == (8 << 20) + 1536  # not rounded to the O_DIRECT block


def test_check_and_amend_take_their_cache_modes(qemu_img, tmp_path):
    src = make_source(tmp_path)
    for mode in CACHE_MODES:
        qimg("check", "-T", mode, "-r", "all", src)
    for mode, compat in (("none", "0.10"), ("unsafe", "1.1"), ("directsync", "0.10")):
        qimg("amend", "-t", mode, "-o", f"compat={compat}", src)
        qemu_check_clean(src)
    ref = tmp_path / "ref"
    ref.mkdir()
    run(["qemu-img", "compare", "-F", "qcow2", str(make_source(ref)), str(src)])


def _both(tmp_dir, args_after_t):
    """qemu-img and qimg convert -t none into tmp_dir: their outcomes."""
    out = []
    for tool, name in ((["qemu-img"], "theirs"), (["python3", "-m", "qimg"], "ours")):
        target = os.path.join(tmp_dir, name)
        proc = run([*tool, "convert", "-t", "none", *args_after_t, target], check=False)
        out.append((proc.returncode, proc.stderr.replace(target, "T").split(": ", 1)[-1]))
    return out


def test_none_on_tmpfs_behaves_as_qemu_img(qemu_img, tmp_path):
    src = make_source(tmp_path)
    shm = f"/dev/shm/qimg-test-{uuid.uuid4().hex}"
    os.mkdir(shm)
    try:
        (theirs, ours) = _both(shm, ["-O", "qcow2", str(src)])
        assert ours == theirs
        if ours[0] == 0:
            run(["qemu-img", "compare", str(src), os.path.join(shm, "ours")])
            qemu_check_clean(os.path.join(shm, "ours"))
    finally:
        shutil.rmtree(shm)


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs mount (a file system that refuses O_DIRECT), unmounted after."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "ramfs", "none", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        message = f"cannot mount ramfs: {proc.stderr.decode().strip()}"
        if IN_CI:
            pytest.fail(message + "; CI=true requires it", pytrace=False)
        pytest.skip(message)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_none_where_the_filesystem_refuses_o_direct_fails_as_qemu_img(qemu_img, tmp_path, ramfs):
    src = make_source(tmp_path)
    (theirs, ours) = _both(str(ramfs), [str(src)])
    assert theirs[0] == 1
    assert ours == theirs  # "Could not open 'T': ... filesystem does not support O_DIRECT"
    # and reading a source there with -T none
    run(["qemu-img", "convert", str(src), str(ramfs / "src.raw")])
    theirs = run(["qemu-img", "convert", "-T", "none", str(ramfs / "src.raw"), str(tmp_path / "a")],
                 check=False)  # fmt: skip
    ours = qimg("convert", "-T", "none", ramfs / "src.raw", tmp_path / "b", check=False)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.split(": ", 1)[1] == theirs.stderr.split(": ", 1)[1]


def test_direct_storage_reads_and_writes_unaligned_requests_as_a_plain_file_does(tmp_path):
    """O_DIRECT's bounce buffer: any offset and length, past the end too."""
    import random

    rng = random.Random(15)
    plain = FileStorage(str(tmp_path / "plain"), create=True, lock=False)
    direct_path = tmp_path / "direct"
    direct_path.touch()
    direct = FileStorage(str(direct_path), True, lock=False, cache=_mode("none"))
    a = DIRECT_ALIGNMENT
    ops = [(0, 10), (a - 3, 7), (5 * a, 2 * a), (3 * a + 1, 6 << 20), (100, a), (9 << 20, 1)]
    ops += [(rng.randrange(10 << 20), rng.randrange(1, 3 * a)) for _ in range(40)]
    for offset, length in ops:
        data = rng.randbytes(length)
        for s in (plain, direct):
            s.pwrite(offset, data)
        assert direct.size() == plain.size()
        lo = max(0, offset - rng.randrange(2 * a))
        n = length + rng.randrange(3 * a)
        assert direct.pread(lo, n) == plain.pread(lo, n)
        buf = bytearray(n + 3)
        view = memoryview(buf)[3:]  # an unaligned buffer
        assert direct.preadv(lo, view) == plain.preadv(lo, bytearray(n))
    end = plain.size()
    assert direct.pread(end - 5, 50) == plain.pread(end - 5, 50)  # zeros past the end
    plain.close()
    direct.close()
    assert (tmp_path / "plain").read_bytes() == direct_path.read_bytes()


def _mode(name):
    from qimg.cachemode import parse_cache_mode

    return parse_cache_mode(name)


def test_a_flush_with_nothing_written_since_the_last_one_is_skipped(
    qemu_img, tmp_path, monkeypatch
):
    """As QEMU's write_gen: `check -r all` of a clean image flushes nothing
    (qemu-img's issues no fdatasync either); a repair is flushed."""
    src = make_source(tmp_path)
    spy = SyncSpy(monkeypatch)
    api.check_image_file(str(src), "qcow2", 3)
    assert spy.syncs() == []
    run(["qemu-img", "resize", "-f", "qcow2", str(src), "16M"])
    image = api.open_image(str(src), "qcow2", writable=True, cache="writeback")
    image.write(10 << 20, b"\1" * 65536)
    image.flush()
    flushed = len(spy.syncs(src))
    assert flushed >= 1
    image.flush()
    image.close()
    assert len(spy.syncs(src)) == flushed
    qemu_check_clean(src)
