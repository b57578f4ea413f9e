"""Images made by qemu-img and qemu-io for the map and measure tests, and
the way both tools are run on them (qemu-img as a process, qimg in this
process: both from the corpus directory, so relative names read alike)."""

from __future__ import annotations

from pathlib import Path

from conftest import run
from infotools import message, qemu_in, qimg_here

KiB = 1 << 10
MiB = 1 << 20


def qemu_io(d: Path, name: str, *commands: str, fmt: str = "qcow2", check: bool = True) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    run([*args, name], cwd=d, check=check)


def io_step(kind: str, start: int, length: int) -> str:
    """The qemu-io command of one step of a random write pattern: `kind`
    is write, zero, unmap, discard, or compress (`length` is then the
    cluster size, `start` a cluster's offset)."""
    return {
        "write": f"write -P 7 {start} {length}",
        "zero": f"write -z {start} {length}",
        "unmap": f"write -z -u {start} {length}",
        "discard": f"discard {start} {length}",
        "compress": f"write -c -P 3 {start} {length}",
    }[kind]


def qemu_img(d: Path, *args: str) -> None:
    run(["qemu-img", *args], cwd=d)


def create(d: Path, name: str, size: str, options: str = "", *more: str) -> None:
    args = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    qemu_img(d, *args, *more, name, size)


# name -> what the image holds (the ids of the parametrised tests)
IMAGES = (
    "allocated.qcow2",
    "zero.qcow2",
    "compressed.qcow2",
    "extl2.qcow2",
    "extl2-over-qcow2.qcow2",
    "chain-top.qcow2",
    "over-raw.qcow2",
    "over-short-raw.qcow2",
    "data-file.qcow2",
    "data-file-raw.qcow2",
    "prealloc-metadata.qcow2",
    "prealloc-falloc.qcow2",
    "v2.qcow2",
    "small-clusters.qcow2",
    "big-clusters.qcow2",
    "snapshots.qcow2",
    "bitmaps.qcow2",
    "sparse.raw",
    "odd.raw",
    "v1.qcow",
)


