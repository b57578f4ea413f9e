"""`qimg info` describes images made by qemu-img and qemu-io as qemu-img does.

Every scenario builds its images with the QEMU tools only, then compares
`info --output=json` (with and without --backing-chain) as whole dicts
except actual-size, and the human output line by line except "disk size".
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest
from infotools import (
    assert_same_info,
    human_facts,
    message,
    qemu_in,
    qimg_in,
)

pytestmark = pytest.mark.usefixtures("qemu_img", "qemu_io")


def img(cwd: Path, *args: str) -> None:
    qemu_in(cwd, "qemu-img", *args, check=True)


def io(cwd: Path, name: str, *cmds: str, fmt: str = "qcow2") -> None:
    args = ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    qemu_in(cwd, "qemu-io", *args, name, check=True)


def assert_same_human(cwd: Path, name: str, *extra: str) -> None:
    q = qemu_in(cwd, "qemu-img", "info", *extra, name, check=True)
    m = qimg_in(cwd, "info", *extra, name, check=True)
    assert human_facts(m.stdout) == human_facts(q.stdout)


def assert_same_everywhere(cwd: Path, name: str, *extra: str) -> None:
    assert_same_info(cwd, name, *extra)
    assert_same_info(cwd, name, "--backing-chain", *extra)
    assert_same_human(cwd, name, *extra)
    assert_same_human(cwd, name, "--backing-chain", *extra)


# --- scenarios: each builds "t.qcow2" (or names its image) in `d` -------------


def _plain_data(d: Path) -> str:
    img(d, "create", "-q", "-f", "qcow2", "t.qcow2", "5M")
    io(d, "t.qcow2", "write -P 0xab 0 1M", "write -P 0xcd 3M 65k")
    return "t.qcow2"


def _grid_like(opts: str):
    def build(d: Path) -> str:
        img(d, "create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", "3M")
        io(d, "t.qcow2", "write -P 1 0 100k", "write -z 1M 64k", "discard 0 4k")
        return "t.qcow2"

    return build


def _compressed(ctype: str):
    def build(d: Path) -> str:
        img(d, "create", "-q", "-f", "qcow2", "src.qcow2", "2M")
        io(d, "src.qcow2", "write -P 7 0 1M")
        img(
            d,
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            f"compression_type={ctype}",
            "src.qcow2",
            "t.qcow2",
        )
        return "t.qcow2"

    return build


def _zero_clusters(d: Path) -> str:
    img(d, "create", "-q", "-f", "qcow2", "t.qcow2", "4M")
    io(d, "t.qcow2", "write -P 1 0 2M", "write -z 0 1M", "write -z -u 1M 64k", "write -z 3M 1M")
    return "t.qcow2"


def _subclusters(d: Path) -> str:
    img(d, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", "t.qcow2", "4M")
    io(d, "t.qcow2", "write -P 1 0 2k", "write -P 2 70k 4k", "write -z 200k 8k")
    return "t.qcow2"


def _snapshots(d: Path) -> str:
    img(d, "create", "-q", "-f", "qcow2", "t.qcow2", "4M")
    for i, name in enumerate(["first", "second snapshot", "a-much-longer-snapshot-name"]):
        io(d, "t.qcow2", f"write -P {i + 1} {i}M 64k")
        img(d, "snapshot", "-c", name, "t.qcow2")
    img(d, "snapshot", "-d", "second snapshot", "t.qcow2")
    img(d, "snapshot", "-c", "last", "t.qcow2")
    return "t.qcow2"


def _snapshots_v2(d: Path) -> str:
    img(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "t.qcow2", "4M")
    io(d, "t.qcow2", "write -P 1 0 64k")
    img(d, "snapshot", "-c", "s1", "t.qcow2")
    img(d, "snapshot", "-c", "s2", "t.qcow2")
    return "t.qcow2"


def _bitmaps(d: Path) -> str:
    img(d, "create", "-q", "-f", "qcow2", "t.qcow2", "4M")
    img(d, "bitmap", "--add", "t.qcow2", "b0")
    img(d, "bitmap", "--add", "-g", "128k", "t.qcow2", "coarse")
    img(d, "bitmap", "--add", "-g", "512", "t.qcow2", "fine")
    img(d, "bitmap", "--disable", "t.qcow2", "coarse")
    io(d, "t.qcow2", "write -P 3 0 300k")
    return "t.qcow2"


def _chain(top_dir: str, mid_fmt: str, absolute: bool):
    """base (raw) <- mid (raw or qcow2) <- top, in subdirectories."""

    def build(d: Path) -> str:
        (d / "lower").mkdir()
        (d / "lower" / "deeper").mkdir()
        (d / top_dir).mkdir(parents=True, exist_ok=True)
        img(d, "create", "-q", "-f", "raw", "lower/deeper/base.raw", "3M")
        io(d, "lower/deeper/base.raw", "write -P 1 0 1M", fmt="raw")
        if mid_fmt == "qcow2":
            base_name = str(d / "lower/deeper/base.raw") if absolute else "deeper/base.raw"
            img(d, "create", "-q", "-f", "qcow2", "-b", base_name, "-F", "raw", "lower/mid.qcow2")
            io(d, "lower/mid.qcow2", "write -P 2 1M 64k")
            mid = "lower/mid.qcow2"
        else:
            mid = "lower/deeper/base.raw"
        mid_name = str(d / mid) if absolute else os.path.relpath(d / mid, d / top_dir)
        img(d, "create", "-q", "-f", "qcow2", "-b", mid_name, "-F", mid_fmt, f"{top_dir}/t.qcow2")
        io(d, f"{top_dir}/t.qcow2", "write -P 3 2M 4k")
        return f"{top_dir}/t.qcow2"

    return build


def _data_file(raw: bool):
    def build(d: Path) -> str:
        opts = "data_file=t.data" + (",data_file_raw=on" if raw else "")
        img(d, "create", "-q", "-f", "qcow2", "-o", opts, "t.qcow2", "3M")
        io(d, "t.qcow2", "write -P 9 0 128k")
        return "t.qcow2"

    return build


def _lazy_dirty(d: Path) -> str:
    img(d, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "t.qcow2", "3M")
    io(d, "t.qcow2", "write -P 9 0 128k")
    # What a crash leaves: the dirty bit set (incompatible_features bit 0).
    with open(d / "t.qcow2", "r+b") as f:
        f.seek(72)
        (incompat,) = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", incompat | 1))
    return "t.qcow2"


def _v2_backing(d: Path) -> str:
    img(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "b.qcow2", "3M")
    img(
        d,
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "t.qcow2",
    )
    io(d, "t.qcow2", "write -P 9 0 128k")
    return "t.qcow2"


def _raw(d: Path) -> str:
    img(d, "create", "-q", "-f", "raw", "t.raw", "1537k")
    io(d, "t.raw", "write -P 1 0 4k", fmt="raw")
    return "t.raw"


SCENARIOS = {
    "plain-data": _plain_data,
    "v2-512": _grid_like("compat=0.10,cluster_size=512"),
    "rc1-4k-lazy": _grid_like("refcount_bits=1,cluster_size=4k,lazy_refcounts=on"),
    "rc2-2M-extl2": _grid_like("refcount_bits=2,cluster_size=2M,extended_l2=on"),
    "rc4-metadata": _grid_like("refcount_bits=4,preallocation=metadata"),
    "rc8-falloc-16k": _grid_like("refcount_bits=8,preallocation=falloc,cluster_size=16k"),
    "rc32-full": _grid_like("refcount_bits=32,preallocation=full,cluster_size=32k"),
    "rc64-zstd": _grid_like("refcount_bits=64,compression_type=zstd"),
    "compressed-zlib": _compressed("zlib"),
    "compressed-zstd": _compressed("zstd"),
    "zero-clusters": _zero_clusters,
    "subclusters": _subclusters,
    "snapshots": _snapshots,
    "snapshots-v2": _snapshots_v2,
    "bitmaps": _bitmaps,
    "chain-qcow2-relative": _chain("top", "qcow2", absolute=False),
    "chain-qcow2-absolute": _chain("top", "qcow2", absolute=True),
    "chain-raw-relative": _chain("top/inner", "raw", absolute=False),
    "chain-same-dir": _chain("lower", "qcow2", absolute=False),
    "data-file": _data_file(raw=False),
    "data-file-raw": _data_file(raw=True),
    "lazy-dirty": _lazy_dirty,
    "v2-backing": _v2_backing,
    "raw": _raw,
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_info_matches_qemu_img(tmp_path, name):
    image = SCENARIOS[name](tmp_path)
    assert_same_everywhere(tmp_path, image)


def test_info_of_chain_by_absolute_path(tmp_path):
    image = _chain("top", "qcow2", absolute=False)(tmp_path)
    assert_same_everywhere(tmp_path, str(tmp_path / image))


def test_info_with_explicit_format(tmp_path):
    image = _plain_data(tmp_path)
    assert_same_everywhere(tmp_path, image, "-f", "qcow2")
    assert_same_info(tmp_path, image, "-f", "raw")


def test_dirty_flag_reported(tmp_path):
    image = _lazy_dirty(tmp_path)
    info = assert_same_info(tmp_path, image)
    assert info["dirty-flag"] is True


def test_info_of_missing_file_fails_as_qemu_img_does(tmp_path):
    q = qemu_in(tmp_path, "qemu-img", "info", "nope.qcow2")
    m = qimg_in(tmp_path, "info", "nope.qcow2")
    assert q.returncode == m.returncode == 1
    assert message(m.stderr, "qimg") == message(q.stderr, "qemu-img")


def test_info_of_a_broken_chain_needs_backing_only_with_backing_chain(tmp_path):
    img(tmp_path, "create", "-q", "-f", "qcow2", "b.qcow2", "1M")
    img(tmp_path, "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2")
    (tmp_path / "b.qcow2").unlink()
    assert_same_info(tmp_path, "t.qcow2")
    q = qemu_in(tmp_path, "qemu-img", "info", "--backing-chain", "t.qcow2")
    m = qimg_in(tmp_path, "info", "--backing-chain", "t.qcow2")
    assert q.returncode != 0 and m.returncode != 0
    assert m.stderr.count("\n") == 1 and m.stderr.startswith("qimg: ")


@pytest.fixture
def held(tmp_path):
    """t.qcow2 held open read-write by a live qemu-io (stdin kept open)."""
    image = _snapshots(tmp_path)
    proc = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", image],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdin.write("write -P 5 0 4k\n")
    proc.stdin.flush()
    # Wait until qemu-io has opened the image (its lock is visible).
    for _ in range(100):
        if qemu_in(tmp_path, "qemu-img", "info", image).returncode != 0:
            break
        import time

        time.sleep(0.05)
    yield tmp_path, image
    proc.stdin.close()
    proc.wait(timeout=10)


def test_info_of_an_image_in_use(held):
    d, image = held
    q = qemu_in(d, "qemu-img", "info", image)
    m = qimg_in(d, "info", image)
    assert q.returncode == m.returncode == 1
    assert message(m.stderr, "qimg") == message(q.stderr, "qemu-img")
    assert_same_info(d, image, "-U")
    assert_same_human(d, image, "-U")
