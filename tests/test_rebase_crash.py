"""Crash safety of rebase: a crash at any write of the overlay (qimg.faults,
process kill or power loss) leaves an overlay `qemu-img check` finds
without corruptions (leaks allowed) that reads exactly as before: the
copied data lands before the header names the new backing file."""

from __future__ import annotations

import random
import shutil

import pytest
from chaintools import image_map, io, make, overlay
from conftest import qemu_read_raw, run

from qimg.faults import run_until_crash
from qimg.rebase import rebase_image


@pytest.fixture(scope="module")
def chain(qemu_img, qemu_io, tmp_path_factory):
    src = tmp_path_factory.mktemp("rebase-crash")
    make(src, "base.qcow2", "1M", "-o", "cluster_size=4k")
    io(src, "base.qcow2", "write -P 1 0 256k", "write -P 2 512k 64k")
    overlay(src, "top.qcow2", "base.qcow2")
    io(src, "top.qcow2", "write -P 3 128k 200k", "write -z 700k 8k")
    make(src, "new.qcow2", "1M", "-o", "cluster_size=64k")
    io(src, "new.qcow2", "write -P 1 0 64k", "write -P 5 800k 100k")
    return src, qemu_read_raw(src / "top.qcow2", src)


ACTIONS = {
    "onto-other": ("new.qcow2", "qcow2"),
    "flatten": ("", None),
}


@pytest.mark.parametrize("mode", ["kill", "power"])
@pytest.mark.parametrize("target", ACTIONS.values(), ids=ACTIONS.keys())
def test_rebase_crash_leaks_but_never_changes_the_guest_data(chain, tmp_path, target, mode):
    src, data = chain
    work = tmp_path / "w"
    shutil.copytree(src, work)
    top = str(work / "top.qcow2")

    def action(image):
        rebase_image(image, *target)

    faulty, done = run_until_crash(top, action)
    assert done
    total = len(faulty.log)
    rng = random.Random(f"{target}-{mode}")
    # Sampled points, and always the last ones (the header's write and flush).
    points = set(rng.sample(range(total), min(total, 8))) | set(range(max(0, total - 3), total))
    for point in sorted(points):
        shutil.copy(src / "top.qcow2", work / "top.qcow2")
        run_until_crash(top, action, crash_at=point, mode=mode, seed=point)
        proc = run(["qemu-img", "check", "-f", "qcow2", top], check=False)
        assert proc.returncode in (0, 3), f"crash at {point}: {proc.stdout}{proc.stderr}"
        assert qemu_read_raw(work / "top.qcow2", tmp_path) == data, point
        assert image_map(work, "top.qcow2")
