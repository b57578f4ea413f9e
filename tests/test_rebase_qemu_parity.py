"""qimg rebase beside qemu-img 7.2 rebase: the same chain copied twice, one
copy rebased by each tool; exit codes, messages, the guest data
(qemu-img compare), every file's allocation (qemu-img map) and qemu-img
check compared at run time."""

from __future__ import annotations

import shutil

import pytest
from chaintools import (
    assert_clean,
    assert_same_guest,
    assert_same_maps,
    files,
    image_map,
    io,
    make,
    overlay,
    run_both,
    twins,
)


@pytest.fixture(scope="module")
def chain(qemu_img, qemu_io, tmp_path_factory):
    """base.qcow2 <- top.qcow2, other.qcow2 (different data), copy.qcow2 (a
    copy of base), r.raw (raw, different data), short.qcow2 (2 MiB)."""
    src = tmp_path_factory.mktemp("rebase") / "src"
    src.mkdir()
    make(src, "base.qcow2")
    io(src, "base.qcow2", "write -P 1 0 1M", "write -P 2 2M 512k", "write -z 3584k 64k")
    overlay(src, "top.qcow2", "base.qcow2")
    io(src, "top.qcow2", "write -P 3 512k 1M", "write -z 3M 64k", "write -P 4 3900k 3k")
    make(src, "other.qcow2")
    io(src, "other.qcow2", "write -P 1 0 512k", "write -P 5 1536k 1M", "write -P 2 2304k 1k")
    shutil.copy(src / "base.qcow2", src / "copy.qcow2")
    make(src, "r.raw", fmt="raw")
    io(src, "r.raw", "write -P 6 64k 128k", "write -P 1 0 16k", fmt="raw")
    make(src, "short.qcow2", "2M")
    io(src, "short.qcow2", "write -P 1 0 1M")
    return src


