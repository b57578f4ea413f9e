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
file); and processes of reflink_floor.py that make the same FICLONERANGE
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
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if os.path.dirname(HERE) not in sys.path:  # the checkout's qimg (FIEMAP reader)
    sys.path.append(os.path.dirname(HERE))
from bench_convert import make_mixed_raw  # noqa: E402
from common import GNU_TIME, QIMG, compile_qimg, print_table  # noqa: E402

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


FLOOR = os.path.join(HERE, "reflink_floor.py")
# The target's zero-detection block (convert's plan.block with -S 4k):
# a qcow2 target's cluster, 4 KiB for a raw one.
SCAN_BLOCK = {"qcow2": 64 << 10, "raw": 4 << 10}
# qimg's convert, listing the modules it imported into the file named first.
LIST_MODULES = (
    "import atexit, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write('\\n'.join(sys.modules)))\n"
    "sys.argv[0] = 'qimg'\n"
    "from qimg.cli import run\n"
    "run()\n"
)


def clone_runs(source: str, fmt: str) -> list[tuple[int, int, int]]:
    """(source offset, length, target offset) of each data run a copy of
    `source` (raw or qcow2, by qemu-img map) to `fmt` must clone: to a raw
    target at its guest offset, to a qcow2 target packed one after another
    (where a fresh image's data clusters go)."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "raw" if fmt == "qcow2" else "qcow2", source],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    runs, packed = [], 1 << 20
    for ext in json.loads(out):
        if ext.get("data") and "offset" in ext:
            dst = ext["start"] if fmt == "raw" else packed
            runs.append((ext["offset"], ext["length"], dst))
            packed += ext["length"]
    return runs


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
        runs = clone_runs(source, fmt)
        with open(runs_file, "wb") as f:
            f.write(struct.pack(f"={3 * len(runs)}q", *(x for run in runs for x in run)))
        # Untimed: the modules qimg imports, and its target checked.
        fresh()
        subprocess.run(
            [sys.executable, "-c", LIST_MODULES, modules_file, "convert", *cmd, out_q], check=True
        )
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
        # All of them alternate, so a change of load weighs on each alike.
        times = _alternate([c for _label, c in labelled], repeat, fresh)
        theirs = times[1]
        r = _row(name, times[0], theirs)
        floors = [
            _row(f"  floor: {label}", t, theirs) for (label, _c), t in zip(labelled[2:], times[2:])
        ]
        rows += [r, *floors]
        print(f"{name}: qimg target identical to the source, {shared} MiB shared")
        print_table([r, *floors])
        cpu = ", ".join(f"{label} {_median(t, 1):.3f}" for (label, _c), t in zip(labelled, times))
        print(f"{name}: CPU s (user+sys) medians: {cpu}")
        fresh()
    for path in (runs_file, modules_file, tiny):
        if os.path.exists(path):
            os.unlink(path)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return rows


def _alternate(cmds: list[list[str]], repeat: int, setup) -> list[list[tuple]]:
    """(wall s, CPU s, peak RSS MiB) of `repeat` runs of each command, the
    commands taking turns; `setup` (untimed) before each run."""
    out: list[list[tuple]] = [[] for _ in cmds]
    for _ in range(repeat):
        for i, cmd in enumerate(cmds):
            setup()
            out[i].append(_timed(cmd))
    return out


def _timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one run. The peak is GNU time's
    where there is one: a child forked from this process starts with this
    process's resident pages counted in its ru_maxrss."""
    with tempfile.NamedTemporaryFile("r", prefix="bench-rss-") as rss:
        argv = [GNU_TIME, "-q", "-f", "%M", "-o", rss.name, *cmd] if GNU_TIME else cmd
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        peak_kib = usage.ru_maxrss
        lines = rss.read().split() if GNU_TIME else []
        if lines and lines[-1].isdigit():
            peak_kib = int(lines[-1])
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip()}")
    return wall, usage.ru_utime + usage.ru_stime, peak_kib / 1024.0


def _median(runs: list[tuple], field: int) -> float:
    return statistics.median(run[field] for run in runs)


def _row(name: str, ours: list[tuple], theirs: list[tuple]) -> dict:
    """A row as common.compare makes it (ratio of wall-time medians)."""
    a, b = _median(ours, 0), _median(theirs, 0)
    return {
        "workload": name,
        "qimg_s": a,
        "qemu_s": b,
        "ratio": a / b if b else float("inf"),
        "qimg_peak_mib": max(run[2] for run in ours),
        "qemu_peak_mib": max(run[2] for run in theirs),
    }


if __name__ == "__main__":
    print_table(main())
