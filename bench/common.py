"""Timing helpers shared by the benchmark workloads.

Each measurement runs a whole command (qimg or qemu-img) in a child process
and records its wall time and the child's peak resident memory, so start-up
is included, as a user sees it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# The benches time this checkout's qimg, installed or not (as the tests
# do): its root leads sys.path here and PYTHONPATH in every child.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
QIMG = [sys.executable, "-m", "qimg"]
_compiled = False


def compile_qimg() -> None:
    """Byte-compile qimg once per run, before anything is timed: an installed
    qimg has its .pyc files, but a checkout run with PYTHONDONTWRITEBYTECODE
    (as this sandbox sets it) would compile every module at every start."""
    global _compiled
    if _compiled:
        return
    import qimg

    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", os.path.dirname(qimg.__file__)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    _compiled = True


# GNU time reports the peak RSS of a child forked from its own small
# process: a child forked from this one starts with this process's
# resident pages counted in its ru_maxrss (a bench that imported numpy
# or qimg would lift every row to its own size).
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run_once(
    cmd: list[str], setup, cwd: str | None, target: str | None = None, tries: int = 50
) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one run of `cmd`; `target`, a
    file the run creates, is removed first (untimed). A run that fails
    with FLAKY is made again, up to `tries` runs in all."""
    if target is not None and os.path.lexists(target):
        os.unlink(target)
    if setup is not None:
        setup()
    # Dirty pages of earlier runs (the other tool's output, a fresh input)
    # are written back now, not during this run's timing.
    os.sync()
    with tempfile.NamedTemporaryFile("r", prefix="bench-rss-") as rss:
        argv = [GNU_TIME, "-q", "-f", "%M", "-o", rss.name, *cmd] if GNU_TIME else cmd
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        peak_kib = usage.ru_maxrss
        if GNU_TIME:
            lines = rss.read().split()
            peak_kib = int(lines[-1]) if lines and lines[-1].isdigit() else peak_kib
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode not in (0, 2, 3):
        if FLAKY in err and tries > 1:
            return run_once(cmd, setup, cwd, target, tries - 1)
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()}")
    return wall, peak_kib / 1024.0


# qemu-img 7.2 fails a LUKS key slot's PBKDF2 benchmark now and then with
# a short iter-time (encrypt.iter-time=10): such a run is made again, its
# time not counted, up to 50 runs in all as the tests do
# (conftest.run_timing_pbkdf: 7 of 30 creations failed idle, 17 of 30 with
# both cores busy; 5 runs left an idle bench one failure in about 1,600).
FLAKY = "Unable to get accurate CPU usage"


# _warm_up: on a VM that hands free memory back to its host, the first run
# after a pause (the previous workload's end, the inputs being made) takes
# the freed memory the host has taken back, and runs up to 5 times as long:
# hand runs of a 1 GiB convert, a 1 GiB commit and an 8 GiB convert, a few
# rounds after each pause, had their first run slow in 7 of 8 rounds (qimg
# qcow2->qcow2 of 8 GiB: 11.3 and 11.5 s first, 6.0-6.5 s after; qemu-img
# 6.0-6.6 s). The first timed run being always qimg's, one untimed run of
# the other command comes first, so every timed run follows another's.


def compare(
    name: str,
    qimg_cmd: list[str],
    qemu_cmd: list[str],
    repeat: int = 3,
    setup=None,
    cwd: str | None = None,
    targets: tuple[str, str] | None = None,
) -> dict:
    """Time qimg and qemu-img on the same workload; ratio = qimg / qemu-img.

    The two tools run alternately (qimg, qemu-img, qimg, ...), so a change in
    the machine's load during the workload weighs on both medians alike,
    after one untimed run of qemu-img (_warm_up).
    `targets`, (qimg's, qemu-img's), are the files the commands create:
    each run starts without its own (a fresh target; the other tool's last
    output stays for a size comparison).
    """
    compile_qimg()
    ours, theirs = [], []
    ours_target, theirs_target = targets or (None, None)
    run_once(qemu_cmd, setup, cwd, theirs_target)  # _warm_up
    for _ in range(repeat):
        ours.append(run_once(qimg_cmd, setup, cwd, ours_target))
        theirs.append(run_once(qemu_cmd, setup, cwd, theirs_target))
    return _row(name, [w for w, _ in ours], [w for w, _ in theirs],
                max(p for _, p in ours), max(p for _, p in theirs))  # fmt: skip


def _row(name: str, ours: list[float], theirs: list[float], our_peak: float, their_peak: float):
    """A table row: the ratio of the wall-time medians, and of the fastest
    runs ("best"). On a VM that hands free memory back to its host, a run
    whose fresh pages the host must fault in again takes up to 10 times
    as long, for either tool, at random: a median of few runs is decided
    by how many of them that hit, the fastest run is each tool's own cost.
    The spread (slowest / fastest run of each tool) shows how much hit."""
    a, b = statistics.median(ours), statistics.median(theirs)
    return {
        "workload": name,
        "qimg_s": a,
        "qemu_s": b,
        "ratio": a / b if b else float("inf"),
        "best_ratio": min(ours) / min(theirs) if min(theirs) else float("inf"),
        "qimg_spread": max(ours) / min(ours) if min(ours) else float("inf"),
        "qemu_spread": max(theirs) / min(theirs) if min(theirs) else float("inf"),
        "qimg_peak_mib": our_peak,
        "qemu_peak_mib": their_peak,
    }


def compare_command(name: str, args: list[str], **kw) -> dict:
    """`compare` of `qimg ARGS...` against `qemu-img ARGS...`."""
    return compare(name, QIMG + args, ["qemu-img", *args], **kw)


