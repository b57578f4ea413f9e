"""Benchmark: qimg compare against qemu-img compare, same machine, same run.

Workloads (issue 14): a 4 GiB raw file holding 1 GiB of mixed data (1 MiB
chunks every 4 MiB, alternately text-like and random; bench_convert's
image) compared with its qcow2 copy and with its `-c` zlib copy (both
made by qemu-img), in /dev/shm where there is one. Both images read the
same, so every byte of data is read and compared.

    python bench/bench_compare.py [--dir DIR] [--size GIB] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_convert import make_mixed_raw  # noqa: E402
from common import compare_command, floor_rows, print_table  # noqa: E402

GiB = 1 << 30


def _inputs(work: str, size: int) -> dict[str, str]:
    """The raw image and its copies, made once and kept in `work`."""
    paths = {name: os.path.join(work, f"compare-{name}") for name in ("raw", "qcow2", "zlib")}
    if not os.path.exists(paths["raw"]) or os.path.getsize(paths["raw"]) != size:
        for path in paths.values():
            if os.path.exists(path):
                os.unlink(path)
        make_mixed_raw(paths["raw"], size)
    copies = (("qcow2", []), ("zlib", ["-c"]))
    for name, extra in copies:
        if not os.path.exists(paths[name]):
            subprocess.run(
                ["qemu-img", "convert", "-O", "qcow2", *extra, paths["raw"], paths[name]],
                check=True,
            )
    return paths


def workloads(workdir: str) -> list[dict]:
    """bench/run.py's protocol."""
    return main([], workdir)


def main(argv: list[str] | None = None, workdir: str | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir in /dev/shm)")
    ap.add_argument("--size", type=int, default=4, help="image size in GiB (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool (default 3)")
    args = ap.parse_args(argv)
    parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = workdir or args.dir or tempfile.mkdtemp(prefix="qimg-bench-compare-", dir=parent)
    os.makedirs(work, exist_ok=True)
    p = _inputs(work, args.size * GiB)
    rows = []
    for name in ("qcow2", "zlib"):
        rows.append(
            compare_command(
                f"compare raw vs {name} ({args.size} GiB, 1/4 data)",
                ["compare", p["raw"], p[name]],
                repeat=args.repeat,
            )
        )
    rows += floor_rows(["qemu-img", "compare", p["raw"], p["qcow2"]], repeat=args.repeat)
    return rows


if __name__ == "__main__":
    print_table(main())
