"""Internal snapshots of a preallocated image: `qimg snapshot` against
`qemu-img snapshot` (issue 11).

The input is an image made by `qemu-img create -o preallocation=metadata`
(64 KiB clusters; at 1 TiB, 16 M L2 entries). Four workloads, each run on a
fresh sparse copy of its input (copying is not timed), qimg and qemu-img
alternately, median wall time and peak memory reported:

- `-c` on the image without snapshots (every OFLAG_COPIED cleared),
- `-c` on the image with one snapshot already (flags already clear),
- `-d` of that snapshot, and `-a` of it.

Run: python bench/bench_snapshot.py [--size 1T] [--repeat N] [workdir]
     (the default size is 64G; the workdir should be ext4, e.g. under /tmp)
or   python bench/run.py snapshot
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import compare_command, print_table  # noqa: E402

DEFAULT_SIZE = "64G"


def _inputs(directory: str, size: str) -> tuple[str, str]:
    """(image without snapshots, image with snapshot "s1"), made once."""
    plain = os.path.join(directory, f"prealloc-{size}.qcow2")
    snapped = os.path.join(directory, f"prealloc-{size}-s1.qcow2")
    if not os.path.exists(plain):
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata"]
            + [plain, size],
            check=True,
        )
    if not os.path.exists(snapped):
        subprocess.run(["cp", "--sparse=always", plain, snapped + ".tmp"], check=True)
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", snapped + ".tmp"], check=True)
        os.rename(snapped + ".tmp", snapped)
    return plain, snapped


def rows(directory: str, size: str = DEFAULT_SIZE, repeat: int = 3) -> list[dict]:
    plain, snapped = _inputs(directory, size)
    work = os.path.join(directory, "snapshot-work.qcow2")
    cases = [
        ("-c (first)", plain, ["-c", "s2"]),
        ("-c (second)", snapped, ["-c", "s2"]),
        ("-d", snapped, ["-d", "s1"]),
        ("-a", snapped, ["-a", "s1"]),
    ]
    out = []
    for label, source, args in cases:

        def fresh_copy(source: str = source) -> None:
            subprocess.run(["cp", "--sparse=always", source, work], check=True)

        out.append(
            compare_command(
                f"snapshot {label}: {size} prealloc",
                ["snapshot", *args, work],
                repeat=repeat,
                setup=fresh_copy,
            )
        )
    os.unlink(work)
    return out


def workloads(workdir: str) -> list[dict]:
    """bench/run.py protocol: the snapshot group at the default size."""
    return rows(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir", nargs="?", help="scratch directory (ext4; default: in /tmp)")
    parser.add_argument("--size", default=DEFAULT_SIZE, help="virtual size, e.g. 1T")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and workload")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-snapshot-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    print_table(rows(work, args.size, args.repeat))


if __name__ == "__main__":
    main()
