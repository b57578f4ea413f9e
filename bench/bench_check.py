"""qimg check vs qemu-img check on the issue's two workloads (issue 3).

1. 1 TiB, preallocation=metadata, 64 KiB clusters: 16M L2 entries (2048 L2
   tables, one every 512 MiB of the file; 513 refcount blocks).
2. "250 thousand allocated 4 KiB clusters spread over the disk": a 4 GiB
   virtual disk with 4 KiB clusters, every fourth guest cluster written
   (250,000 data clusters, about 1 GiB of file, 2048 L2 tables of 512
   entries). qemu-img check takes about 0.1 s on it, as in the issue. The
   image is made by `qemu-img convert` from a sparse raw file (writing the
   clusters one by one with qemu-io takes minutes); convert allocates in
   guest order, as sequential qemu-io writes would.

Both commands print human output to /dev/null; wall time includes start-up.
qimg's modules are byte-compiled first (bench/common.py).

Run: python bench/bench_check.py [workdir]   or   python bench/run.py check
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import compare_command, print_table  # noqa: E402

SCATTERED_CLUSTERS = 250_000
SCATTERED_VIRTUAL = 4 << 30
SCATTERED_CLUSTER_SIZE = 4096


def prealloc_image(path: str) -> None:
    if not os.path.exists(path):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, "1T"],
            check=True,
        )


def scattered_image(path: str) -> None:
    if os.path.exists(path):
        return
    raw = path + ".raw"
    cs = SCATTERED_CLUSTER_SIZE
    step = SCATTERED_VIRTUAL // cs // SCATTERED_CLUSTERS
    fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, SCATTERED_VIRTUAL)
        data = b"\xa5" * cs
        for i in range(SCATTERED_CLUSTERS):
            os.pwrite(fd, data, i * step * cs)
    finally:
        os.close(fd)
    try:
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", "-o", f"cluster_size={cs}", raw, path + ".tmp"],
            check=True,
        )
        os.rename(path + ".tmp", path)
    finally:
        os.unlink(raw)


def workloads(workdir: str) -> list[dict]:
    """bench/run.py protocol: rows for the check group."""
    a = os.path.join(workdir, "prealloc-1t.qcow2")
    b = os.path.join(workdir, "scattered-250k-4k.qcow2")
    prealloc_image(a)
    scattered_image(b)
    return [
        compare_command("check: 1 TiB preallocated metadata", ["check", a], repeat=5),
        compare_command("check: 250k scattered 4 KiB clusters", ["check", b], repeat=5),
    ]


def main() -> None:
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="bench-check-")
    print_table(workloads(work))


if __name__ == "__main__":
    main()
