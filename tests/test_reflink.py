"""convert shares the source's extents on file systems that can (XFS with
reflink, btrfs), and changes nothing where they cannot (ext4, tmpfs).

Each shared-extent test makes a small file system in a file of its
temporary directory, mounts it on a loop device (root only), converts
there, checks the target against the source and qemu-img's own target
with qemu-img (compare, check, map), and reads the target's extent map
(FIEMAP) for the shared flag. Without root, the mkfs tool or loop devices
the tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from conftest import IN_CI, qemu_check_clean, qemu_json, qimg, run

from qimg import reflink

MiB = 1 << 20
KiB = 1 << 10

# The source's data: (offset, length) random runs; a zero block written
# inside the first (data the zero scan turns into a hole); the rest holes.
DATA_RUNS = [(0, 2 * MiB), (5 * MiB, 1 * MiB)]
ZERO_BLOCK = (MiB, 64 * KiB)
SIZE = 8 * MiB
SHARED = sum(n for _o, n in DATA_RUNS) - ZERO_BLOCK[1]


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(
            f"cannot mount a test file system: {reason}; CI=true requires it", pytrace=False
        )
    pytest.skip(f"cannot mount a test file system: {reason}")


def _mount(fs: str, base) -> str:
    """A fresh `fs` file system of 300 MiB in a file under `base`,
    mounted on a loop device; its mount point."""
    mkfs = shutil.which(f"mkfs.{fs}")
    if os.geteuid() != 0:
        _unavailable("loop mounts need root")
    if mkfs is None:
        _unavailable(f"mkfs.{fs} is not installed ({fs}progs)")
    image, mnt = base / f"{fs}.img", base / f"{fs}-mnt"
    with open(image, "wb") as f:
        f.truncate(300 * MiB)
    mnt.mkdir()
    opts = ["-m", "reflink=1"] if fs == "xfs" else []
    for cmd in ([mkfs, "-q", *opts, str(image)], ["mount", "-o", "loop", str(image), str(mnt)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            _unavailable(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return str(mnt)


@pytest.fixture(params=["xfs", "btrfs"])
def shared_fs(request, tmp_path):
    """A mounted file system that shares extents, unmounted after the test
    whatever its outcome."""
    mnt = _mount(request.param, tmp_path)
    try:
        yield mnt
    finally:
        proc = subprocess.run(["umount", mnt], capture_output=True, text=True)
        if proc.returncode:
            subprocess.run(["umount", "-l", mnt], capture_output=True)


def write_source(
    path: str, size: int, runs: list[tuple[int, int]], zero_block: tuple[int, int] | None = None
) -> None:
    """A sparse raw file of `size` bytes: random data in each (offset,
    length) of `runs`, then `zero_block` (offset, length) written as zeros."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in runs:
            os.pwrite(f.fileno(), os.urandom(n), off)
        if zero_block is not None:
            os.pwrite(f.fileno(), bytes(zero_block[1]), zero_block[0])


def _make_source(path: str) -> None:
    write_source(path, SIZE, DATA_RUNS, ZERO_BLOCK)


def qemu_map(path: str, fmt: str) -> list[tuple]:
    """qemu-img map's (start, length, data, zero), host offsets left out."""
    return [
        (e["start"], e["length"], e["data"], e["zero"])
        for e in qemu_json("map", "--output=json", "-f", fmt, path)
    ]


def _convert_beside_qemu(mnt: str, src: str, fmt: str, *opts: str) -> tuple[str, str]:
    """`convert -O fmt opts src` by qimg and by qemu-img on the mounted
    file system: (ours, theirs), both compared equal to the source."""
    ours, theirs = os.path.join(mnt, f"ours.{fmt}"), os.path.join(mnt, f"theirs.{fmt}")
    qimg("convert", "-O", fmt, *opts, src, ours)
    run(["qemu-img", "convert", "-O", fmt, *opts, src, theirs])
    run(["qemu-img", "compare", src, ours])
    if fmt == "qcow2":
        qemu_check_clean(ours)
    return ours, theirs


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_of_raw_shares_what_the_zero_scan_calls_data(shared_fs, fmt, qemu_img):
    src = os.path.join(shared_fs, "src.raw")
    _make_source(src)
    ours, theirs = _convert_beside_qemu(shared_fs, src, fmt)
    # Data shared, the zero block inside it left a hole as qemu-img leaves it.
    assert reflink.shared_bytes(ours) == SHARED
    assert qemu_map(ours, fmt) == qemu_map(theirs, fmt)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_of_plain_qcow2_clusters_shares_them(shared_fs, fmt, qemu_img):
    raw = os.path.join(shared_fs, "src.raw")
    _make_source(raw)
    src = os.path.join(shared_fs, "src.qcow2")
    run(["qemu-img", "convert", "-O", "qcow2", "-S", "0", raw, src])  # zero block stored as data
    ours, theirs = _convert_beside_qemu(shared_fs, src, fmt)
    assert reflink.shared_bytes(ours) == SHARED
    assert qemu_map(ours, fmt) == qemu_map(theirs, fmt)


