"""qimg map against qemu-img 7.2 map: the same JSON lines and human table,
byte for byte, the same refusals and exit codes, on images qemu-img and
qemu-io made (data, zeros, compressed clusters, extended L2 subclusters,
backing chains of qcow2 and raw, external data files, preallocation,
snapshots, bitmaps) and for the --start-offset / --max-length edges."""

from __future__ import annotations

import subprocess
import time

import pytest
from damage import read_u64, write_u64
from mapcorpus import IMAGES, both, create, make_corpus, qemu_io, settle


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, qemu_img):
    d = tmp_path_factory.mktemp("map")
    make_corpus(d)
    return d


@pytest.mark.parametrize("name", IMAGES)
def test_map_json_is_qemu_imgs(corpus, name):
    theirs, mine = both(corpus, "map", "--output=json", name)
    assert mine == theirs


@pytest.mark.parametrize("name", IMAGES)
def test_map_human_table_and_refusal_are_qemu_imgs(corpus, name):
    """Rows of data with their host offsets and files; images with
    compressed clusters are refused after the rows before them."""
    theirs, mine = both(corpus, "map", name)
    assert mine == theirs


@pytest.mark.parametrize(
    "args",
    [
        ("--start-offset", "1"),
        ("--start-offset", "4095", "--max-length", "1"),
        ("--start-offset", "100000", "--max-length", "200000"),
        ("--start-offset", "8M"),
        ("--start-offset", "9M"),
        ("--start-offset", "100G"),
        ("--max-length", "0"),
        ("--start-offset", "7M", "--max-length", "0"),
        ("--max-length", "1"),
        ("--max-length", "8E"),
        ("--start-offset", "9223372036854775807", "--max-length", "9223372036854775807"),
        ("--start-offset", "1.5k", "--max-length", "1k"),
        ("--start", "1M"),
        ("--max", "1M"),
    ],
    ids=lambda a: " ".join(a),
)
@pytest.mark.parametrize("output", ["json", "human"])
def test_map_range_edges_are_qemu_imgs(corpus, args, output):
    theirs, mine = both(corpus, "map", f"--output={output}", *args, "chain-top.qcow2")
    assert mine == theirs


@pytest.mark.parametrize(
    "args",
    [
        ("--start-offset", "-1", "chain-top.qcow2"),
        ("--start-offset", "x", "chain-top.qcow2"),
        ("--max-length", "-5", "chain-top.qcow2"),
        ("--max-length", "9E", "chain-top.qcow2"),
        ("--start-offset",),
        ("--output=foo", "chain-top.qcow2"),
        ("--output", "foo"),
        (),
        ("a", "b"),
        ("-f", "raw", "chain-top.qcow2"),
        ("-f", "foo", "chain-top.qcow2"),
        ("--image-opts", "-f", "qcow2", "chain-top.qcow2"),
        ("--image-opts", "driver=qcow2,file.filename=chain-top.qcow2"),
        ("-U", "chain-top.qcow2"),
        ("no-such-file",),
        ("-Z", "chain-top.qcow2"),
    ],
    ids=lambda a: " ".join(a) or "nothing",
)
def test_map_bad_arguments_fail_as_qemu_img(corpus, args):
    theirs, mine = both(corpus, "map", *args)
    assert mine == theirs


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory, qemu_img):
    """Images with one refused L2 entry at guest 1 MiB: an unaligned host
    offset (L2 table at 0x40000, as qemu-img lays out a new image), and a
    zero flag in a version 2 image."""
    d = tmp_path_factory.mktemp("map-corrupt")
    for name, options, bits in (
        ("unaligned.qcow2", "", 0x200),
        ("v2-zero.qcow2", "compat=0.10", 1),
    ):
        create(d, name, "4M", options)
        qemu_io(d, name, "write -P 1 0 64k", "write -P 1 1M 64k", "write -P 1 2M 64k")
        where = 0x40000 + 16 * 8
        write_u64(d / name, where, read_u64(d / name, where) | bits)
    # An extended L2 entry (cluster 1 of 16 KiB) whose bitmap marks a
    # subcluster both allocated and zero; the L2 table is at 0x10000.
    create(d, "invalid-bitmap.qcow2", "2M", "cluster_size=16k,extended_l2=on")
    qemu_io(d, "invalid-bitmap.qcow2", "write -P 1 0 2k", "write -P 1 16k 16k")
    where = 0x10000 + 16 + 8
    write_u64(
        d / "invalid-bitmap.qcow2", where, read_u64(d / "invalid-bitmap.qcow2", where) | 1 << 32
    )
    settle(d)
    return d


@pytest.mark.parametrize(
    "args",
    [
        ("map", "--output=json"),
        ("map", "--output=json", "--start-offset", "20k"),
        ("map", "--output=json", "--start-offset", "32k"),
        ("map", "--output=json", "--max-length", "2k"),
        ("map",),
        ("measure", "-O", "qcow2"),
        ("measure", "-O", "qcow2", "-o", "cluster_size=4k"),
    ],
    ids=lambda a: " ".join(a),
)
def test_an_invalid_subcluster_bitmap_fails_as_in_qemu_img(corrupt, args):
    """Only the queries that start at the entry or run into it fail:
    measure, going on from the end of each target cluster, may pass it."""
    theirs, mine = both(corrupt, *args, "invalid-bitmap.qcow2")
    assert mine == theirs


@pytest.mark.parametrize("name", ["unaligned.qcow2", "v2-zero.qcow2"])
@pytest.mark.parametrize(
    "args",
    [(), ("--start-offset", "1M"), ("--start-offset", "1030k"), ("--start-offset", "1100k")],
    ids=lambda a: " ".join(a) or "whole",
)
@pytest.mark.parametrize("output", ["json", "human"])
def test_map_stops_at_a_corrupt_entry_as_qemu_img(corrupt, name, args, output):
    """The entries before the query that meets the entry are printed, then
    the corruption and "Could not read file metadata"; queries that start
    past it go on."""
    theirs, mine = both(corrupt, "map", f"--output={output}", *args, name)
    assert mine == theirs


@pytest.mark.parametrize(
    "args",
    [
        ("map", "--output=json"),
        ("map", "-U", "--output=json"),
        ("measure", "-O", "qcow2"),
        ("measure", "-U", "-O", "qcow2"),
    ],
    ids=lambda a: " ".join(a),
)
def test_an_image_in_use_is_read_as_qemu_img_reads_it(tmp_path, qemu_img, args):
    """QEMU's locks: an image qemu-io holds open for writing is refused
    without -U and read with it."""
    create(tmp_path, "held.qcow2", "4M")
    qemu_io(tmp_path, "held.qcow2", "write -P 1 0 64k")
    settle(tmp_path)
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", "held.qcow2"],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        theirs, mine = both(tmp_path, *args, "held.qcow2")
        assert mine == theirs
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
