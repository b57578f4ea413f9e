"""A crash anywhere in snapshot -c, -a or -d (qimg.faults, process kill and
power loss) leaves an image whose snapshots and active layer each read
either as before or as after the operation, and that `qemu-img check -r
all` makes clean without losing data (leaks, and OFLAG_COPIED flags that
disagree with a refcount changed in the same step, are what a crash may
leave; QEMU's own snapshot code leaves the same).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run

from qimg.faults import FaultyStorage, run_until_crash
from qimg.formats.qcow2.snapshot import apply_snapshot, create_snapshot, delete_snapshot

POINTS = 5  # crash points per operation and mode
OPS = {
    "create": lambda img: create_snapshot(img, "new", 0, 0),
    "apply": lambda img: apply_snapshot(img, "old"),
    "delete": lambda img: delete_snapshot(img, "old"),
}


def build(d: Path) -> Path:
    """512-byte clusters, data, compressed data and zeros; snapshot "old";
    then the active layer diverges (COW of shared L2 tables and data)."""
    path = d / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "96k"])
    cmds = ["write -c -P 3 32k 8k", "write -P 1 0 16k", "write -z 48k 4k"]
    run(["qemu-io", *sum((["-c", c] for c in cmds), []), str(path)])
    run(["qemu-img", "snapshot", "-c", "old", str(path)])
    run(["qemu-io", "-c", "write -P 7 8k 16k", "-c", "write -P 8 80k 4k", str(path)])
    return path


def layers(path: Path, tmp: Path) -> dict[str, bytes]:
    """Active layer ("") and each snapshot (by name) as qemu-img reads them."""
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
    out = {}
    for name in ["", *(s["name"] for s in info.get("snapshots", []))]:
        raw = tmp / "layer.raw"
        args = ["-l", f"snapshot.name={name}"] if name else []
        run(["qemu-img", "convert", "-U", *args, "-O", "raw", str(path), str(raw)])
        out[name] = raw.read_bytes()
    return out


def run_op(path: Path, op: str, **faults) -> tuple[FaultyStorage, bool]:
    return run_until_crash(str(path), OPS[op], **faults)


@pytest.mark.parametrize("mode", ["kill", "power"])
@pytest.mark.parametrize("op", OPS)
def test_a_crash_in_a_snapshot_operation_loses_nothing(tmp_path, op, mode):
    base = build(tmp_path)
    before = layers(base, tmp_path)
    done = tmp_path / "done.qcow2"
    shutil.copyfile(base, done)
    faulty, _ = run_op(done, op)
    after = layers(done, tmp_path)
    work = tmp_path / "work.qcow2"
    failures = []
    n = faulty.op_count
    # Evenly spread points, first and last included (every point: slow).
    for point in sorted({round(i * (n - 1) / (POINTS - 1)) for i in range(POINTS)}):
        shutil.copyfile(base, work)
        run_op(work, op, crash_at=point, mode=mode, seed=point, tear=point % 2 == 1)
        where = f"{op} {mode} crash at {point}/{n}"
        got = layers(work, tmp_path)
        if got != before and got != after:
            failures.append(f"{where}: layers {sorted(got)} read neither as before nor after")
        repair = run(["qemu-img", "check", "-r", "all", str(work)], check=False)
        recheck = run(["qemu-img", "check", "--output=json", str(work)], check=False)
        if recheck.returncode != 0 or layers(work, tmp_path) != got:
            failures.append(f"{where}: not repaired cleanly\n{repair.stdout}{repair.stderr}")
    assert not failures, f"{len(failures)} bad crash points:\n" + "\n".join(failures[:5])
