"""compare reads plain qcow2 data clusters straight from the data file at
the host offsets block status gave: the outcome stays qemu-img's where
those bytes lie in a backing file, in an external data file, past the
end of a cut-short image, or beside data of another image of the chain."""

from __future__ import annotations

from pathlib import Path

import pytest
from chaintools import compare_both, img, io
from conftest import require_tool

MiB = 1 << 20


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("hostreads")
    img(d, "create", "-q", "-f", "raw", "flat.raw", "4M")
    io(d, "flat.raw", "write -P 1 0 1M", "write -P 2 2M 1M", "write -P 3 3M 4k", fmt="raw")
    img(d, "convert", "-O", "qcow2", "flat.raw", "base.qcow2")
    # An overlay holding part of the data over a base holding the rest.
    img(d, "create", "-q", "-f", "qcow2", "-b", "flat.raw", "-F", "raw", "low.qcow2")
    img(d, "create", "-q", "-f", "qcow2", "lowdata.qcow2", "4M")
    io(d, "lowdata.qcow2", "write -P 1 0 1M", "write -P 3 3M 4k", fmt="qcow2")
    img(d, "create", "-q", "-f", "qcow2", "-b", "lowdata.qcow2", "-F", "qcow2", "top.qcow2")
    io(d, "top.qcow2", "write -P 2 2M 1M", fmt="qcow2")
    img(d, "convert", "-O", "qcow2", "-o", "data_file=df.data", "flat.raw", "df.qcow2")
    # One byte off inside the data of each part of the chain.
    for off in (512 * 1024 + 3, 2 * MiB + 65536, 3 * MiB + 100):
        img(d, "convert", "-O", "raw", "flat.raw", f"d{off}.raw")
        io(d, f"d{off}.raw", f"write -P 200 {off} 1", fmt="raw")
    img(d, "convert", "-O", "qcow2", "flat.raw", "cut.qcow2")
    with open(d / "cut.qcow2", "r+b") as f:
        f.truncate(600 * 1024)  # data clusters past the end of the file
    return d


PAIRS = [
    ("flat.raw", "top.qcow2"),
    ("base.qcow2", "top.qcow2"),
    ("df.qcow2", "top.qcow2"),
    ("flat.raw", "cut.qcow2"),
    ("base.qcow2", "cut.qcow2"),
]
PAIRS += [
    (f"d{off}.raw", name)
    for off in (512 * 1024 + 3, 2 * MiB + 65536, 3 * MiB + 100)
    for name in ("base.qcow2", "top.qcow2", "df.qcow2")
]


@pytest.mark.parametrize("pair", PAIRS, ids=["-".join(p) for p in PAIRS])
def test_compare_reading_data_clusters_at_their_host_offsets_matches_qemu_img(images, pair):
    for args in (pair, pair[::-1], ("-s", *pair)):
        theirs, ours = compare_both(images, "-U", *args)
        assert ours == theirs, args
