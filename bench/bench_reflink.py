"""Benchmark: convert on a file system that shares extents (XFS, reflink).

The 1 GiB workload of bench_convert (a 4 GiB raw file, 1 MiB chunks every
4 MiB) on an XFS made with `-m reflink=1` in a sparse file and mounted on
a loop device (by this benchmark, as root; unmounted after): raw -> qcow2
and qcow2 -> raw, qimg (sharing the source's extents) against qemu-img
convert (copying), a fresh target for every run. Each qimg target must
pass `qemu-img compare` with the source; the bytes it shares are printed.

Beside the wall-time table (common.compare's rows), the CPU seconds
(user + sys) of each tool are printed, and floor rows: what a Python
process costs before qimg does anything (`python3 -c pass`) and qimg's
start-up (a convert of a 1 MiB raw file), and the clones alone (a Python
process making the same FICLONERANGE calls as the copy needs, one per data
run, from a list computed before the clock starts), timed in the same run,
each against that workload's qemu-img median: a ratio target below a
floor's ratio cannot be met by work on the copy itself.

    python bench/bench_reflink.py [--dir DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import fcntl
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
from common import QIMG, compile_qimg, print_table  # noqa: E402

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


FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)


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


def clone_floor(source: str, target: str, runs_file: str) -> None:
    """The clones alone: one FICLONERANGE per run of `runs_file`."""
    with open(runs_file) as f:
        runs = json.load(f)
    src = os.open(source, os.O_RDONLY)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for offset, length, dest in runs:
        fcntl.ioctl(dst, FICLONERANGE, struct.pack("=qQQQ", src, offset, length, dest))
    os.close(dst)
    os.close(src)


def workloads(workdir: str) -> list[dict]:
    """bench/run.py's protocol."""
    return main([], workdir)


def main(argv: list[str] | None = None, workdir: str | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where the file system's file goes")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool (default 3)")
    args = ap.parse_args(argv)
    work = workdir or args.dir or tempfile.mkdtemp(prefix="qimg-bench-reflink-")
    os.makedirs(work, exist_ok=True)
    mnt = mount_xfs(work)
    if mnt is None:
        return []
    try:
        return _run(mnt, args.repeat)
    finally:
        unmount(mnt)


def _run(mnt: str, repeat: int) -> list[dict]:
    from qimg.reflink import shared_bytes

    src = os.path.join(mnt, "mixed.raw")
    make_mixed_raw(src, 4 * GiB)
    qcow2 = os.path.join(mnt, "mixed.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", src, qcow2], check=True)
    tiny = os.path.join(mnt, "tiny.raw")
    with open(tiny, "wb") as f:
        f.write(os.urandom(1 << 20))
    out_q, out_e = os.path.join(mnt, "out-qimg"), os.path.join(mnt, "out-qemu")

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
        cmd = ["-O", fmt, source]
        floor = [sys.executable, "-c", "pass"]
        startup = QIMG + ["convert", "-O", fmt, tiny, out_q]
        runs_file = os.path.join(mnt, "runs.json")
        runs = clone_runs(source, fmt)
        with open(runs_file, "w") as f:
            json.dump(runs, f)
        clones = [
            sys.executable,
            os.path.abspath(__file__),
            "--clone-floor",
            source,
            out_q,
            runs_file,
        ]
        # All five alternate, so a change of load weighs on each alike.
        times = _alternate(
            [
                QIMG + ["convert", *cmd, out_q],
                ["qemu-img", "convert", *cmd, out_e],
                floor,
                startup,
                clones,
            ],
            repeat,
            fresh,
        )
        ours, theirs = times[0], times[1]
        r = _row(name, ours, theirs)
        floors = [
            _row(f"  floor: {label}", t, theirs)
            for label, t in (
                ("python3 -c pass", times[2]),
                ("qimg start-up (1 MiB)", times[3]),
                (f"the {len(runs)} clones alone", times[4]),
            )
        ]
        rows += [r, *floors]
        fresh()
        subprocess.run(QIMG + ["convert", *cmd, out_q], check=True)
        subprocess.run(["qemu-img", "compare", source, out_q], check=True, capture_output=True)
        print(
            f"{name}: qimg target identical to the source, {shared_bytes(out_q) >> 20} MiB shared"
        )
        print_table([r, *floors])
        print(
            f"{name}: CPU s (user+sys) median qimg {_median(ours, 1):.3f}, "
            f"qemu-img {_median(theirs, 1):.3f}, python3 -c pass {_median(times[2], 1):.3f}, "
            f"qimg start-up {_median(times[3], 1):.3f}, the clones alone {_median(times[4], 1):.3f}"
        )
        fresh()
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
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


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
    if sys.argv[1:2] == ["--clone-floor"]:
        clone_floor(*sys.argv[2:5])
    else:
        print_table(main())
