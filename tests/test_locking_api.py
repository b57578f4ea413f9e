"""Locking through the public API, judged by qemu-io and qemu-img.

A kept-alive qemu-io holds an image (read-write or read-only); qimg's
writable open is refused and leaves the file byte-for-byte unchanged, and
`qimg info` fails exactly as `qemu-img info` does (and succeeds with -U).
The reverse: while the library holds an image writable, qemu-io's write is
refused.
"""

from __future__ import annotations

import subprocess

import pytest
from conftest import qimg, run
from test_locking import hold, locked_bytes  # noqa: F401  (fixture and helper)

from qimg.api import open_image
from qimg.errors import ImageLockedError


@pytest.fixture
def image(tmp_path, qemu_img) -> str:
    path = str(tmp_path / "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, "4M"])
    run(["qemu-io", "-c", "write -P 7 0 128k", path])
    return path


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("flags", [(), ("-r",)], ids=["qemu-rw", "qemu-ro"])
def test_writable_open_refused_and_file_unchanged(image, hold, flags):  # noqa: F811
    hold(image, "qcow2", *flags)
    before = _read(image)
    with pytest.raises(ImageLockedError) as exc:
        open_image(image, writable=True)
    assert "Is another process using the image" in str(exc.value)
    assert _read(image) == before


@pytest.mark.parametrize("flags", [(), ("-r",)], ids=["qemu-rw", "qemu-ro"])
def test_info_fails_like_qemu_img_and_succeeds_with_force_share(image, hold, flags):  # noqa: F811
    hold(image, "qcow2", *flags)
    ours = qimg("info", image, check=False)
    theirs = run(["qemu-img", "info", image], check=False)
    assert ours.returncode == theirs.returncode
    assert ours.stderr.removeprefix("qimg: ") == theirs.stderr.removeprefix("qemu-img: ")
    ours = qimg("info", "-U", "--output=json", image, check=False)
    assert ours.returncode == 0, ours.stderr
    assert '"virtual-size": 4194304' in ours.stdout


def test_library_read_only_open_shares_with_qemu_reader(image, hold):  # noqa: F811
    hold(image, "qcow2", "-r")
    with open_image(image) as img:
        assert img.read(0, 4) == b"\x07" * 4


def test_qemu_io_write_refused_while_library_holds_image(image):
    before = None
    with open_image(image, writable=True) as img:
        img.write(0, b"\x01" * 512)
        img.flush()
        before = _read(image)
        proc = run(["qemu-io", "-c", "write -P 9 0 4k", image], check=False)
        assert proc.returncode != 0
        assert 'Failed to get "write" lock' in proc.stderr
        assert _read(image) == before
        # A reader that does not share write is refused too; -U is allowed.
        proc = run(["qemu-img", "info", image], check=False)
        assert proc.returncode != 0
        run(["qemu-img", "info", "-U", image])
    proc = run(["qemu-io", "-c", "read -P 1 0 512", image])
    assert "Pattern verification failed" not in proc.stdout


def test_lock_released_on_exception_inside_with_block(image):
    with pytest.raises(RuntimeError):
        with open_image(image, writable=True):
            raise RuntimeError("boom")
    assert locked_bytes(image) == []
    proc = subprocess.run(["qemu-io", "-c", "write -P 3 0 4k", image], capture_output=True)
    assert proc.returncode == 0
