"""commit reads the plain data clusters of the images above the base
straight from their files at the host offsets their mapping gave (one
mapping per window, not one per piece): the base reads as qemu-img's
commit leaves it where a data run spans several pieces, where the data
lies in an intermediate image or in an external data file, and beside
compressed clusters (read through the image as before)."""

from __future__ import annotations

from chaintools import assert_clean, assert_same_guest, io, make, overlay, run_both, twins
from conftest import run


def _commit_both(src, tmp_path, *args: str) -> None:
    mine, theirs = twins(src, tmp_path)
    m, q = run_both(mine, theirs, "commit", *args)
    assert (m.returncode, m.stdout, m.stderr) == (q.returncode, q.stdout, q.stderr)
    assert_clean(mine, *[p.name for p in sorted(mine.glob("*.qcow2"))])
    assert_same_guest(mine, theirs, "base.qcow2")


def test_commit_of_data_runs_longer_than_a_piece_matches_qemu_img(qemu_img, qemu_io, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make(src, "base.qcow2", "16M")
    io(src, "base.qcow2", "write -P 1 0 16M")
    overlay(src, "mid.qcow2", "base.qcow2")
    io(src, "mid.qcow2", "write -P 2 1M 9M", "write -P 3 12M 100k")
    overlay(src, "top.qcow2", "mid.qcow2")
    # Pattern changes every 64 KiB: a piece read from the wrong host
    # offset would show.
    io(src, "top.qcow2", *[f"write -P {10 + k} {3072 + k * 64}k 64k" for k in range(100)])
    _commit_both(src, tmp_path, "-b", "base.qcow2", "top.qcow2")


def test_commit_from_an_external_data_file_and_compressed_clusters_matches_qemu_img(
    qemu_img, qemu_io, tmp_path
):
    src = tmp_path / "src"
    src.mkdir()
    make(src, "base.qcow2", "8M")
    io(src, "base.qcow2", "write -P 1 0 8M")
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=top.data",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        cwd=src,
    )
    io(src, "top.qcow2", *[f"write -P {20 + k} {k * 448}k 192k" for k in range(16)])
    _commit_both(src, tmp_path, "top.qcow2")
    src2 = tmp_path / "src2"
    src2.mkdir()
    make(src2, "base.qcow2", "8M")
    io(src2, "base.qcow2", "write -P 1 0 8M")
    overlay(src2, "top.qcow2", "base.qcow2")
    io(src2, "top.qcow2", "write -c -P 5 0 64k", "write -P 6 64k 5M", "write -c -P 7 6M 128k")
    _commit_both(src2, tmp_path / "two", "top.qcow2")
