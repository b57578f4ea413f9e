"""qimg measure against qemu-img 7.2 measure: the same required,
fully-allocated and bitmaps sizes (human and JSON) for every target
option set, for empty images of a size and for source images (data,
zeros, compressed clusters, backing chains, preallocation, snapshots,
bitmaps), and the same errors and exit codes."""

from __future__ import annotations

import pytest
from infotools import pairwise
from mapcorpus import IMAGES, both, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, qemu_img, qemu_io):
    d = tmp_path_factory.mktemp("measure")
    make_corpus(d)
    return d


def _valid(case: dict) -> bool:
    if case["extended_l2"] == "on" and case["cluster_size"] in ("512", "4k"):
        return False
    return not (case["compat"] == "0.10" and case["refcount_bits"] != "16")


_AXES = {
    "cluster_size": ["512", "4k", "64k", "2M"],
    "extended_l2": ["on", "off"],
    "preallocation": ["off", "metadata", "falloc", "full"],
    "refcount_bits": ["1", "16", "64"],
    "compat": ["0.10", "1.1"],
}

_TARGETS = [",".join(f"{k}={v}" for k, v in case.items()) for case in pairwise(_AXES, _valid)]


@pytest.mark.parametrize("options", _TARGETS)
@pytest.mark.parametrize("size", ["0", "1000", "1G", "3T"])
def test_measure_of_a_size_is_qemu_imgs(corpus, options, size):
    theirs, mine = both(corpus, "measure", "--size", size, "-O", "qcow2", "-o", options)
    assert mine == theirs


@pytest.mark.parametrize(
    "target",
    [
        ("-O", "raw"),
        ("-O", "qcow2"),
        ("-O", "qcow2", "-o", "cluster_size=4k"),
        ("-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on"),
        ("-O", "qcow2", "-o", "compat=0.10"),
        ("-O", "qcow2", "-o", "backing_file=x"),
        ("-O", "qcow2", "-o", "preallocation=full,refcount_bits=8"),
    ],
    ids=lambda a: " ".join(a[1:]),
)
@pytest.mark.parametrize("name", IMAGES)
def test_measure_of_a_source_is_qemu_imgs(corpus, name, target):
    theirs, mine = both(corpus, "measure", "--output=json", *target, name)
    assert mine == theirs


@pytest.mark.parametrize("name", ["bitmaps.qcow2", "chain-top.qcow2", "sparse.raw"])
def test_measure_human_output_is_qemu_imgs(corpus, name):
    theirs, mine = both(corpus, "measure", "-O", "qcow2", name)
    assert mine == theirs


@pytest.mark.parametrize(
    "snapshot",
    [
        "s1",
        "s2",
        "1",
        "snapshot.id=1",
        "snapshot.name=s2",
        "snapshot.id=2,snapshot.name=s1",
        "nosuch",
        "snapshot.foo=1",
    ],
)
def test_measure_of_a_snapshot_is_qemu_imgs(corpus, snapshot):
    theirs, mine = both(corpus, "measure", "-O", "qcow2", "-l", snapshot, "snapshots.qcow2")
    assert mine == theirs


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("--size", "1G", "allocated.qcow2"),
        ("-f", "qcow2"),
        ("-l", "s1"),
        ("--image-opts",),
        ("allocated.qcow2", "zero.qcow2"),
        ("--size", "1x"),
        ("--size", "-1"),
        ("--size", "8E"),
        ("--size", "1E", "-O", "qcow2"),
        ("--size", "1G", "-O", "foo"),
        ("--size", "1G", "-O", "vmdk"),
        ("--size", "1G", "-O", "qcow"),
        ("--output=foo", "--size", "1G"),
        ("no-such-file",),
        ("-l", "s1", "base.raw"),
        ("--size", "1G", "-O", "raw", "-o", "cluster_size=64k"),
        ("--size", "1G", "-O", "raw", "-o", "preallocation=foo"),
        ("--size", "1000", "-O", "raw"),
        ("--output=json", "--size", "9223372036854775807"),
        ("--size", "1G", "-O", "qcow2", "-o", ","),
        ("--size", "1G", "-O", "qcow2", "-o", "help"),
        ("--size", "1G", "-O", "qcow2", "-o", "cluster_size=64k", "-o", "cluster_size=4k"),
        ("--size", "1G", "--s", "2G"),
        ("--image-opts", "driver=qcow2,file.filename=allocated.qcow2"),
        ("--image-opts", "-f", "qcow2", "allocated.qcow2"),
    ]
    + [
        ("--size", "1G", "-O", "qcow2", "-o", option)
        for option in (
            "extended_l2=foo",
            "preallocation=foo",
            "compat=0.9",
            "compat=v3",
            "refcount_bits=3",
            "refcount_bits=128",
            "refcount_bits=0",
            "refcount_bits=foo",
            "cluster_size=2k,extended_l2=on",
            "cluster_size=4M",
            "cluster_size=0",
            "cluster_size=foo",
            "cluster_size=4295032832",
            "compat=0.10,refcount_bits=8",
            "compat=0.10,extended_l2=on",
            "size=2G",
            "size=foo",
            "encrypt.format=aes",
            "encrypt.format=luks",
            "encrypt.format=luks,encrypt.key-secret=nosec",
            "encrypt.iter-time=x",
            "encryption=x",
            "data_file=x,data_file_raw=on,lazy_refcounts=on,compression_type=zstd",
            "nocow=on,extent_size_hint=1M",
            "cluster_size",
            "extended_l2",
        )
    ],
    ids=lambda a: " ".join(a) or "nothing",
)
def test_measure_arguments_are_taken_and_refused_as_qemu_img(corpus, args):
    theirs, mine = both(corpus, "measure", *args)
    assert mine == theirs
