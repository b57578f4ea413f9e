"""Benchmark: encrypted qcow2 convert, qimg against qemu-img in one run.

Workloads (issue 13), on 1 GiB of random data (random: neither tool can
skip or compress it), LUKS with encrypt.iter-time=10 so that PBKDF2 costs
both tools the same few milliseconds:
- raw -> LUKS qcow2 (aes-256-xts-plain64), LUKS qcow2 -> raw;
- raw -> legacy AES qcow2 (aes-128-cbc-plain64), AES qcow2 -> raw.
Targets (ratio qimg / qemu-img): raw->LUKS <= 0.5, LUKS->raw <= 0.8,
AES both ways <= 0.8; peak memory <= 256 MiB.

Each tool reads the image the other made (qemu-img's for the -> raw
workloads), so the data paths are compared on the same input.

    python bench/bench_qcow2_crypto.py [--dir DIR] [--size MiB] [--repeat N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QIMG, compare, print_table, run_once  # noqa: E402

MiB = 1 << 20
SECRET = ["--object", "secret,id=sec,data=bench-pass"]
LUKS = "encrypt.format=luks,encrypt.key-secret=sec,encrypt.iter-time=10"
AES = "encrypt.format=aes,encrypt.key-secret=sec"


def _opts(path: str) -> str:
    return f"driver=qcow2,encrypt.key-secret=sec,file.filename={path}"


def _make_raw(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))


def _rm(*paths: str):
    def setup() -> None:
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)

    return setup


def workloads(d: str) -> list[tuple[str, list[str], list[str], object]]:
    raw = os.path.join(d, "src.raw")
    out = os.path.join(d, "out.qcow2")
    out_raw = os.path.join(d, "out.raw")
    luks = os.path.join(d, "luks.qcow2")
    aes = os.path.join(d, "aes.qcow2")
    rows = []
    for name, opts in (("luks", LUKS), ("aes", AES)):
        tail = [*SECRET, "-O", "qcow2", "-o", opts, raw, out]
        rows.append((f"raw -> {name} qcow2", [*QIMG, "convert", *tail],
                     ["qemu-img", "convert", *tail], _rm(out)))  # fmt: skip
    for name, image in (("luks", luks), ("aes", aes)):
        tail = [*SECRET, "--image-opts", _opts(image), "-O", "raw", out_raw]
        rows.append((f"{name} qcow2 -> raw", [*QIMG, "convert", *tail],
                     ["qemu-img", "convert", *tail], _rm(out_raw)))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir in /dev/shm)")
    ap.add_argument("--size", type=int, default=1024, help="MiB of data (default 1024)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="workload names (substrings) to run")
    args = ap.parse_args(argv)
    parent = args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    d = tempfile.mkdtemp(prefix="qimg-bench-crypto-", dir=parent)
    rows = []
    try:
        raw = os.path.join(d, "src.raw")
        _make_raw(raw, args.size * MiB)
        for image, opts in (("luks.qcow2", LUKS), ("aes.qcow2", AES)):
            cmd = ["qemu-img", "convert", *SECRET, "-O", "qcow2", "-o", opts, raw,
                   os.path.join(d, image)]  # fmt: skip
            run_once(cmd, None, None)  # made again where qemu-img flakes (FLAKY)
        for name, ours, theirs, setup in workloads(d):
            if args.only and not any(o in name for o in args.only):
                continue
            row = compare(name, ours, theirs, repeat=args.repeat, setup=setup)
            print_table([row])
            rows.append(row)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
