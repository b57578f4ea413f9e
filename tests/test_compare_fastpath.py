"""compare's fast paths judged by qemu-img compare at run time: buffers
compared with memcmp (and with numpy where there is no C library to ask),
a side whose block status reads zeros not read (only the other checked for
zeros), runs of chunks mapped whole; a difference at the first byte, the
last byte, inside a zero-vs-data region, on either side of a chunk
boundary, and past the end of the shorter image."""

from __future__ import annotations

from pathlib import Path

import pytest
from chaintools import compare_both, img, io
from conftest import require_tool

import qimg.compare

MiB = 1 << 20
SIZE = 12 * MiB
# One byte changed in a copy of base.raw at each offset: the first byte,
# both sides of the 2 MiB chunk boundaries inside the long data run, the
# last byte of a compressed cluster, inside the raw hole at 5 MiB (where
# the qcow2 copies hold nothing and zeros.qcow2 holds zero data), in the
# short run at 6 MiB and the image's last byte.
DIFF_OFFSETS = (0, 2 * MiB - 1, 2 * MiB, 4 * MiB + 65535, 5 * MiB + 1234, 6 * MiB + 4096, SIZE - 1)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("cmpfast")
    img(d, "create", "-q", "-f", "raw", "base.raw", str(SIZE))
    # A 5 MiB run of data (chunks of 2 MiB), a hole, a short run, a hole,
    # data up to the last byte.
    io(
        d,
        "base.raw",
        "write -P 17 0 5M",
        f"write -P 18 {6 * MiB} 64k",
        f"write -P 19 {SIZE - MiB} 1M",
        fmt="raw",
    )
    img(d, "convert", "-O", "qcow2", "base.raw", "base.qcow2")
    img(d, "convert", "-c", "-O", "qcow2", "base.raw", "zlib.qcow2")
    # Every cluster allocated: the raw holes are data of zeros here.
    img(d, "convert", "-S", "0", "-O", "qcow2", "base.raw", "zeros.qcow2")
    # Zero clusters over data: zero (not read) on one side, data on the other.
    img(d, "convert", "-O", "qcow2", "base.raw", "zc.qcow2")
    io(d, "zc.qcow2", f"write -z {3 * MiB} 64k", f"write -z -u {6 * MiB} 64k", fmt="qcow2")
    img(d, "convert", "-O", "raw", "base.raw", "zc.raw")
    io(d, "zc.raw", f"write -z {3 * MiB} 64k", f"write -z {6 * MiB} 64k", fmt="raw")
    for off in DIFF_OFFSETS:
        img(d, "convert", "-O", "raw", "base.raw", f"d{off}.raw")
        io(d, f"d{off}.raw", f"write -P 200 {off} 1", fmt="raw")
    # Longer images: zeros past the shorter one's end, or data there.
    img(d, "create", "-q", "-f", "qcow2", "long.qcow2", str(SIZE + 4 * MiB))
    img(d, "convert", "-n", "-O", "qcow2", "base.raw", "long.qcow2")
    img(d, "create", "-q", "-f", "qcow2", "longd.qcow2", str(SIZE + 4 * MiB))
    img(d, "convert", "-n", "-O", "qcow2", "base.raw", "longd.qcow2")
    io(d, "longd.qcow2", f"write -P 5 {SIZE + 3 * MiB + 7} 1", fmt="qcow2")
    img(d, "create", "-q", "-f", "raw", "longz.raw", str(SIZE + 4 * MiB))
    img(d, "convert", "-n", "-O", "raw", "base.raw", "longz.raw")
    io(d, "longz.raw", f"write -z {SIZE} 1M", fmt="raw")  # zeros written as data
    return d


COPIES = ("base.raw", "base.qcow2", "zlib.qcow2", "zeros.qcow2")
DIFF_PAIRS = [(f"d{off}.raw", copy) for off in DIFF_OFFSETS for copy in COPIES]
SHAPE_PAIRS = [
    ("base.raw", "base.qcow2"),
    ("base.raw", "zlib.qcow2"),
    ("base.raw", "zeros.qcow2"),
    ("zlib.qcow2", "zeros.qcow2"),
    ("zc.qcow2", "base.raw"),
    ("zc.qcow2", "zc.raw"),
    ("zc.qcow2", "zeros.qcow2"),
    ("zc.raw", "zlib.qcow2"),
    ("base.raw", "long.qcow2"),
    ("base.raw", "longd.qcow2"),
    ("base.qcow2", "longz.raw"),
    ("zlib.qcow2", "longd.qcow2"),
]


