"""Safe rebase reads the plain data clusters of both chains straight from
their files at the host offsets their mapping gave (once per window, not
once per piece): the overlay is left as qemu-img's rebase leaves it where
data runs span several pieces, lie in an intermediate image or in a raw
backing file, differ only inside a run, or are compressed (read through
the image as before)."""

from __future__ import annotations

import pytest
from chaintools import assert_clean, assert_same_guest, io, make, overlay, run_both, twins
from conftest import run


@pytest.fixture
def chains(qemu_img, qemu_io, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # Patterns change every 64 KiB: a range read from the wrong host
    # offset would show.
    make(src, "base.qcow2", "16M")
    io(src, "base.qcow2", *[f"write -P {1 + k} {k * 64}k 64k" for k in range(160)])
    overlay(src, "mid.qcow2", "base.qcow2")
    io(src, "mid.qcow2", "write -P 90 11M 3M", "write -c -P 91 14M 128k")
    overlay(src, "top.qcow2", "mid.qcow2")
    io(src, "top.qcow2", "write -P 92 512k 64k")
    # The new backing file: the same bytes but a few, other layouts.
    run(["qemu-img", "convert", "-O", "qcow2", "mid.qcow2", "new.qcow2"], cwd=src)
    io(src, "new.qcow2", "write -P 200 6000k 4k", "write -P 201 12M 1k")
    run(["qemu-img", "convert", "-O", "raw", "new.qcow2", "new.raw"], cwd=src)
    return src


@pytest.mark.parametrize("new", [("new.qcow2", "qcow2"), ("new.raw", "raw")], ids=["qcow2", "raw"])
def test_safe_rebase_reading_host_offsets_leaves_what_qemu_img_leaves(chains, tmp_path, new):
    mine, theirs = twins(chains, tmp_path / new[1])
    m, q = run_both(mine, theirs, "rebase", "-b", new[0], "-F", new[1], "top.qcow2")
    assert (m.returncode, m.stdout, m.stderr) == (q.returncode, q.stdout, q.stderr)
    assert_clean(mine, "top.qcow2")
    assert_same_guest(mine, theirs, "top.qcow2")
    # The overlay over its new backing file reads as over the old one.
    assert_same_guest(mine, chains, "top.qcow2")


def test_safe_rebase_onto_an_image_of_the_chain_leaves_what_qemu_img_leaves(chains, tmp_path):
    mine, theirs = twins(chains, tmp_path / "inchain")
    m, q = run_both(mine, theirs, "rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2")
    assert (m.returncode, m.stdout, m.stderr) == (q.returncode, q.stdout, q.stderr)
    assert_clean(mine, "top.qcow2")
    assert_same_guest(mine, theirs, "top.qcow2")
    assert_same_guest(mine, chains, "top.qcow2")
