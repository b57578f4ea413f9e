"""commit and safe rebase of a 4 GiB image (issue 14).

The chain: base.qcow2 (4 GiB, holding 1 GiB: 1 MiB every 4 MiB) <-
top.qcow2 (holding another 1 GiB: 1 MiB every 4 MiB, 2 MiB further on),
and copy.qcow2, a copy of base.qcow2. Workloads, each run on a fresh
sparse copy (not timed), the tools alternately:

- `commit top.qcow2`: 1 GiB written into the base, the top emptied;
- `rebase -b copy.qcow2 -F qcow2 top.qcow2`: the old and the new chains
  read the same, so nothing is copied; both tools read both chains where
  either holds data (2 GiB) and compare.

In /dev/shm where there is one (about 5 GiB, made for the run and removed
after it), so the disk does not decide; else, or with --disk, in workdir
(the inputs stay there; the flush then writes 1 GiB to the disk).

With --floor, only commit, with floor rows, all alternating: `python3 -c
pass`, qimg's start-up (a commit of a 1 MiB overlay), and processes of
copy_floor.py: the base's writes alone (the top's 1 GiB of data runs
written into a fresh file from one buffer, on one thread: the kernel
serialises a file's buffered writes, and commit's copy, a
copy_file_range or a write, is such a write stream), and the same after
importing every module qimg's commit imports.

Run: python bench/bench_chain.py [--repeat N] [--disk] [--floor] [workdir],
or python bench/run.py chain.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import (  # noqa: E402
    QIMG,
    compare_command,
    compile_qimg,
    data_runs,
    floor_table,
    list_modules,
    print_table,
    write_runs,
)

GiB = 1 << 30
MiB = 1 << 20
SIZE = 4 * GiB
STEP = 4 * MiB
FLOOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "copy_floor.py")


def _qemu_io_writes(path: str, first: int, pattern: int) -> None:
    """1 MiB of data at `first` + k * 4 MiB for every k, in batches of
    qemu-io commands."""
    offsets = list(range(first, SIZE, STEP))
    for i in range(0, len(offsets), 256):
        args = []
        for off in offsets[i : i + 256]:
            args += ["-c", f"write -q -P {pattern + (off // STEP) % 200} {off} 1M"]
        subprocess.run(["qemu-io", *args, path], check=True, stdout=subprocess.DEVNULL)


def _prepare(workdir: str) -> dict[str, str]:
    paths = {n: os.path.join(workdir, f"{n}.qcow2") for n in ("base", "top", "copy")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", paths["base"], "4G"], check=True)
    _qemu_io_writes(paths["base"], 0, 1)
    subprocess.run(["cp", "--sparse=always", paths["base"], paths["copy"]], check=True)
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            paths["top"],
        ],
        check=True,
        cwd=workdir,
    )
    _qemu_io_writes(paths["top"], 2 * MiB, 50)
    return paths


def _tiny_chain(workdir: str) -> None:
    """tiny-base.qcow2 (1 MiB) <- tiny-top.qcow2 holding 1 MiB of data."""
    base, top = (os.path.join(workdir, f"tiny-{n}.qcow2") for n in ("base", "top"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "tiny-base.qcow2", "-F", "qcow2", top],
        check=True,
        cwd=workdir,
    )
    subprocess.run(["qemu-io", "-c", "write -q -P 7 0 1M", top], check=True)


def floor_rows(paths: dict[str, str], work: str, repeat: int, fresh) -> list[dict]:
    """--floor: commit with its floor rows (see the module's docstring)."""
    pristine = os.path.dirname(paths["base"])
    _tiny_chain(pristine)
    runs_file, modules_file = os.path.join(work, "runs.bin"), os.path.join(work, "modules.txt")
    out = os.path.join(work, "floor-out")
    top = os.path.join(work, "top.qcow2")
    write_runs(data_runs(paths["top"], "qcow2", "qcow2"), runs_file)
    compile_qimg()
    fresh()
    list_modules(modules_file, ["commit", "-q", top])

    def setup() -> None:
        fresh()
        for name in ("tiny-base", "tiny-top"):
            subprocess.run(["cp", os.path.join(pristine, f"{name}.qcow2"), work], check=True)
        if os.path.exists(out):
            os.unlink(out)
        os.sync()

    floor = [sys.executable, FLOOR]
    labelled = [
        ("qimg", QIMG + ["commit", "-q", top]),
        ("qemu-img", ["qemu-img", "commit", "-q", top]),
        ("python3 -c pass", [sys.executable, "-c", "pass"]),
        (
            "qimg start-up (1 MiB commit)",
            QIMG + ["commit", "-q", os.path.join(work, "tiny-top.qcow2")],
        ),
        ("the base's writes alone", [*floor, "writes", paths["top"], out, runs_file]),
        (
            "qimg's imports + the writes",
            [*floor, "imports+writes", paths["top"], out, runs_file, modules_file],
        ),
    ]
    try:
        return floor_table("commit: 1 GiB into a 4 GiB base", labelled, repeat, setup)
    finally:
        for path in (out, runs_file, modules_file):
            if os.path.exists(path):
                os.unlink(path)


def rows(workdir: str, repeat: int = 3, disk: bool = False, floor: bool = False) -> list[dict]:
    shm = "/dev/shm"
    in_shm = not disk and os.path.isdir(shm) and os.access(shm, os.W_OK)
    if in_shm:  # made afresh and removed after: 5 GiB of memory
        workdir = tempfile.mkdtemp(prefix="qimg-bench-chain-", dir=shm)
    os.makedirs(workdir, exist_ok=True)
    paths = _prepare(workdir)
    work = os.path.join(workdir, "work")
    os.makedirs(work, exist_ok=True)

    def fresh(*names: str):
        def setup() -> None:
            for name in names:
                subprocess.run(
                    ["cp", "--sparse=always", paths[name], os.path.join(work, f"{name}.qcow2")],
                    check=True,
                )

        return setup

    try:
        if floor:
            return floor_rows(paths, work, repeat, fresh("base", "top"))
        return [
            compare_command(
                "commit: 1 GiB into a 4 GiB base",
                ["commit", "-q", "top.qcow2"],
                repeat=repeat,
                setup=fresh("base", "top"),
                cwd=work,
            ),
            compare_command(
                "rebase: onto a copy of the base (no copy)",
                ["rebase", "-q", "-b", "copy.qcow2", "-F", "qcow2", "top.qcow2"],
                repeat=repeat,
                setup=fresh("base", "top", "copy"),
                cwd=work,
            ),
        ]
    finally:
        subprocess.run(["rm", "-rf", workdir if in_shm else work], check=False)


def workloads(workdir: str) -> list[dict]:
    """bench/run.py protocol."""
    return rows(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--disk", action="store_true", help="run in workdir, not /dev/shm")
    parser.add_argument("--floor", action="store_true", help="only commit, with floor rows")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-chain-")
    print_table(rows(work, args.repeat, args.disk, args.floor))


if __name__ == "__main__":
    main()
