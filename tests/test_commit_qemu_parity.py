"""qimg commit beside qemu-img 7.2 commit: the same chain copied twice, one
copy committed by each tool; exit codes, messages, the guest data
(qemu-img compare), every file's allocation (qemu-img map, the emptied
overlay's included; host offsets aside, which depend on the order QEMU's
concurrent job requests finish in) and qemu-img check compared at run
time."""

from __future__ import annotations

import shutil

import pytest
from chaintools import (
    allocation,
    assert_clean,
    assert_same_allocation,
    assert_same_guest,
    files,
    image_map,
    io,
    make,
    overlay,
    run_both,
    twins,
)
from conftest import run
from infotools import qimg_here

NAMES = ("a.qcow2", "b.qcow2", "c.qcow2")


@pytest.fixture(scope="module")
def deep(qemu_img, qemu_io, tmp_path_factory):
    """a.qcow2 <- b.qcow2 <- c.qcow2 (2, 3 and 4 MiB): data, zeros over
    data, data over zeros, a partial cluster."""
    src = tmp_path_factory.mktemp("commit") / "deep"
    src.mkdir()
    make(src, "a.qcow2", "2M")
    io(src, "a.qcow2", "write -P 1 0 2M")
    overlay(src, "b.qcow2", "a.qcow2", "3M")
    io(src, "b.qcow2", "write -P 2 1M 1M", "write -z 2560k 128k", "write -z 0 64k")
    overlay(src, "c.qcow2", "b.qcow2", "4M")
    io(src, "c.qcow2", "write -P 3 1536k 64k", "write -P 4 3M 64k", "write -z 128k 64k")
    io(src, "c.qcow2", "write -P 5 2600k 1k")
    return src


