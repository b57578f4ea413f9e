"""commit starts the base's write-back as it copies (so its flush waits
only for the tail): the base committed that way reads and checks as
qemu-img's commit leaves it, and a base opened with cache=unsafe (never
flushed) or O_DIRECT (nothing cached) is not asked to write back."""

from __future__ import annotations

import pytest
from chaintools import assert_clean, assert_same_guest, io, make, overlay, run_both, twins

import qimg.commit
from qimg import writeback


@pytest.fixture
def started(monkeypatch) -> list[int]:
    """The file descriptors write-back was started on, with a step of
    64 KiB (the copy below is a few MiB)."""
    calls: list[int] = []
    monkeypatch.setattr(qimg.commit, "WRITEBACK_STEP", 64 << 10)
    real = writeback.start
    monkeypatch.setattr(writeback, "start", lambda fd: (calls.append(fd), real(fd)))
    return calls


@pytest.fixture
def chain(qemu_img, qemu_io, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make(src, "base.qcow2", "4M")
    io(src, "base.qcow2", "write -P 1 0 4M")
    overlay(src, "top.qcow2", "base.qcow2")
    io(src, "top.qcow2", "write -P 2 64k 1M", "write -P 3 2M 1M", "write -z 3584k 64k")
    return twins(src, tmp_path)


def test_commit_starting_write_back_leaves_the_base_as_qemu_img_does(chain, started):
    mine, theirs = chain
    m, q = run_both(mine, theirs, "commit", "top.qcow2")
    assert (m.returncode, m.stdout, m.stderr) == (q.returncode, q.stdout, q.stderr)
    assert started, "write-back was never started"
    assert_clean(mine, "base.qcow2", "top.qcow2")
    assert_same_guest(mine, theirs, "base.qcow2")
    assert_same_guest(mine, theirs, "top.qcow2")


@pytest.mark.parametrize("cache", ["unsafe", "none"])
def test_commit_starts_no_write_back_where_the_base_is_not_flushed_or_cached(chain, started, cache):
    mine, theirs = chain
    m, q = run_both(mine, theirs, "commit", "-t", cache, "top.qcow2")
    assert (m.returncode, m.stdout, m.stderr) == (q.returncode, q.stdout, q.stderr)
    assert started == []
    assert_clean(mine, "base.qcow2", "top.qcow2")
    assert_same_guest(mine, theirs, "base.qcow2")
