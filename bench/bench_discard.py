"""Discard of a whole preallocated image: the library against qemu-io (issue 10).

The input is a 64 GiB image made by `qemu-img create -o preallocation=metadata`
(64 KiB clusters: a million allocated clusters, 128 L2 tables). qimg opens it
through the library in a fresh process and discards the whole disk in one
call; qemu-io discards the same range in 1 GiB steps in one process. Every
run works on a fresh copy of the input (copied sparsely, not timed). The
workload runs on the disk filesystem (workdir) and, where it exists, on
tmpfs (/dev/shm), so that both figures are printed.

Run: python bench/bench_discard.py [workdir]   or   python bench/run.py discard
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import compare, print_table  # noqa: E402

SIZE_GIB = 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QIMG_DISCARD = (
    "import sys, qimg\n"
    "img = qimg.open_image(sys.argv[1], writable=True)\n"
    "img.discard(0, img.size)\n"
    "img.close()\n"
)


def prealloc_image(path: str) -> None:
    if not os.path.exists(path):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata"]
            + [path, f"{SIZE_GIB}G"],
            check=True,
        )


def qemu_io_discard(path: str) -> list[str]:
    """qemu-io discarding the whole disk in 1 GiB steps, one process."""
    cmd = ["qemu-io", "-f", "qcow2"]
    for gib in range(SIZE_GIB):
        cmd += ["-c", f"discard {gib}G 1G"]
    return cmd + [path]


def discard_row(directory: str, label: str) -> dict:
    base = os.path.join(directory, f"prealloc-{SIZE_GIB}g.qcow2")
    work = os.path.join(directory, "discard-work.qcow2")
    prealloc_image(base)

    def fresh_copy() -> None:
        subprocess.run(["cp", "--sparse=always", base, work], check=True)

    # cwd=REPO: `python -c` imports the qimg of this checkout.
    return compare(
        f"discard: {SIZE_GIB} GiB prealloc ({label})",
        [sys.executable, "-c", QIMG_DISCARD, work],
        qemu_io_discard(work),
        repeat=5,
        setup=fresh_copy,
        cwd=REPO,
    )


def floor_row(directory: str) -> dict:
    """The floor of any Python tool that works on tables with numpy: the
    interpreter's and numpy's start-up, beside the same qemu-io discard."""
    base = os.path.join(directory, f"prealloc-{SIZE_GIB}g.qcow2")
    work = os.path.join(directory, "discard-work.qcow2")
    prealloc_image(base)
    return compare(
        "floor: python + import numpy (vs the discard)",
        [sys.executable, "-c", "import numpy"],
        qemu_io_discard(work),
        repeat=5,
        setup=lambda: subprocess.run(["cp", "--sparse=always", base, work], check=True),
    )


def workloads(workdir: str) -> list[dict]:
    """bench/run.py protocol: rows for the discard group (disk, then tmpfs)."""
    rows = [discard_row(workdir, "disk"), floor_row(workdir)]
    if os.path.isdir("/dev/shm"):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="bench-discard-") as shm:
            rows.append(discard_row(shm, "tmpfs"))
    return rows


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="bench-discard-")
    os.makedirs(work, exist_ok=True)
    print_table(workloads(work))


if __name__ == "__main__":
    main()
