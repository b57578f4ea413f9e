"""qimg check vs qemu-img check on the issue's two workloads.

1. 1 TiB, preallocation=metadata, 64 KiB clusters: 16M L2 entries.
2. 250k allocated 4 KiB clusters spread over the disk (built with qemu-io).

Run: python bench/bench_check.py [workdir]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import QIMG, compare, print_table  # noqa: E402


def prealloc_image(path: str) -> None:
    if not os.path.exists(path):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, "1T"],
            check=True,
        )


def scattered_image(path: str, clusters: int = 250_000) -> None:
    if os.path.exists(path):
        return
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "64G"],
        check=True,
    )
    span = (64 << 30) // 4096
    step = span // clusters
    script = "".join(f"write -q {i * step * 4096} 512\n" for i in range(clusters))
    subprocess.run(["qemu-io", path], input=script.encode(), check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="bench-check-")
    a = os.path.join(work, "prealloc-1t.qcow2")
    b = os.path.join(work, "scattered-250k.qcow2")
    prealloc_image(a)
    scattered_image(b)
    rows = [
        compare(
            "check: 1 TiB preallocated metadata", QIMG + ["check", a], ["qemu-img", "check", a], 5
        ),
        compare(
            "check: 250k scattered 4 KiB clusters", QIMG + ["check", b], ["qemu-img", "check", b], 5
        ),
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
