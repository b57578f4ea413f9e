"""Benchmark: convert on a file system that shares extents (XFS, reflink).

The 1 GiB workload of bench_convert (a 4 GiB raw file, 1 MiB chunks every
4 MiB) on an XFS made with `-m reflink=1` in a sparse file and mounted on
a loop device (by this benchmark, as root; unmounted after): raw -> qcow2
and qcow2 -> raw, qimg (sharing the source's extents) against qemu-img
convert (copying), a fresh target for every run. Each qimg target must
pass `qemu-img compare` with the source; the bytes it shares are printed.

Beside the wall-time table (common.compare's rows), the CPU seconds
(user + sys) of each row are printed, and floor rows, each against that
workload's qemu-img median: what a Python process costs before qimg does
anything (`python3 -c pass`); qimg's start-up (a convert of a 1 MiB raw
file); and processes of copy_floor.py that make the same FICLONERANGE
calls as the copy needs, one per data run, from a list computed before
the clock starts: the clones alone; after importing every module qimg's
convert imports (listed by an untimed convert of the workload); and after
those imports and the zero scan too (each run read through one mapping of
the source, the first and last words of each block as qimg's scan reads
them). A ratio target below a floor's ratio cannot be met by work on the
copy itself: the last row is the least a Python program that scans and
shares as qimg does must spend.

    python bench/bench_reflink.py [--dir DIR | --mnt MNT] [--repeat N] [--only NAME]

--mnt uses a reflink XFS mounted at MNT already (nothing is mounted or
unmounted, and the workload's files are kept there for the next run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:  # the checkout's qimg (FIEMAP reader)
    sys.path.append(os.path.dirname(HERE))
from bench_convert import make_mixed_raw  # noqa: E402
from common import (  # noqa: E402
    QIMG,
    compile_qimg,
    data_runs,
    floor_table,
    list_modules,
    print_table,
    write_runs,
)

GiB = 1 << 30
FS_SIZE = 8 * GiB  # sparse: the source, its qcow2 and qemu-img's copy take ~3 GiB


def mount_xfs(workdir: str) -> str | None:
    """A fresh reflink XFS in `workdir`, mounted; its mount point, or None
    (with the reason printed) where it cannot be made or mounted."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        print("(reflink: needs root and mkfs.xfs (xfsprogs): skipped)", file=sys.stderr)
        return None
    image, mnt = os.path.join(workdir, "xfs.img"), os.path.join(workdir, "mnt")
    if os.path.exists(image):
        os.unlink(image)
    with open(image, "wb") as f:
        f.truncate(FS_SIZE)
    os.makedirs(mnt, exist_ok=True)
    for cmd in (["mkfs.xfs", "-q", "-m", "reflink=1", image], ["mount", "-o", "loop", image, mnt]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"(reflink: {' '.join(cmd)}: {proc.stderr.strip()}: skipped)", file=sys.stderr)
            os.unlink(image)
            return None
    return mnt


def unmount(mnt: str) -> None:
    if subprocess.run(["umount", mnt], capture_output=True).returncode:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    image = os.path.join(os.path.dirname(mnt), "xfs.img")
    if os.path.exists(image):
        os.unlink(image)


FLOOR = os.path.join(HERE, "copy_floor.py")
# The target's zero-detection block (convert's plan.block with -S 4k):
# a qcow2 target's cluster, 4 KiB for a raw one.
SCAN_BLOCK = {"qcow2": 64 << 10, "raw": 4 << 10}


def workloads(workdir: str) -> list[dict]:
    """bench/run.py's protocol."""
    return main([], workdir)


def main(argv: list[str] | None = None, workdir: str | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where the file system's file goes")
    ap.add_argument("--mnt", default=None, help="a reflink XFS mounted there already")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool (default 3)")
    ap.add_argument("--only", default=None, help="the one workload to run (e.g. raw->qcow2)")
    args = ap.parse_args(argv)
    if args.mnt:
        return _run(args.mnt, args.repeat, args.only)
    work = workdir or args.dir or tempfile.mkdtemp(prefix="qimg-bench-reflink-")
    os.makedirs(work, exist_ok=True)
    mnt = mount_xfs(work)
    if mnt is None:
        return []
    try:
        return _run(mnt, args.repeat, args.only)
    finally:
        unmount(mnt)


def _run(mnt: str, repeat: int, only: str | None = None) -> list[dict]:
    from qimg.reflink import shared_bytes

    src = os.path.join(mnt, "mixed.raw")
    qcow2 = os.path.join(mnt, "mixed.qcow2")
    if not os.path.exists(src):
        make_mixed_raw(src, 4 * GiB)
    if not os.path.exists(qcow2):
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", src, qcow2], check=True)
    tiny = os.path.join(mnt, "tiny.raw")
    with open(tiny, "wb") as f:
        f.write(os.urandom(1 << 20))
    out_q, out_e = os.path.join(mnt, "out-qimg"), os.path.join(mnt, "out-qemu")
    runs_file, modules_file = os.path.join(mnt, "runs.bin"), os.path.join(mnt, "modules.txt")

    def fresh() -> None:
        for path in (out_q, out_e):
            if os.path.exists(path):
                os.unlink(path)
        os.sync()  # no run pays for the previous one's dirty pages

    compile_qimg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for name, fmt, source in (
        ("xfs reflink raw->qcow2", "qcow2", src),
        ("xfs reflink qcow2->raw", "raw", qcow2),
    ):
        if only and only not in name:
            continue
        cmd = ["-O", fmt, source]
        runs = data_runs(source, "raw" if fmt == "qcow2" else "qcow2", fmt)
        write_runs(runs, runs_file)
        # Untimed: the modules qimg imports, and its target checked.
        fresh()
        list_modules(modules_file, ["convert", *cmd, out_q])
        subprocess.run(["qemu-img", "compare", source, out_q], check=True, capture_output=True)
        shared = shared_bytes(out_q) >> 20
        floor = [sys.executable, FLOOR]
        block = str(SCAN_BLOCK[fmt])
        labelled = [
            ("qimg", QIMG + ["convert", *cmd, out_q]),
            ("qemu-img", ["qemu-img", "convert", *cmd, out_e]),
            ("python3 -c pass", [sys.executable, "-c", "pass"]),
            ("qimg start-up (1 MiB)", QIMG + ["convert", "-O", fmt, tiny, out_q]),
            (f"the {len(runs)} clones alone", [*floor, "clones", source, out_q, runs_file]),
            (
                "qimg's imports + the clones",
                [*floor, "imports+clones", source, out_q, runs_file, modules_file],
            ),
            (
                "imports + zero scan + clones",
                [*floor, "imports+scan+clones", source, out_q, runs_file, modules_file, block],
            ),
        ]
        rows += floor_table(name, labelled, repeat, fresh)
        print(f"{name}: qimg target identical to the source, {shared} MiB shared")
        fresh()
    for path in (runs_file, modules_file, tiny):
        if os.path.exists(path):
            os.unlink(path)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return rows


if __name__ == "__main__":
    print_table(main())
