"""Benchmark: convert to qcow2 with small clusters, qimg against qemu-img.

Workload (issue 10): 256 MiB of random data, raw -> qcow2 with 512-byte
clusters (`-o cluster_size=512`): 524,288 data clusters, 8,192 L2 tables
and 2,048 refcount blocks, so the cost per metadata table (the overlap
check, refcount allocation) shows rather than the cost of copying.

Run on the disk file system (the work directory; the default is one under
/tmp) and, with --tmpfs, also on /dev/shm. Prints wall-time ratios
(qimg / qemu-img, median) and peak memory. Usage:

    python bench/bench_clusters.py [--dir DIR] [--tmpfs] [--repeat N] [--size MIB]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QIMG, compare, print_table  # noqa: E402

MiB = 1 << 20


def make_random_raw(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def _sync() -> None:
    os.sync()  # start each run without the previous run's dirty pages


def _rm(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)


def small_clusters(workdir: str, label: str, size: int, repeat: int) -> dict:
    """raw -> qcow2 at cluster_size=512 of `size` bytes of random data in `workdir`."""
    src = os.path.join(workdir, "random.raw")
    if not os.path.exists(src) or os.path.getsize(src) != size:
        make_random_raw(src, size)
    out_q, out_e = os.path.join(workdir, "out-qimg.qcow2"), os.path.join(workdir, "out-qemu.qcow2")
    _rm(out_q, out_e)
    cmd = ["convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", src]
    row = compare(
        f"raw->qcow2 cluster_size=512 {size // MiB} MiB ({label})",
        QIMG + [*cmd, out_q],
        ["qemu-img", *cmd, out_e],
        repeat=repeat,
        setup=_sync,
    )
    _rm(out_q, out_e)
    return row


def workloads(workdir: str) -> list[dict]:
    """bench/run.py's protocol: the disk workload at full size."""
    return main([], workdir)


def main(argv: list[str] | None = None, workdir: str | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="work directory on disk (default: one in /tmp)")
    ap.add_argument("--tmpfs", action="store_true", help="also run in a directory on /dev/shm")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool (default 3)")
    ap.add_argument("--size", type=int, default=256, help="MiB of random data (default 256)")
    args = ap.parse_args(argv)
    size = args.size * MiB
    work = workdir or args.dir or tempfile.mkdtemp(prefix="qimg-bench-clusters-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = [small_clusters(work, "disk", size, args.repeat)]
    print_table(rows[-1:])
    if args.tmpfs and os.path.isdir("/dev/shm"):
        shm = tempfile.mkdtemp(prefix="qimg-bench-clusters-", dir="/dev/shm")
        try:
            rows.append(small_clusters(shm, "tmpfs", size, args.repeat))
            print_table(rows[-1:])
        finally:
            shutil.rmtree(shm)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return rows


if __name__ == "__main__":
    main()