CASES = {
    "into-backing": [],
    "drop": ["-d"],
    "into-base": ["-b", "a.qcow2"],
    "into-parent-by-name": ["-b", "b.qcow2"],
    "into-base-absolute": ["-b", "{dir}/a.qcow2"],
    "progress": ["-p"],
    "quiet": ["-q", "-t", "unsafe"],
    "rate": ["-r", "1G"],
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_commit_leaves_what_qemu_img_leaves(deep, tmp_path, args):
    mine, theirs = twins(deep, tmp_path)
    m, q = run_both(mine, theirs, "commit", *args, "c.qcow2")
    if "-p" in args:  # the steps between differ (qemu-img's follow its job)
        assert "(100.00/100%)" in m.stdout and "(100.00/100%)" in q.stdout
        assert m.stdout.endswith("Image committed.\n") and q.stdout.endswith("Image committed.\n")
    else:
        assert m.stdout == q.stdout
    _check_pair(mine, theirs, deep, m, q)


def _check_pair(mine, theirs, source, m, q, names=NAMES, top="c.qcow2") -> None:
    assert (m.returncode, m.stderr) == (q.returncode, q.stderr)
    assert m.returncode == 0
    assert_clean(mine, *names)
    assert_same_allocation(mine, theirs, *names)
    # The top reads as it did; every image reads as qemu-img left it.
    assert_same_guest(mine, source, top)
    for name in names:
        assert_same_guest(mine, theirs, name)


def _pair(qemu_img, qemu_io, tmp_path, top_opts=(), base_opts=(), base_fmt="qcow2"):
    """base <- top (top larger than the base), made with the options given."""
    src = tmp_path / "src"
    src.mkdir()
    base = "base.qcow2" if base_fmt == "qcow2" else "base.raw"
    make(src, base, "2M", *base_opts, fmt=base_fmt)
    io(src, base, "write -P 1 0 1M", "write -P 2 1536k 256k", fmt=base_fmt)
    qemu_img_args = ["-b", base, "-F", base_fmt, *top_opts]
    make(src, "top.qcow2", "3M", *qemu_img_args)
    io(src, "top.qcow2", "write -P 3 512k 1M", "write -z 1600k 64k", "write -P 4 2M 100k")
    return src, base


SHAPES = {
    "plain": ((), (), "qcow2"),
    "raw-base": ((), (), "raw"),
    "v2-top": (("-o", "compat=0.10"), (), "qcow2"),
    "v2-base": ((), ("-o", "compat=0.10"), "qcow2"),
    "small-clusters-top": (("-o", "cluster_size=4k"), (), "qcow2"),
    "large-clusters-base": ((), ("-o", "cluster_size=256k"), "qcow2"),
    "extended-l2-top": (("-o", "extended_l2=on"), (), "qcow2"),
    "lazy-refcounts-top": (("-o", "lazy_refcounts=on"), (), "qcow2"),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_commit_of_images_of_every_shape(qemu_img, qemu_io, tmp_path, shape):
    """The base grows to the top's size; the top is emptied as qemu-img
    empties it (whole file rewritten, or every cluster discarded)."""
    top_opts, base_opts, base_fmt = shape
    src, base = _pair(qemu_img, qemu_io, tmp_path, top_opts, base_opts, base_fmt)
    mine, theirs = twins(src, tmp_path)
    m, q = run_both(mine, theirs, "commit", "top.qcow2")
    assert m.stdout == q.stdout == "Image committed.\n"
    qcow2 = ["top.qcow2"] + ([base] if base_fmt == "qcow2" else [])
    _check_pair(mine, theirs, src, m, q, names=qcow2, top="top.qcow2")
    assert allocation(image_map(mine, base, base_fmt)) == allocation(
        image_map(theirs, base, base_fmt)
    )
    if base_fmt == "raw":
        assert (mine / base).stat().st_size == (theirs / base).stat().st_size


def test_commit_of_an_overlay_with_a_snapshot_discards_its_clusters(qemu_img, qemu_io, tmp_path):
    src, base = _pair(qemu_img, qemu_io, tmp_path)
    run(["qemu-img", "snapshot", "-c", "s1", str(src / "top.qcow2")])
    io(src, "top.qcow2", "write -P 7 0 64k")
    mine, theirs = twins(src, tmp_path)
    m, q = run_both(mine, theirs, "commit", "top.qcow2")
    _check_pair(mine, theirs, src, m, q, names=("top.qcow2", base), top="top.qcow2")


ERRORS = {
    "no-backing": ["a.qcow2"],
    "base-not-in-chain": ["-b", "nothere.qcow2", "c.qcow2"],
    "base-is-the-top": ["-b", "c.qcow2", "c.qcow2"],
    "base-relative-to-cwd": ["-b", "./x/a.qcow2", "c.qcow2"],
    "bad-rate": ["-r", "foo", "c.qcow2"],
    "negative-rate": ["-r", "-1", "c.qcow2"],
    "rate-suffix": ["-r", "1x", "c.qcow2"],
    "bad-cache": ["-t", "foo", "c.qcow2"],
    "missing-file": ["missing.qcow2"],
    "no-file": [],
    "two-files": ["c.qcow2", "b.qcow2"],
    "image-opts-and-format": ["--image-opts", "-f", "qcow2", "c.qcow2"],
    "no-force-share": ["-U", "c.qcow2"],
    "no-force-share-long": ["--force-share", "c.qcow2"],
    "bad-object": ["--object", "foo", "c.qcow2"],
}


@pytest.mark.parametrize("args", ERRORS.values(), ids=ERRORS.keys())
def test_commit_refuses_as_qemu_img_does_and_writes_nothing(deep, tmp_path, args):
    mine, theirs = twins(deep, tmp_path)
    m, q = run_both(mine, theirs, "commit", *args)
    assert (m.returncode, m.stderr, m.stdout) == (q.returncode, q.stderr, q.stdout)
    assert m.returncode == 1
    assert files(mine) == files(deep)


def test_commit_into_a_missing_chain_fails_in_one_line(deep, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(deep, src)
    (src / "a.qcow2").unlink()
    mine, theirs = twins(src, tmp_path / "t")
    m, q = run_both(mine, theirs, "commit", "c.qcow2")
    assert (m.returncode, m.stderr) == (q.returncode, q.stderr)
    assert m.returncode == 1
    assert files(mine) == files(src)


BASE_NAMES = {
    "as-stored": ("a.qcow2", 0),
    "relative-to-the-image-naming-it": ("../sub/a.qcow2", 0),
    "relative-to-cwd": ("sub/a.qcow2", 1),
    "absolute": ("{dir}/sub/a.qcow2", 0),
    "dot-slash": ("./a.qcow2", 0),
    "json": ('json:{"file": {"driver": "file", "filename": "sub/a.qcow2"}}', 1),
}


@pytest.mark.parametrize("name,code", BASE_NAMES.values(), ids=BASE_NAMES.keys())
def test_commit_finds_the_base_by_name_as_qemu_img_does(deep, tmp_path, name, code):
    """-b BASE names an image of the chain as stored, or as a path relative
    to the directory of the image that names it (not the working one)."""
    src = tmp_path / "src"
    shutil.copytree(deep, src / "sub")
    mine, theirs = twins(src, tmp_path / "t")
    m, q = run_both(mine, theirs, "commit", "-b", name, "sub/c.qcow2")
    assert (m.returncode, m.stderr.replace(str(mine), "D")) == (
        q.returncode,
        q.stderr.replace(str(theirs), "D"),
    )
    assert m.returncode == code
    assert_same_allocation(mine, theirs, *(f"sub/{n}" for n in NAMES))


def test_commit_into_a_base_with_a_snapshot_from_a_top_with_a_bitmap(qemu_img, qemu_io, tmp_path):
    """The base's snapshot keeps its clusters (copy on write); the top is
    emptied cluster by cluster and its bitmap is left as qemu-img leaves it."""
    src, base = _pair(qemu_img, qemu_io, tmp_path)
    run(["qemu-img", "snapshot", "-c", "s1", str(src / base)])
    run(["qemu-img", "bitmap", "--add", str(src / "top.qcow2"), "bm"])
    mine, theirs = twins(src, tmp_path)
    m, q = run_both(mine, theirs, "commit", "top.qcow2")
    _check_pair(mine, theirs, src, m, q, names=("top.qcow2", base), top="top.qcow2")
    # The dirty counts, read by qimg from both results.
    assert qimg_here(mine, "bitmap", "--list", "--output=json", "top.qcow2").stdout == (
        qimg_here(theirs, "bitmap", "--list", "--output=json", "top.qcow2").stdout
    )