def test_convert_of_compressed_clusters_shares_nothing(shared_fs, qemu_img):
    raw = os.path.join(shared_fs, "src.raw")
    with open(raw, "wb") as f:  # compressible: every cluster is stored compressed
        f.write(b"compressible cluster " * (4 * MiB // 21))
    src = os.path.join(shared_fs, "src.qcow2")
    run(["qemu-img", "convert", "-O", "qcow2", "-c", raw, src])
    ours, _theirs = _convert_beside_qemu(shared_fs, src, "raw")
    assert reflink.shared_bytes(ours) == 0


def test_compressed_target_shares_nothing(shared_fs, qemu_img):
    src = os.path.join(shared_fs, "src.raw")
    _make_source(src)
    ours, _theirs = _convert_beside_qemu(shared_fs, src, "qcow2", "-c")
    assert reflink.shared_bytes(ours) == 0
    assert reflink.shared_bytes(src) == 0


def test_data_file_raw_target_shares_into_its_data_file(shared_fs, qemu_img):
    src = os.path.join(shared_fs, "src.raw")
    _make_source(src)
    data = os.path.join(shared_fs, "ours.data")
    ours = os.path.join(shared_fs, "ours.qcow2")
    qimg("convert", "-O", "qcow2", "-o", f"data_file={data},data_file_raw=on", src, ours)
    run(["qemu-img", "compare", src, ours])
    qemu_check_clean(ours)
    assert reflink.shared_bytes(data) == SHARED
    assert reflink.shared_bytes(ours) == 0  # metadata only


def test_convert_of_a_data_file_raw_image_shares_its_data_file(shared_fs, qemu_img):
    raw = os.path.join(shared_fs, "src.raw")
    _make_source(raw)
    data, src = os.path.join(shared_fs, "src.data"), os.path.join(shared_fs, "src.qcow2")
    run(
        ["qemu-img", "convert", "-O", "qcow2", "-o", f"data_file={data},data_file_raw=on", raw, src]
    )
    ours, theirs = _convert_beside_qemu(shared_fs, src, "raw")
    assert reflink.shared_bytes(ours) == SHARED
    assert qemu_map(ours, "raw") == qemu_map(theirs, "raw")


def test_with_minus_S_0_only_the_source_data_is_shared_and_the_rest_allocated(shared_fs, qemu_img):
    src = os.path.join(shared_fs, "src.raw")
    _make_source(src)
    ours, theirs = _convert_beside_qemu(shared_fs, src, "raw", "-S", "0")
    assert reflink.shared_bytes(ours) == SHARED + ZERO_BLOCK[1]  # no zero scan: all data
    assert qemu_map(ours, "raw") == qemu_map(theirs, "raw")


def test_writes_after_sharing_leave_the_other_file_as_it_was(shared_fs, qemu_img):
    src = os.path.join(shared_fs, "src.raw")
    _make_source(src)
    with open(src, "rb") as f:
        before = f.read()
    ours, _theirs = _convert_beside_qemu(shared_fs, src, "qcow2")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 128k", ours])
    with open(src, "rb") as f:
        assert f.read() == before
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xa5 5M 64k", src])
    expected = bytearray(before)
    expected[: 128 * KiB] = b"\x5a" * (128 * KiB)
    raw = os.path.join(shared_fs, "back.raw")
    run(["qemu-img", "convert", "-O", "raw", ours, raw])
    with open(raw, "rb") as f:
        assert f.read() == bytes(expected)
