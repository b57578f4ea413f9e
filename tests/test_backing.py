"""Backing chains resolved and read the way QEMU does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import qemu_read_raw, qimg, run

from qimg.api import open_image
from qimg.errors import BackingChainError


def create(path: Path, size: str = "1M", *extra: str) -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size])


def test_relative_backing_name_is_relative_to_the_overlay_directory(
    tmp_path, qemu_img, monkeypatch
):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    base = tmp_path / "images" / "sub" / "base.qcow2"
    create(base)
    run(["qemu-io", "-c", "write -P 0x42 0 64k", str(base)])
    top = tmp_path / "images" / "top.qcow2"
    # The backing name is stored as typed: relative to top's directory.
    run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "sub/base.qcow2", "-F", "qcow2", str(top)]
    )
    monkeypatch.chdir(tmp_path)  # a working directory where the name means nothing
    expected = qemu_read_raw(top, tmp_path, "qcow2")
    with open_image(str(Path("images") / "top.qcow2")) as img:
        assert img.backing is not None
        assert img.read(0, img.size) == expected
    assert expected[:4] == b"\x42" * 4


def test_backing_format_raw_reads_a_qcow2_file_as_raw(tmp_path, qemu_img):
    base = tmp_path / "base.qcow2"
    create(base, "4M")
    run(["qemu-io", "-c", "write -P 0x42 0 64k", str(base)])
    top = tmp_path / "top.qcow2"
    size = os.path.getsize(base)
    size -= size % 512
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            str(base),
            "-F",
            "raw",
            str(top),
            str(size),
        ]
    )
    expected = qemu_read_raw(top, tmp_path, "qcow2")
    assert expected[:4] == b"QFI\xfb"  # the qcow2 header itself, read as raw data
    with open_image(str(top)) as img:
        assert img.backing.format_name == "raw"
        assert img.read(0, img.size) == expected


def test_backing_format_qcow2_over_raw_name_is_honoured(tmp_path, qemu_img):
    base = tmp_path / "base.img"  # a name that says nothing about the format
    create(base, "1M")
    run(["qemu-io", "-c", "write -P 0x17 4096 8k", str(base)])
    top = tmp_path / "top.qcow2"
    create(top, "2M", "-b", str(base), "-F", "qcow2")
    with open_image(str(top)) as img:
        assert img.backing.format_name == "qcow2"
        assert img.read(0, img.size) == qemu_read_raw(top, tmp_path, "qcow2")


def test_three_level_chain_reads_like_qemu(tmp_path, qemu_img):
    a, b, c = (tmp_path / n for n in ("a.qcow2", "b.qcow2", "c.qcow2"))
    create(a, "1M")
    run(["qemu-io", "-c", "write -P 1 0 512k", str(a)])
    create(b, "2M", "-b", "a.qcow2", "-F", "qcow2")
    run(["qemu-io", "-c", "write -P 2 256k 512k", "-c", "write -z 100k 20k", str(b)])
    create(c, "3M", "-b", "b.qcow2", "-F", "qcow2")
    run(["qemu-io", "-c", "write -P 3 700k 10k", "-c", "discard 0 64k", str(c)])
    with open_image(str(c)) as img:
        assert img.read(0, img.size) == qemu_read_raw(c, tmp_path, "qcow2")


def test_backing_loop_gives_a_clean_error(tmp_path, qemu_img):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(a)
    create(b, "1M", "-b", "a.qcow2", "-F", "qcow2")
    # Point a back at b: a -> b -> a.
    run(["qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a)])
    with pytest.raises(BackingChainError, match="loop"):
        open_image(str(a))
    proc = qimg("convert", "-O", "raw", str(a), str(tmp_path / "out.raw"), check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr


def test_self_backing_is_a_loop(tmp_path, qemu_img):
    a = tmp_path / "a.qcow2"
    create(a)
    run(["qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", str(a)])
    with pytest.raises(BackingChainError, match="loop"):
        open_image(str(a))


def test_missing_backing_file_is_a_clean_error(tmp_path, qemu_img):
    top = tmp_path / "top.qcow2"
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            str(top),
            "1M",
        ]
    )
    with pytest.raises(BackingChainError, match="gone.qcow2"):
        open_image(str(top))
    with open_image(str(top), backing=False) as img:
        assert img.backing is None
