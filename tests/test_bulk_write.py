"""Runs of fresh clusters written together (Driver.write_runs: one host
allocation, one gathered write and one L2 update per table, through
ClusterMap.place_runs; any run that does not qualify is written as
before). Judged by qemu-img: commit leaves the base reading, checking and
allocated as qemu-img's commit of the same chain leaves it, with runs
over L2 table and refcount block boundaries, partly allocated runs, runs
over compressed and zero clusters, subclusters and external data files;
and write_runs called directly reads back as the same bytes written to a
raw file."""

from __future__ import annotations

import pytest
from chaintools import (
    assert_clean,
    assert_same_allocation,
    io,
    make,
    run_both,
    twins,
)
from conftest import run
from infotools import qemu_in

from qimg.api import open_image

KiB = 1024
MiB = 1 << 20

# The top's data: runs of 64 KiB clusters every 192 KiB (one L2 table of a
# 4 KiB-cluster base maps 2 MiB: several runs per table, some crossing
# one), and long runs over 2, 4 and 6 MiB.
TOP_WRITES = [f"write -P {10 + k % 200} {k * 192}k 64k" for k in range(40)] + [
    "write -P 7 1984k 192k",
    "write -P 8 3968k 256k",
    "write -P 9 5900k 300k",
]

# name: (base create options, base writes, top create options)
CASES = {
    "l2-table-boundaries": (("-o", "cluster_size=4k"), (), ()),
    "refcount-block-boundaries": (("-o", "cluster_size=4k,refcount_bits=64"), (), ()),
    "partly-allocated": (
        ("-o", "cluster_size=4k"),
        ("write -P 1 200k 8k", "write -P 2 2000k 4k", "write -P 3 4M 12k"),
        (),
    ),
    "compressed-and-zero": (
        ("-o", "cluster_size=4k"),
        ("write -c -P 4 192k 64k", "write -z 384k 64k", "write -c -P 5 4000k 64k"),
        (),
    ),
    "top-clusters-smaller": ((), ("write -P 6 1M 64k",), ("-o", "cluster_size=4k")),
    "extended-l2": (("-o", "extended_l2=on"), ("write -P 1 100k 6k",), ()),
    "external-data-file": (("-o", "cluster_size=4k,data_file=base.data"), ("write -P 1 0 8k",), ()),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_commit_of_fresh_runs_leaves_the_base_as_qemu_img_does(qemu_img, qemu_io, tmp_path, case):
    base_opts, base_writes, top_opts = case
    src = tmp_path / "src"
    src.mkdir()
    make(src, "base.qcow2", "8M", *base_opts)
    if base_writes:
        io(src, "base.qcow2", *base_writes)
    make(src, "top.qcow2", "8M", "-b", "base.qcow2", "-F", "qcow2", *top_opts)
    io(src, "top.qcow2", *TOP_WRITES)
    mine, theirs = twins(src, tmp_path)
    m, q = run_both(mine, theirs, "commit", "top.qcow2")
    assert (m.returncode, m.stdout, m.stderr) == (q.returncode, q.stdout, q.stderr)
    assert_clean(mine, "base.qcow2", "top.qcow2")
    for name in ("base.qcow2", "top.qcow2"):
        assert _guest(mine, name) == _guest(theirs, name), name
    assert_same_allocation(mine, theirs, "base.qcow2", "top.qcow2")


def _guest(d, name: str) -> bytes:
    """What qemu-img reads of image `name` in directory `d` (converted in
    `d`: a data file's name is relative to it)."""
    qemu_in(d, "qemu-img", "convert", "-U", "-O", "raw", name, "guest.raw", check=True)
    out = d / "guest.raw"
    data = out.read_bytes()
    out.unlink()
    return data


def _pattern(offset: int, n: int) -> bytes:
    """Bytes that differ from cluster to cluster of the guest."""
    return bytes((offset // 512 + i // 512) % 251 for i in range(n))


# (guest offset, length) runs for write_runs, in order: whole clusters in
# one table and across tables, unaligned ones, runs over clusters already
# written (by the runs of the first call).
FIRST = [(0, 8 * KiB), (16 * KiB, 4 * KiB), (2 * MiB - 8 * KiB, 24 * KiB), (3 * MiB, 1 * MiB)]
SECOND = [
    (4 * KiB, 8 * KiB),  # fresh then written: not placed together
    (30 * KiB, 5 * KiB),  # unaligned
    (6 * MiB, 2 * MiB),  # a whole fresh table: over a refcount block's 512 clusters
    (9 * MiB - 4 * KiB, 8 * KiB),  # across two tables
    (8 * MiB + 1000, 3000),
]


@pytest.mark.parametrize(
    "opts",
    [
        "cluster_size=4k,refcount_bits=64",
        "cluster_size=16k,extended_l2=on",
        "cluster_size=4k,data_file={dir}/t.data",
        "compat=0.10",
    ],
)
def test_write_runs_reads_back_as_the_same_writes_to_a_raw_file(qemu_img, tmp_path, opts):
    image, raw = tmp_path / "t.qcow2", tmp_path / "t.raw"
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts.format(dir=tmp_path),
            str(image),
            "12M",
        ],
        check=True,
    )
    run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "12M"], check=True)
    img = open_image(str(image), "qcow2", writable=True)
    try:
        with open(raw, "r+b") as out:
            for runs in (FIRST, SECOND):
                data = [(o, memoryview(_pattern(o, n))) for o, n in runs]
                img.write_runs(data)
                for o, d in data:
                    out.seek(o)
                    out.write(d)
        img.flush()
    finally:
        img.close()
    assert_clean(tmp_path, image.name)
    proc = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(raw)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("cache", [None, "none"])
def test_pwritev_writes_every_buffer_whole_when_the_system_call_writes_part(
    tmp_path, monkeypatch, cache
):
    """FileStorage.pwritev goes on where a pwritev wrote only part (the
    cut inside a buffer or between two), and under O_DIRECT writes as
    pwrite does."""
    import os

    from qimg import storage as storage_module
    from qimg.cachemode import parse_cache_mode

    real = os.pwritev

    def short(fd, views, offset):
        return real(fd, [memoryview(views[0])[:3000]], offset)

    monkeypatch.setattr(storage_module.os, "pwritev", short)
    path = tmp_path / "f"
    path.write_bytes(b"")
    buffers = [_pattern(k * 4096, 4096 + 512 * k) for k in range(5)] + [b""]
    mode = parse_cache_mode(cache) if cache else None
    s = storage_module.open_storage(str(path), writable=True, lock=False, cache=mode)
    try:
        s.pwritev(8192, buffers)
        s.flush()
    finally:
        s.close()
    assert path.read_bytes() == bytes(8192) + b"".join(buffers)