def make_corpus(d: Path) -> None:
    """Every image of IMAGES, in `d`."""
    create(d, "allocated.qcow2", "4M")
    qemu_io(d, "allocated.qcow2", "write -P 1 0 64k", "write -P 2 64k 4k", "write -P 3 1M 1M")
    create(d, "zero.qcow2", "4M")
    qemu_io(d, "zero.qcow2", "write -P 1 0 128k", "write -z 64k 128k", "write -z -u 1M 64k")
    qemu_io(d, "zero.qcow2", "write -P 1 2M 64k", "write -z 2M 64k")
    create(d, "compressed.qcow2", "2M")
    qemu_io(d, "compressed.qcow2", "write -P 1 0 64k", "write -c -P 2 128k 128k")
    qemu_io(d, "compressed.qcow2", "write -P 3 256k 64k")
    create(d, "extl2.qcow2", "2M", "extended_l2=on")
    qemu_io(d, "extl2.qcow2", "write -P 1 0 4k", "write -P 2 8k 2k", "write -z 64k 8k")
    qemu_io(d, "extl2.qcow2", "write -P 3 130k 20k", "write -z 256k 64k")
    create(d, "chain-base.qcow2", "4M")
    qemu_io(d, "chain-base.qcow2", "write -P 1 0 1M", "write -z 1M 512k")
    create(
        d, "extl2-over-qcow2.qcow2", "4M", "extended_l2=on", "-b", "chain-base.qcow2", "-F", "qcow2"
    )
    qemu_io(d, "extl2-over-qcow2.qcow2", "write -P 9 4k 4k", "write -z 70k 2k")
    create(d, "chain-mid.qcow2", "6M", "", "-b", "chain-base.qcow2", "-F", "qcow2")
    qemu_io(d, "chain-mid.qcow2", "write -P 2 512k 128k", "write -z 3M 64k")
    create(d, "chain-top.qcow2", "8M", "", "-b", "chain-mid.qcow2", "-F", "qcow2")
    qemu_io(d, "chain-top.qcow2", "write -P 3 600k 4k", "discard 0 64k", "write -P 3 7M 64k")
    qemu_img(d, "create", "-q", "-f", "raw", "base.raw", "4M")
    qemu_io(d, "base.raw", "write -P 5 0 1M", "write -P 5 2M 4k", fmt="raw")
    create(d, "over-raw.qcow2", "4M", "", "-b", "base.raw", "-F", "raw")
    qemu_io(d, "over-raw.qcow2", "write -P 6 512k 64k")
    (d / "short.raw").write_bytes(b"abc" + bytes(997))
    create(d, "over-short-raw.qcow2", "1M", "", "-b", "short.raw", "-F", "raw")
    create(d, "data-file.qcow2", "2M", "data_file=data-file.bin")
    qemu_io(d, "data-file.qcow2", "write -P 5 100k 100k", "write -z 1M 64k")
    create(d, "data-file-raw.qcow2", "2M", "data_file=data-file-raw.bin,data_file_raw=on")
    qemu_io(d, "data-file-raw.qcow2", "write -P 5 100k 100k")
    create(d, "prealloc-metadata.qcow2", "16M", "preallocation=metadata")
    qemu_io(d, "prealloc-metadata.qcow2", "write -P 5 1M 100k", "write -z 4M 64k")
    create(d, "prealloc-falloc.qcow2", "4M", "preallocation=falloc")
    create(d, "v2.qcow2", "1M", "compat=0.10")
    qemu_io(d, "v2.qcow2", "write -P 5 0 64k", "write -z 128k 64k")
    create(d, "small-clusters.qcow2", "1M", "cluster_size=512")
    qemu_io(d, "small-clusters.qcow2", "write -P 5 1000 3000", "write -z 8k 2k")
    create(d, "big-clusters.qcow2", "8G", "cluster_size=2M")
    qemu_io(d, "big-clusters.qcow2", "write -P 5 3G 1M")
    create(d, "snapshots.qcow2", "8M")
    qemu_io(d, "snapshots.qcow2", "write -P 1 0 1M")
    qemu_img(d, "snapshot", "-c", "s1", "snapshots.qcow2")
    qemu_io(d, "snapshots.qcow2", "write -P 2 2M 2M", "write -z 0 512k")
    qemu_img(d, "resize", "-q", "snapshots.qcow2", "16M")
    qemu_img(d, "snapshot", "-c", "s2", "snapshots.qcow2")
    create(d, "bitmaps.qcow2", "100M")
    qemu_io(d, "bitmaps.qcow2", "write -P 1 0 1M")
    qemu_img(d, "bitmap", "--add", "bitmaps.qcow2", "b1")
    qemu_img(d, "bitmap", "--add", "-g", "512", "bitmaps.qcow2", "a-longer-bitmap-name")
    qemu_img(d, "create", "-q", "-f", "raw", "sparse.raw", "3M")
    qemu_io(d, "sparse.raw", "write -P 7 64k 64k", "write -P 7 1M 4k", fmt="raw")
    (d / "odd.raw").write_bytes(b"\1" * 5000)
    qemu_img(d, "create", "-q", "-f", "qcow", "v1.qcow", "2M")
    qemu_io(
        d, "v1.qcow", "write -P 1 0 64k", "write -P 2 1M 4k", "write -c -P 3 1536k 4k", fmt="qcow"
    )
    settle(d)


def settle(d: Path) -> None:
    """Write back every file of `d`: until then a file system may report a
    just-written region's holes differently (ext4 turns short unwritten
    extents into written zeros at write-back), and map and measure read
    the holes."""
    import os

    for path in d.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def both(d: Path, *args: str) -> tuple[tuple, tuple]:
    """(qemu-img's, qimg's) (exit code, stdout, message) for `args`; run
    back to back, qimg first (a host file's holes can change as the page
    cache fills, so nothing runs between the two)."""
    mine = qimg_here(d, *args)
    theirs = qemu_in(d, "qemu-img", *args)
    return _said(theirs, "qemu-img"), _said(mine, "qimg")


def _said(proc, prog: str) -> tuple[int, str, str]:
    text = message(proc.stderr, prog).replace(f"'{prog} --help'", "'PROG --help'")
    return proc.returncode, proc.stdout, text