def _ids(pairs):
    return ["-".join(p) for p in pairs]


@pytest.mark.parametrize("pair", DIFF_PAIRS, ids=_ids(DIFF_PAIRS))
def test_compare_names_the_first_difference_as_qemu_img(images, pair):
    for args in (pair, pair[::-1]):
        theirs, ours = compare_both(images, *args)
        assert ours == theirs, args


@pytest.mark.parametrize("pair", SHAPE_PAIRS, ids=_ids(SHAPE_PAIRS))
def test_compare_of_zero_and_data_regions_and_other_sizes_matches_qemu_img(images, pair):
    for args in (pair, pair[::-1], ("-s", *pair), ("-q", *pair)):
        theirs, ours = compare_both(images, *args)
        assert ours == theirs, args


NUMPY_PAIRS = [("d0.raw", "zeros.qcow2"), (f"d{SIZE - 1}.raw", "zlib.qcow2"), *SHAPE_PAIRS[:8]]


@pytest.mark.parametrize("pair", NUMPY_PAIRS, ids=_ids(NUMPY_PAIRS))
def test_compare_without_memcmp_matches_qemu_img(images, pair, monkeypatch):
    monkeypatch.setattr(qimg.compare, "_memcmp", lambda: None)
    for args in (pair, pair[::-1]):
        theirs, ours = compare_both(images, *args)
        assert ours == theirs, args


@pytest.fixture(scope="module")
def windows(tmp_path_factory) -> Path:
    """Images longer than compare's first block status windows (32 MiB,
    then 128 MiB more), with data runs across their ends."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("cmpwindows")
    img(d, "create", "-q", "-f", "raw", "w.raw", str(200 * MiB))
    io(d, "w.raw", f"write -P 21 {31 * MiB} 3M", f"write -P 22 {159 * MiB + 4096} 2M", fmt="raw")
    for name, opts in (
        ("w.qcow2", []),
        ("wz.qcow2", ["-c"]),
        ("wx.qcow2", ["-o", "extended_l2=on,cluster_size=128k"]),
    ):
        img(d, "convert", "-O", "qcow2", *opts, "w.raw", name)
    for off in (32 * MiB - 1, 32 * MiB + 5, 160 * MiB - 1, 160 * MiB + 4096):
        img(d, "convert", "-O", "raw", "w.raw", f"w{off}.raw")
        io(d, f"w{off}.raw", f"write -P 200 {off} 1", fmt="raw")
    return d


WINDOW_PAIRS = [
    ("w.raw", "w.qcow2"),
    ("w.raw", "wz.qcow2"),
    ("wx.qcow2", "w.qcow2"),
    *[
        (f"w{off}.raw", copy)
        for off in (32 * MiB - 1, 32 * MiB + 5, 160 * MiB - 1, 160 * MiB + 4096)
        for copy in ("w.qcow2", "wz.qcow2")
    ],
]


@pytest.mark.parametrize("pair", WINDOW_PAIRS, ids=_ids(WINDOW_PAIRS))
def test_compare_across_block_status_windows_matches_qemu_img(windows, pair):
    for args in (pair, ("-s", *pair), ("-p", *pair)):
        theirs, ours = compare_both(windows, *args)
        assert ours == theirs, args


def test_compare_raises_a_workers_unexpected_error_where_its_job_is_taken(images, monkeypatch):
    import threading

    from qimg.api import open_named

    def broken(self, job):
        raise RuntimeError("broken check")

    monkeypatch.setattr(qimg.compare.Comparer, "_check", broken)
    before = threading.active_count()
    image1 = open_named(str(images / "base.raw"), None)
    image2 = open_named(str(images / "base.qcow2"), None)
    try:
        with pytest.raises(RuntimeError, match="broken check"):
            qimg.compare.compare_images(image1, image2)
    finally:
        image1.close()
        image2.close()
    assert threading.active_count() == before  # the workers ended
