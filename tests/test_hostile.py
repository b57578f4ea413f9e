"""Hostile qcow2 images: `qimg info` fails fast, in one line, in bounded memory.

Each image is a qemu-img-made image with one header field broken. qimg must
exit non-zero with exactly one stderr line starting "qimg: " (no traceback),
under a 512 MiB address-space limit, within a generous hang guard. Where
qemu-img also refuses the image the exit codes agree, and where the error is
the same kind the text after "Could not open 'X': " is equal.
"""

from __future__ import annotations

import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from infotools import assert_same_info, message, qemu_in

import qimg
from qimg.errors import BackingChainError, QimgError

pytestmark = pytest.mark.usefixtures("qemu_img")

HANG_GUARD = 5.0  # seconds; a guard against hangs, not a speed test
MEMORY_LIMIT = 512 << 20

FEATURE_TABLE_MAGIC = 0x6803F857


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def qimg_limited(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "qimg", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit,
    )
    return proc, time.monotonic() - start


def _base(d: Path, opts: str = "cluster_size=64k") -> Path:
    qemu_in(d, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", "1M", check=True)
    return d / "t.qcow2"


def _patch(*fields: tuple[str, int, int]):
    """An image with header fields (struct format, offset, value) overwritten."""

    def build(d: Path) -> None:
        path = _base(d)
        with open(path, "r+b") as f:
            for fmt, offset, value in fields:
                f.seek(offset)
                f.write(struct.pack(fmt, value))

    return build


def _truncated(d: Path) -> None:
    path = _base(d)
    path.write_bytes(path.read_bytes()[:50])


def _wrong_magic(d: Path) -> None:
    path = _base(d)
    data = bytearray(path.read_bytes())
    data[0:4] = b"QFI\xfc"
    path.write_bytes(bytes(data))


def _unknown_incompat(named: bool):
    def build(d: Path) -> None:
        path = _base(d)
        data = bytearray(path.read_bytes())
        struct.pack_into(">Q", data, 72, 1 << 20)
        if named:
            # Turn the table's last entry into one naming bit 20.
            pos = struct.unpack_from(">I", data, 100)[0]
            while True:
                magic, length = struct.unpack_from(">II", data, pos)
                assert magic, "no feature table"
                if magic == FEATURE_TABLE_MAGIC:
                    last = pos + 8 + length - 48
                    struct.pack_into(">BB46s", data, last, 0, 20, b"my fancy feature")
                    break
                pos += 8 + ((length + 7) & ~7)
        path.write_bytes(bytes(data))

    return build


HOSTILE = {
    "truncated-header": _truncated,
    "wrong-magic": _wrong_magic,
    "version-1": _patch((">I", 4, 1)),
    "version-4": _patch((">I", 4, 4)),
    "cluster-bits-8": _patch((">I", 20, 8)),
    "cluster-bits-22": _patch((">I", 20, 22)),
    "cluster-bits-255": _patch((">I", 20, 255)),
    "huge-l1-size": _patch((">I", 36, 0xFFFFFFFF)),
    "l1-table-past-eof": _patch((">I", 36, 0x300000)),
    "l1-offset-unaligned": _patch((">Q", 40, 0x30001)),
    "huge-refcount-table-clusters": _patch((">I", 56, 0xFFFFFF)),
    "refcount-table-unaligned": _patch((">Q", 48, 0x10008)),
    "huge-nb-snapshots": _patch((">I", 60, 0xFFFFFFFF)),
    "header-length-too-small": _patch((">I", 100, 50)),
    "header-length-too-big": _patch((">I", 100, 0x20000)),
    "backing-offset-out-of-range": _patch((">Q", 8, 0x100000)),
    "backing-size-out-of-range": _patch((">Q", 8, 0x1000), (">I", 16, 5000)),
    "backing-name-past-cluster": _patch((">Q", 8, 0xFF00), (">I", 16, 0x200)),
    "unknown-incompatible-bit": _unknown_incompat(named=False),
    "unknown-incompatible-bit-named": _unknown_incompat(named=True),
    "refcount-order-7": _patch((">I", 96, 7)),
    "huge-virtual-size": _patch((">Q", 24, 1 << 63)),
}


def _after_open(text: str) -> str:
    """The error text after "Could not open 'X': " (the kind of error)."""
    text = message(text, "qemu-img")
    text = message(text, "qimg")
    if text.startswith("Could not open '"):
        text = text.split("': ", 1)[1]
    return text


# Broken, but qemu-img opens them (tables past the end of the file read as
# zeros); qimg must then describe them identically (their data is compared
# with qemu-img's in test_truncated_qemu_parity.py).
QEMU_INFO_ACCEPTS = {"l1-table-past-eof"}  # snapshot table: test_header_qemu_parity.py


@pytest.mark.parametrize("name", sorted(set(HOSTILE) - QEMU_INFO_ACCEPTS))
def test_hostile_image_gives_one_line_error_fast_and_small(tmp_path, name):
    HOSTILE[name](tmp_path)
    proc, wall = qimg_limited(tmp_path, "info", "-f", "qcow2", "t.qcow2")
    assert wall < HANG_GUARD
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qimg: "), proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    q = qemu_in(tmp_path, "qemu-img", "info", "-f", "qcow2", "t.qcow2")
    if q.returncode != 0:
        assert _after_open(proc.stderr) == _after_open(q.stderr)


@pytest.mark.parametrize("name", sorted(QEMU_INFO_ACCEPTS))
def test_broken_image_qemu_img_describes_is_described_alike(tmp_path, name):
    HOSTILE[name](tmp_path)
    proc, wall = qimg_limited(tmp_path, "info", "--output=json", "t.qcow2")
    assert wall < HANG_GUARD
    assert proc.returncode == 0, proc.stderr
    assert_same_info(tmp_path, "t.qcow2")


@pytest.mark.parametrize("named", [False, True])
def test_unknown_incompatible_feature_is_named(tmp_path, named):
    _unknown_incompat(named)(tmp_path)
    proc, _ = qimg_limited(tmp_path, "info", "t.qcow2")
    expected = "my fancy feature" if named else "Unknown incompatible feature: 100000"
    assert expected in proc.stderr


@pytest.fixture
def loop(tmp_path) -> Path:
    """a.qcow2 -> b.qcow2 -> a.qcow2."""
    for name, backing in (("a", "b"), ("b", "a")):
        qemu_in(
            tmp_path,
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            f"{backing}.qcow2",
            "-F",
            "qcow2",
            f"{name}.qcow2",
            "1M",
            check=True,
        )
    return tmp_path


def test_backing_loop_info_without_chain_succeeds_like_qemu_img(loop):
    q = qemu_in(loop, "qemu-img", "info", "--output=json", "a.qcow2")
    proc, wall = qimg_limited(loop, "info", "--output=json", "a.qcow2")
    assert q.returncode == proc.returncode == 0
    assert wall < HANG_GUARD


def test_backing_loop_is_detected_by_info_backing_chain(loop):
    proc, wall = qimg_limited(loop, "info", "--backing-chain", "a.qcow2")
    assert wall < HANG_GUARD
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qimg: ") and "loop" in lines[0]
    q = qemu_in(loop, "qemu-img", "info", "--backing-chain", "a.qcow2")  # 2 GiB limit
    assert q.returncode != 0
    assert message(proc.stderr, "qimg") == message(q.stderr, "qemu-img")


def test_backing_loop_is_detected_when_opening_for_read(loop):
    with pytest.raises(BackingChainError, match="loop"):
        qimg.open_image(str(loop / "a.qcow2"))


LIBRARY_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=LIBRARY_XFAIL[n], strict=True))
        if n in LIBRARY_XFAIL
        else n
        for n in sorted(set(HOSTILE) - QEMU_INFO_ACCEPTS)
    ],
)
def test_hostile_image_refused_by_the_library_too(tmp_path, name):
    HOSTILE[name](tmp_path)
    with pytest.raises(QimgError):
        with qimg.open_image(str(tmp_path / "t.qcow2"), "qcow2") as img:
            img.read(0, 65536)