CASES = {
    "safe-other": ["-b", "other.qcow2", "-F", "qcow2"],
    "safe-copy": ["-b", "copy.qcow2", "-F", "qcow2"],
    "safe-raw": ["-b", "r.raw", "-F", "raw"],
    "safe-shorter": ["-b", "short.qcow2", "-F", "qcow2"],
    "safe-same": ["-b", "base.qcow2", "-F", "qcow2"],
    "flatten": ["-b", ""],
    "flatten-with-F": ["-b", "", "-F", "qcow2"],
    "unsafe": ["-u", "-b", "other.qcow2", "-F", "qcow2"],
    "unsafe-missing": ["-u", "-b", "missing.qcow2", "-F", "qcow2"],
    "unsafe-remove": ["-u"],
    "unsafe-flatten": ["-u", "-b", ""],
    "progress": ["-p", "-b", "other.qcow2", "-F", "qcow2"],
    "quiet-progress": ["-q", "-p", "-b", "", "-t", "unsafe", "-T", "none"],
    "force-share": ["-U", "-b", "other.qcow2", "-F", "qcow2"],
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_rebase_leaves_what_qemu_img_leaves(chain, tmp_path, args):
    mine, theirs = twins(chain, tmp_path)
    m, q = run_both(mine, theirs, "rebase", *args, "top.qcow2")
    assert (m.returncode, m.stderr) == (q.returncode, q.stderr)
    assert m.returncode == 0
    if "-p" not in args or "-q" in args:
        assert m.stdout == q.stdout
    else:  # the steps between differ (qemu-img's follow its 2 MiB reads)
        assert "(100.00/100%)" in m.stdout and "(100.00/100%)" in q.stdout
    # Nothing but the overlay is written.
    before, after = files(chain), files(mine)
    assert {n for n in after if after[n] != before[n]} <= {"top.qcow2"}
    assert_clean(mine, "top.qcow2")
    assert_same_maps(mine, theirs, "top.qcow2")
    # Safe rebases keep what the guest reads.
    if "-u" not in args:
        assert_same_guest(mine, chain, "top.qcow2")


def test_rebase_onto_a_copy_copies_nothing(chain, tmp_path):
    mine, theirs = twins(chain, tmp_path)
    before = image_map(mine, "top.qcow2")
    size = (mine / "top.qcow2").stat().st_size
    m, q = run_both(mine, theirs, "rebase", "-b", "copy.qcow2", "-F", "qcow2", "top.qcow2")
    assert m.returncode == q.returncode == 0
    assert (mine / "top.qcow2").stat().st_size == size
    after = image_map(mine, "top.qcow2")
    assert [e for e in after if e["depth"] == 0] == [e for e in before if e["depth"] == 0]


@pytest.fixture(scope="module")
def deep(qemu_img, qemu_io, tmp_path_factory):
    """a.qcow2 <- b.qcow2 <- c.qcow2 (sizes 2, 3, 4 MiB), d.qcow2 apart."""
    src = tmp_path_factory.mktemp("rebase") / "deep"
    src.mkdir()
    make(src, "a.qcow2", "2M")
    io(src, "a.qcow2", "write -P 1 0 2M")
    overlay(src, "b.qcow2", "a.qcow2", "3M")
    io(src, "b.qcow2", "write -P 2 1M 1M", "write -z 2560k 128k")
    overlay(src, "c.qcow2", "b.qcow2", "4M")
    io(src, "c.qcow2", "write -P 3 1536k 64k", "write -P 4 3M 64k")
    make(src, "d.qcow2", "1M")
    io(src, "d.qcow2", "write -P 9 0 1M")
    return src


DEEP = {
    "onto-base": ["-b", "a.qcow2", "-F", "qcow2"],
    "onto-parent": ["-b", "b.qcow2", "-F", "qcow2"],
    "onto-other": ["-b", "d.qcow2", "-F", "qcow2"],
    "flatten": ["-b", ""],
}


@pytest.mark.parametrize("args", DEEP.values(), ids=DEEP.keys())
def test_rebase_in_a_three_deep_chain(deep, tmp_path, args):
    mine, theirs = twins(deep, tmp_path)
    m, q = run_both(mine, theirs, "rebase", *args, "c.qcow2")
    assert (m.returncode, m.stderr, m.stdout) == (q.returncode, q.stderr, q.stdout)
    assert_clean(mine, "c.qcow2")
    assert_same_maps(mine, theirs, "c.qcow2")
    assert_same_guest(mine, deep, "c.qcow2")


def test_rebase_resolves_names_relative_to_the_overlay(deep, tmp_path):
    """The new backing file is looked for beside the overlay, and stored as typed."""
    src = tmp_path / "src"
    shutil.copytree(deep, src)
    sub = src / "sub"
    sub.mkdir()
    shutil.move(src / "d.qcow2", sub / "d.qcow2")
    overlay(sub, "e.qcow2", "d.qcow2")
    io(sub, "e.qcow2", "write -P 7 4k 4k")
    mine, theirs = twins(src, tmp_path / "t")
    m, q = run_both(mine, theirs, "rebase", "-b", "../a.qcow2", "-F", "qcow2", "sub/e.qcow2")
    assert (m.returncode, m.stderr) == (q.returncode, q.stderr) == (0, "")
    assert_same_maps(mine, theirs, "sub/e.qcow2")
    assert_same_guest(mine, src, "sub/e.qcow2")
    assert image_map(mine, "sub/e.qcow2")[0]["depth"] == 0


ERRORS = {
    "no-format": ["-b", "other.qcow2", "top.qcow2"],
    "unsafe-no-format": ["-u", "-b", "other.qcow2", "top.qcow2"],
    "missing-new": ["-b", "missing.qcow2", "-F", "qcow2", "top.qcow2"],
    "missing-new-no-format": ["-b", "missing.qcow2", "top.qcow2"],
    "missing-file": ["-b", "", "missing.qcow2"],
    "bad-format": ["-b", "other.qcow2", "-F", "foo", "top.qcow2"],
    "bad-cache": ["-t", "foo", "-b", "", "top.qcow2"],
    "bad-source-cache": ["-T", "foo", "-b", "", "top.qcow2"],
    "no-backing-option": ["top.qcow2"],
    "no-file": ["-b", ""],
    "two-files": ["-b", "", "top.qcow2", "base.qcow2"],
    "onto-itself": ["-b", "top.qcow2", "-F", "qcow2", "top.qcow2"],
    "onto-its-own-overlay": ["-b", "top.qcow2", "-F", "qcow2", "base.qcow2"],
    "raw-overlay": ["-f", "raw", "-b", "other.qcow2", "-F", "qcow2", "r.raw"],
    "raw-overlay-unsafe": ["-u", "-f", "raw", "r.raw"],
    "raw-overlay-flatten": ["-f", "raw", "-b", "", "r.raw"],
    "name-too-long": ["-u", "-F", "qcow2", "-b", "x" * 1100, "top.qcow2"],
    "image-opts-and-format": ["--image-opts", "-f", "qcow2", "-b", "", "top.qcow2"],
    "bad-object": ["--object", "foo", "-b", "", "top.qcow2"],
}


@pytest.mark.parametrize("args", ERRORS.values(), ids=ERRORS.keys())
def test_rebase_refuses_as_qemu_img_does_and_writes_nothing(chain, tmp_path, args):
    mine, theirs = twins(chain, tmp_path)
    m, q = run_both(mine, theirs, "rebase", *args)
    assert (m.returncode, m.stderr) == (q.returncode, q.stderr)
    assert m.returncode == 1
    assert files(mine) == files(chain)


def test_rebase_refuses_a_chain_that_loops(chain, tmp_path):
    """qemu-img meets its own lock on such a chain; qimg names the loop or
    the lock, in one line, and writes nothing."""
    from infotools import qemu_in, qimg_here

    src = tmp_path / "loop"
    shutil.copytree(chain, src)
    qemu_in(src, "qemu-img", "rebase", "-u", "-b", "top.qcow2", "-F", "qcow2", "base.qcow2")
    before = files(src)
    m = qimg_here(src, "rebase", "-b", "", "top.qcow2")
    assert m.returncode == 1
    assert m.stderr.startswith("qimg: Could not open 'top.qcow2': ")
    assert len(m.stderr.strip().splitlines()) <= 2  # the lock message's second line
    assert files(src) == before


@pytest.mark.parametrize("target", ["top.qcow2", "base.qcow2"])
def test_rebase_never_writes_a_loop_even_with_force_share(chain, tmp_path, target):
    """qemu-img -U shares the overlay's lock and writes the loop; qimg
    refuses it in one line and writes nothing."""
    from infotools import qimg_here

    before = files(chain)
    m = qimg_here(chain, "rebase", "-U", "-b", "top.qcow2", "-F", "qcow2", target)
    assert m.returncode == 1
    assert m.stderr.strip().endswith("creates an infinite loop.")
    assert len(m.stderr.strip().splitlines()) == 1
    assert files(chain) == before


def test_rebase_with_a_missing_old_backing_file_is_unsafe_only(chain, tmp_path):
    mine, theirs = twins(chain, tmp_path)
    for d in (mine, theirs):
        (d / "base.qcow2").unlink()
    m, q = run_both(mine, theirs, "rebase", "-b", "", "top.qcow2")
    assert (m.returncode, m.stderr) == (q.returncode, q.stderr)
    assert m.returncode == 1
    m, q = run_both(mine, theirs, "rebase", "-u", "-b", "copy.qcow2", "-F", "qcow2", "top.qcow2")
    assert (m.returncode, m.stderr) == (q.returncode, q.stderr) == (0, "")
    assert_same_guest(mine, theirs, "top.qcow2")
    assert_clean(mine, "top.qcow2")


def test_rebase_of_a_probed_raw_image_warns_first(chain, tmp_path):
    mine, theirs = twins(chain, tmp_path)
    m, q = run_both(mine, theirs, "rebase", "-u", "-b", "", "r.raw")
    assert (m.returncode, m.stderr) == (q.returncode, q.stderr)
    assert "probing guessed raw" in m.stderr


SHAPES = {
    "v2": ("-o", "compat=0.10"),
    "small-clusters": ("-o", "cluster_size=4k"),
    "extended-l2": ("-o", "extended_l2=on"),
    "larger-than-its-backing": ("-o", "cluster_size=64k", "6M"),
}


@pytest.mark.parametrize("target", ["other.qcow2", ""], ids=["onto-other", "flatten"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_rebase_of_overlays_of_every_shape(chain, tmp_path, shape, target):
    """Partial clusters copied (512-byte sectors), zeros past the old
    chain's end, v2 images without zero clusters: as qemu-img leaves them."""
    src = tmp_path / "src"
    shutil.copytree(chain, src)
    *opts, size = shape if shape[-1].endswith("M") else (*shape, "4M")
    make(src, "o.qcow2", size, "-b", "base.qcow2", "-F", "qcow2", *opts)
    writes = ["write -P 8 100k 3k"] + (["write -P 9 4500k 1k"] if size == "6M" else [])
    io(src, "o.qcow2", *writes)
    mine, theirs = twins(src, tmp_path / "t")
    args = ["-b", target] + (["-F", "qcow2"] if target else [])
    m, q = run_both(mine, theirs, "rebase", *args, "o.qcow2")
    assert (m.returncode, m.stderr) == (q.returncode, q.stderr) == (0, "")
    assert_clean(mine, "o.qcow2")
    assert_same_maps(mine, theirs, "o.qcow2")
    assert_same_guest(mine, src, "o.qcow2")


def test_rebase_of_an_image_without_backing_file_hides_the_new_one(chain, tmp_path):
    """Where the new backing file holds data the image lacks, zeros are
    written (qemu-img's zero writes past the end of no old chain)."""
    mine, theirs = twins(chain, tmp_path)
    m, q = run_both(mine, theirs, "rebase", "-b", "copy.qcow2", "-F", "qcow2", "other.qcow2")
    assert (m.returncode, m.stderr) == (q.returncode, q.stderr) == (0, "")
    assert_clean(mine, "other.qcow2")
    assert_same_maps(mine, theirs, "other.qcow2")
    assert_same_guest(mine, chain, "other.qcow2")
