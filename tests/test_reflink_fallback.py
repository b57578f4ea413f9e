"""Where the file system cannot share extents (ext4, tmpfs), convert asks
once per target, then copies: the output is what qemu-img writes."""

from __future__ import annotations

import filecmp
import os

import pytest
from conftest import qemu_check_clean, qimg, run
from test_reflink import qemu_map, write_source

from qimg import reflink
from qimg.storage import FileStorage

MiB = 1 << 20


def _fs_type(path) -> str:
    with open("/proc/mounts") as f:
        mounts = [line.split() for line in f]
    path = os.path.realpath(path)
    best = max(
        (m for m in mounts if path.startswith(m[1].rstrip("/") + "/")), key=lambda m: len(m[1])
    )
    return best[2]


def _make_source(path) -> None:
    write_source(path, 8 * MiB, [(0, 2 * MiB), (5 * MiB, MiB)], (MiB, 64 << 10))


@pytest.fixture
def ext4_dir(tmp_path):
    if _fs_type(tmp_path) != "ext4":
        pytest.skip(f"{tmp_path} is not on ext4")
    return tmp_path


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_on_ext4_convert_copies_and_writes_what_qemu_img_writes(ext4_dir, fmt, qemu_img):
    src = ext4_dir / "src.raw"
    _make_source(src)
    ours, theirs = ext4_dir / f"ours.{fmt}", ext4_dir / f"theirs.{fmt}"
    qimg("convert", "-O", fmt, src, ours)
    run(["qemu-img", "convert", "-O", fmt, str(src), str(theirs)])
    run(["qemu-img", "compare", str(src), str(ours)])
    assert qemu_map(ours, fmt) == qemu_map(theirs, fmt)
    if fmt == "raw":
        assert filecmp.cmp(ours, theirs, shallow=False)
    else:
        qemu_check_clean(ours)
    assert reflink.shared_bytes(str(ours)) == 0


@pytest.mark.parametrize("where", ["ext4", "tmpfs"])
def test_a_target_that_cannot_share_is_asked_once(tmp_path, where, monkeypatch):
    if where == "tmpfs":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        base = tmp_path_shm = os.path.join("/dev/shm", f"qimg-reflink-{os.getpid()}")
        os.makedirs(tmp_path_shm, exist_ok=True)
    else:
        if _fs_type(tmp_path) != "ext4":
            pytest.skip(f"{tmp_path} is not on ext4")
        base = str(tmp_path)
    calls = []
    clone = reflink.clone_range

    def counted(*args):
        calls.append(args)
        return clone(*args)

    monkeypatch.setattr(reflink, "clone_range", counted)
    from qimg.convert import convert

    try:
        src, out = os.path.join(base, "src.raw"), os.path.join(base, "out.qcow2")
        _make_source(src)
        convert([src], out, target_format="qcow2")
        run(["qemu-img", "compare", src, out])
        assert len(calls) == 1
    finally:
        if where == "tmpfs":
            for name in ("src.raw", "out.qcow2"):
                if os.path.exists(os.path.join(base, name)):
                    os.unlink(os.path.join(base, name))
            os.rmdir(base)


def test_share_from_declines_without_writing_where_the_file_system_cannot(tmp_path):
    src_path, dst_path = tmp_path / "a", tmp_path / "b"
    src_path.write_bytes(os.urandom(64 << 10))
    dst_path.write_bytes(bytes(64 << 10))
    src, dst = FileStorage(str(src_path), lock=False), FileStorage(str(dst_path), True, lock=False)
    try:
        data = src.pread(0, 64 << 10)
        if dst.share_from(src, 0, 0, data):
            pytest.skip(f"{tmp_path} shares extents")
        assert dst.pread(0, 64 << 10) == bytes(64 << 10)
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize(
    ("src_off", "dst_off", "length", "src_size", "part"),
    [
        (0, 0, 8192, 8192, (0, 8192)),  # whole blocks
        (100, 100, 8192, 1 << 20, (3996, 8092)),  # head and tail written
        (0, 512, 8192, 1 << 20, (0, 0)),  # offsets not congruent: nothing
        (0, 0, 10000, 6000, (0, 4096)),  # not past the source's end
        (4096, 4096, 1000, 1 << 20, (0, 0)),  # less than a block
    ],
)
def test_aligned_part_is_whole_blocks_inside_the_source(src_off, dst_off, length, src_size, part):
    assert reflink.aligned_part(src_off, dst_off, length, src_size, 4096) == part
