"""`qimg map --output=json` and `qimg measure` against qemu-img (issue 14).

The input is an image made by `qemu-img create -o preallocation=metadata`
(64 KiB clusters; at 1 TiB, 16 M L2 entries in 2048 tables, every data
cluster allocated over a hole of the host file). qimg and qemu-img run
alternately, start-up included; median wall time and peak memory:

- `map --output=json` (one extent per L2 table: QEMU's metadata
  preallocation guess makes block status ask the host file for holes),
- `measure -O qcow2` (the same walk, counting data clusters),
- `measure` to raw (no walk: start-up only), beside the floor under it:
  the Python interpreter starting with nothing to do, and loading click
  and numpy (common.floor_rows).

Run: python bench/bench_map_measure.py [--size 1T] [--repeat N] [workdir]
     (the workdir should be ext4, e.g. under /tmp)
or   python bench/run.py map_measure
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import compare_command, floor_rows, print_table  # noqa: E402

DEFAULT_SIZE = "1T"


def _input(directory: str, size: str) -> str:
    path = os.path.join(directory, f"prealloc-{size}.qcow2")
    if not os.path.exists(path):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata"]
            + [path + ".tmp", size],
            check=True,
        )
        os.rename(path + ".tmp", path)
    return path


def rows(directory: str, size: str = DEFAULT_SIZE, repeat: int = 3) -> list[dict]:
    image = _input(directory, size)
    cases = [
        ("map --output=json", ["map", "--output=json", image]),
        ("measure -O qcow2", ["measure", "-O", "qcow2", image]),
        ("measure (raw target)", ["measure", image]),
    ]
    found = [
        compare_command(f"{label}: {size} prealloc", args, repeat=repeat) for label, args in cases
    ]
    # The floors under the start-up-only row, against its qemu-img run.
    return found + floor_rows(["qemu-img", "measure", image], repeat=repeat)


def workloads(workdir: str) -> list[dict]:
    """bench/run.py protocol: the map/measure group at the default size."""
    return rows(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", nargs="?", help="scratch directory (ext4; default: in /tmp)")
    parser.add_argument("--size", default=DEFAULT_SIZE, help="virtual size, e.g. 64G")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and workload")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-map-measure-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    print_table(rows(work, args.size, args.repeat))


if __name__ == "__main__":
    main()
