"""Benchmark runner: qimg against qemu-img on the same workloads, one table.

    python bench/run.py                    # every group
    python bench/run.py foundation check   # some groups
    python bench/run.py --workdir DIR      # keep images (e.g. the 1 GiB one) in DIR
    python bench/run.py convert --dir /mnt/xfs --dir /dev/shm
                                           # convert on these file systems

convert runs its uncompressed workloads on the disk's file system (the
work directory's; ext4 here) and on tmpfs (/dev/shm) in one run, or on
those of the --dir directories.

Protocol: a workload group is a module `bench/bench_<group>.py` that
defines

    def workloads(workdir: str) -> list[dict]

returning rows made by `common.compare()` (keys: workload, qimg_s, qemu_s,
ratio, best_ratio, qimg_spread, qemu_spread, qimg_peak_mib, qemu_peak_mib). `workdir` is a scratch directory the
module may fill and reuse between runs (large inputs are cached there); the
module imports `common` as a top-level module (this directory is on
sys.path). Groups run in GROUPS order; a group whose module does not exist
is skipped with a note. The ratio is qimg/qemu-img wall time (lower is
better, 1.0 is parity), of the medians; "best" is the ratio of each
tool's fastest run, "spread" each tool's slowest run over its fastest
(on a VM that hands free memory back to its host, either tool's run can
take several times as long at random: common._row); peak memory is the
child's maximum RSS.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GROUPS = ("foundation", "check", "convert", "clusters", "discard", "snapshot", "bitmap")
GROUPS += ("compare", "reflink", "chain", "crypto", "map_measure")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("groups", nargs="*", help=f"groups to run (default: {' '.join(GROUPS)})")
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    parser.add_argument(
        "--dir",
        action="append",
        help="a directory whose file system convert's workloads run on (repeatable)",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, HERE)
    from common import print_table

    groups = args.groups or list(GROUPS)
    rows: list[dict] = []
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qimg-bench-", dir=args.workdir) as tmp:
        workdir = args.workdir or tmp
        for group in groups:
            name = f"bench_{group}"
            if not os.path.exists(os.path.join(HERE, name + ".py")):
                print(f"(no {name}.py: group '{group}' skipped)", file=sys.stderr)
                continue
            module = importlib.import_module(name)
            group_dir = os.path.join(workdir, group)
            os.makedirs(group_dir, exist_ok=True)
            if args.dir and "dirs" in inspect.signature(module.workloads).parameters:
                rows.extend(module.workloads(group_dir, dirs=args.dir))
            else:
                rows.extend(module.workloads(group_dir))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
