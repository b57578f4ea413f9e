"""Timing helpers shared by the benchmark workloads.

Each measurement runs a whole command (qimg or qemu-img) in a child process
and records its wall time and the child's peak resident memory, so start-up
is included, as a user sees it.
"""

from __future__ import annotations

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


def _run_once(
    cmd: list[str], setup, cwd: str | None, target: str | None = None
) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one run of `cmd`; `target`, a
    file the run creates, is removed first (untimed)."""
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
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()}")
    return wall, peak_kib / 1024.0


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
    the machine's load during the workload weighs on both medians alike.
    `targets`, (qimg's, qemu-img's), are the files the commands create:
    each run starts without its own (a fresh target; the other tool's last
    output stays for a size comparison).
    """
    compile_qimg()
    ours, theirs = [], []
    ours_target, theirs_target = targets or (None, None)
    for _ in range(repeat):
        ours.append(_run_once(qimg_cmd, setup, cwd, ours_target))
        theirs.append(_run_once(qemu_cmd, setup, cwd, theirs_target))
    a = statistics.median(w for w, _ in ours)
    b = statistics.median(w for w, _ in theirs)
    return {
        "workload": name,
        "qimg_s": a,
        "qemu_s": b,
        "ratio": a / b if b else float("inf"),
        "qimg_peak_mib": max(p for _, p in ours),
        "qemu_peak_mib": max(p for _, p in theirs),
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
    print(f"{'workload':<48}{'qimg s':>9}{'qemu s':>9}{'ratio':>8}{'qimg MiB':>10}{'qemu MiB':>10}")
    for r in rows:
        print(
            f"{r['workload']:<48}{r['qimg_s']:>9.3f}{r['qemu_s']:>9.3f}{r['ratio']:>8.2f}"
            f"{r['qimg_peak_mib']:>10.1f}{r['qemu_peak_mib']:>10.1f}"
        )
    sys.stdout.flush()


def rusage_children_peak() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
