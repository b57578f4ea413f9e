"""`qimg bitmap` against `qemu-img bitmap` on a large sparse image whose
bitmaps are dirty all over (issue 12).

The input: a qcow2 image (64 KiB clusters; 64 GiB by default, `--size 1T`
for the issue's figure) with bitmaps "a" and "src" (64 KiB granularity)
and "fine" (4 KiB), dirtied by qemu-io zero writes (no data allocated) at
WRITES random places across the disk. Each run edits a fresh sparse copy
(not timed); the two tools run alternately; the table gives medians, their
ratio (qimg / qemu-img) and each child's peak RSS (getrusage), after a
first row of start-up alone (--version): the target is qimg's start-up
plus qemu-img's time.

qemu-img rewrites every bitmap of the image on close; qimg writes only the
one that changes.

Run: python bench/bench_bitmap.py [--size 1T] [--repeat N] [workdir]
     or python bench/run.py bitmap
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import compare_command, print_table  # noqa: E402

WRITES = 4000
BITMAPS = {"a": "64k", "src": "64k", "fine": "4k"}
# (workload, qemu-img bitmap arguments with IMG for the image)
EDITS = [
    ("merge (64k into 64k)", ["--merge", "src", "IMG", "a"]),
    ("merge (4k into 64k)", ["--merge", "fine", "IMG", "a"]),
    ("clear", ["--clear", "IMG", "a"]),
    ("remove", ["--remove", "IMG", "fine"]),
]


def _bytes(size: str) -> int:
    units = {"G": 30, "T": 40}
    return int(size[:-1]) << units[size[-1].upper()]


def dirty_image(path: str, size: str) -> None:
    """The input image, made once per size: bitmaps, then zero writes at
    WRITES random 64 KiB-aligned places (every bitmap records them)."""
    if os.path.exists(path):
        return
    tmp = path + ".part"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tmp, size], check=True)
    for name, g in BITMAPS.items():
        subprocess.run(["qemu-img", "bitmap", "--add", "-g", g, tmp, name], check=True)
    rng = random.Random(12)
    clusters = _bytes(size) >> 16
    cmds = [f"write -z {rng.randrange(clusters) << 16} 64k\n" for _ in range(WRITES)]
    subprocess.run(
        ["qemu-io", "-f", "qcow2", tmp],
        input="".join(cmds) + "quit\n",
        text=True,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    os.rename(tmp, path)


def bitmap_rows(directory: str, size: str, repeat: int) -> list[dict]:
    base = os.path.join(directory, f"bitmaps-{size}.qcow2")
    work = os.path.join(directory, "bitmaps-work.qcow2")
    dirty_image(base, size)

    def fresh_copy() -> None:
        subprocess.run(["cp", "--sparse=always", base, work], check=True)

    # The floor: each tool's start-up alone.
    rows = [compare_command("start-up (--version)", ["--version"], repeat=repeat)]
    for label, args in EDITS:
        args = [work if a == "IMG" else a for a in args]
        rows.append(
            compare_command(
                f"bitmap {label}: {size}, {WRITES} places",
                ["bitmap", *args],
                repeat=repeat,
                setup=fresh_copy,
            )
        )
    return rows


def workloads(workdir: str) -> list[dict]:
    """bench/run.py protocol: the rows of the bitmap group (default size)."""
    return bitmap_rows(workdir, "64G", 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?")
    parser.add_argument("--size", default="64G", help="virtual size: 64G (default) or 1T")
    parser.add_argument("--repeat", type=int, default=5)
    opts = parser.parse_args()
    work = opts.workdir or tempfile.mkdtemp(prefix="bench-bitmap-")
    os.makedirs(work, exist_ok=True)
    print_table(bitmap_rows(work, opts.size, opts.repeat))


if __name__ == "__main__":
    main()
