"""amend -o refcount_bits=64 and resize to twice the size and back (issue 11).

The input is an image made by `qemu-img create -o preallocation=metadata`
(64 KiB clusters; every cluster mapped). Each run of each tool works on a
fresh sparse copy (not timed): `amend -o refcount_bits=64` of the image,
`resize` of it to twice its size, and `resize --shrink` of the doubled image
back to its size. The tools run alternately; the medians and their ratio
(qimg / qemu-img) are printed.

Run: python bench/bench_resize_amend.py [--size-gib N] [--repeat N] [workdir]
(default 16 GiB; the issue's figure is --size-gib 1024), or
python bench/run.py resize_amend where run.py lists the group.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import compare, compare_command, print_table  # noqa: E402

DEFAULT_GIB = 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prealloc(path: str, size: str) -> None:
    if not os.path.exists(path):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, size],
            check=True,
        )


def rows(workdir: str, size_gib: int = DEFAULT_GIB, repeat: int = 3) -> list[dict]:
    base = os.path.join(workdir, f"prealloc-{size_gib}g.qcow2")
    grown = os.path.join(workdir, f"prealloc-{size_gib}g-grown.qcow2")
    work = os.path.join(workdir, "resize-amend-work.qcow2")
    _prealloc(base, f"{size_gib}G")
    if not os.path.exists(grown):
        subprocess.run(["cp", "--sparse=always", base, grown], check=True)
        subprocess.run(["qemu-img", "resize", "-q", grown, f"{2 * size_gib}G"], check=True)

    def fresh(source: str):
        return lambda: subprocess.run(["cp", "--sparse=always", source, work], check=True)

    label = f"{size_gib} GiB prealloc"
    return [
        # qimg's start-up for a metadata change (interpreter, numpy, the
        # qcow2 driver) against qemu-img's: the issue bounds resize by
        # start-up plus qemu-img's time.
        compare(
            "start-up: import of the qcow2 driver",
            [sys.executable, "-c", "import qimg.resize, qimg.formats.qcow2.resize"],
            ["qemu-img", "--version"],
            repeat=repeat,
            cwd=REPO,
        ),
        compare_command(
            f"amend refcount_bits=64: {label}",
            ["amend", "-o", "refcount_bits=64", work],
            repeat=repeat,
            setup=fresh(base),
        ),
        compare_command(
            f"resize to 2x: {label}",
            ["resize", "-q", work, f"{2 * size_gib}G"],
            repeat=repeat,
            setup=fresh(base),
        ),
        compare_command(
            f"resize --shrink back: {label}",
            ["resize", "-q", "--shrink", work, f"{size_gib}G"],
            repeat=repeat,
            setup=fresh(grown),
        ),
    ]


def workloads(workdir: str) -> list[dict]:
    """bench/run.py protocol."""
    return rows(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?")
    parser.add_argument("--size-gib", type=int, default=DEFAULT_GIB)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-resize-amend-")
    os.makedirs(work, exist_ok=True)
    print_table(rows(work, args.size_gib, args.repeat))


if __name__ == "__main__":
    main()