# What every qimg row pays before its own work: the interpreter with nothing
# to do, and the interpreter loading the libraries qimg's commands load.
FLOORS = (
    ("python3 -c pass", [sys.executable, "-c", "pass"]),
    ("python3 importing click", [sys.executable, "-c", "import click"]),
    ("python3 importing click, numpy", [sys.executable, "-c", "import click, numpy"]),
)


def floor_rows(qemu_cmd: list[str], repeat: int = 3) -> list[dict]:
    """Rows timing each of FLOORS against `qemu_cmd` in the same run: a
    ratio target below a floor's ratio is out of reach of any Python
    program of this design."""
    return [compare(f"  floor: {label}", cmd, qemu_cmd, repeat=repeat) for label, cmd in FLOORS]


def filesystem(path: str) -> str:
    """The type of the file system holding `path` (ext4, tmpfs, ...), from
    the longest mount point above it in /proc/self/mounts."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                mnt = fields[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, kind = mnt, fields[2]
    except OSError:
        pass
    return kind


def print_table(rows: list[dict]) -> None:
    """The rows: median wall times and their ratio, the ratio of the
    fastest runs (best) and each tool's spread where a row has them
    (_row), peak memory."""
    print(
        f"{'workload':<48}{'qimg s':>9}{'qemu s':>9}{'ratio':>8}{'best':>7}{'spread':>12}"
        f"{'qimg MiB':>10}{'qemu MiB':>10}"
    )
    for r in rows:
        best = f"{r['best_ratio']:>7.2f}" if "best_ratio" in r else f"{'':>7}"
        spread = (
            f"{r['qimg_spread']:>6.1f}/{r['qemu_spread']:<5.1f}" if "qimg_spread" in r else " " * 12
        )
        print(
            f"{r['workload']:<48}{r['qimg_s']:>9.3f}{r['qemu_s']:>9.3f}{r['ratio']:>8.2f}{best}"
            f"{spread}{r['qimg_peak_mib']:>10.1f}{r['qemu_peak_mib']:>10.1f}"
        )
    sys.stdout.flush()


def rusage_children_peak() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


# A qimg command, listing the modules it imported into the file named first.
_LIST_MODULES = (
    "import atexit, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write('\\n'.join(sys.modules)))\n"
    "sys.argv[0] = 'qimg'\n"
    "from qimg.cli import run\n"
    "run()\n"
)


def list_modules(modules_file: str, args: list[str]) -> None:
    """Run `qimg ARGS...` (untimed), the modules it imported written one a
    line into `modules_file`, in import order (copy_floor.py's MODULES)."""
    subprocess.run([sys.executable, "-c", _LIST_MODULES, modules_file, *args], check=True)


def data_runs(source: str, src_fmt: str, fmt: str) -> list[tuple[int, int, int]]:
    """(source offset, length, target offset) of each data run a copy of
    `source` (of format `src_fmt`, mapped by qemu-img) to `fmt` must copy
    or clone: to a raw target at its guest offset, to a qcow2 target
    packed one after another (where a fresh image's data clusters go).
    The source's own data only: not its backing files'."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", src_fmt, source],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    runs, packed = [], 1 << 20
    for ext in json.loads(out):
        if ext.get("data") and "offset" in ext and ext.get("depth", 0) == 0:
            dst = ext["start"] if fmt == "raw" else packed
            runs.append((ext["offset"], ext["length"], dst))
            packed += ext["length"]
    return runs


def alternate(cmds: list[list[str]], repeat: int, setup) -> list[list[tuple]]:
    """(wall s, CPU s, peak RSS MiB) of `repeat` runs of each command, the
    commands taking turns; `setup` (untimed) before each run, and one
    untimed run of the last command before the first (_warm_up)."""
    out: list[list[tuple]] = [[] for _ in cmds]
    setup()
    timed_run(cmds[-1])  # _warm_up
    for _ in range(repeat):
        for i, cmd in enumerate(cmds):
            setup()
            out[i].append(timed_run(cmd))
    return out


def timed_run(cmd: list[str]) -> tuple[float, float, float]:
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


def median_of(runs: list[tuple], field: int) -> float:
    return statistics.median(run[field] for run in runs)


def ratio_row(name: str, ours: list[tuple], theirs: list[tuple]) -> dict:
    """A row as common.compare makes it (ratio of wall-time medians)."""
    return _row(
        name,
        [run[0] for run in ours],
        [run[0] for run in theirs],
        max(run[2] for run in ours),
        max(run[2] for run in theirs),
    )


def write_runs(runs: list[tuple[int, int, int]], path: str) -> None:
    """RUNS for copy_floor.py: the (source offset, length, target offset)
    triples as native 64-bit integers."""
    import struct

    with open(path, "wb") as f:
        f.write(struct.pack(f"={3 * len(runs)}q", *(x for run in runs for x in run)))


def floor_table(name: str, labelled: list[tuple[str, list[str]]], repeat: int, setup) -> list[dict]:
    """The rows of one workload with its floor rows: `labelled` is (label,
    command) of qimg, qemu-img, then each floor, all alternating (so a
    change of load weighs on each alike), `setup` before each run; every
    row's ratio is against qemu-img's median. Prints them, and the CPU
    seconds (user + sys) of each."""
    times = alternate([cmd for _label, cmd in labelled], repeat, setup)
    theirs = times[1]
    rows = [ratio_row(name, times[0], theirs)]
    rows += [
        ratio_row(f"  floor: {label}", t, theirs) for (label, _c), t in zip(labelled[2:], times[2:])
    ]
    print_table(rows)
    cpu = ", ".join(f"{label} {median_of(t, 1):.3f}" for (label, _c), t in zip(labelled, times))
    print(f"{name}: CPU s (user+sys) medians: {cpu}")
    return rows
