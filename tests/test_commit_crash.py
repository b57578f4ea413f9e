"""Crash safety of commit: a crash at any write of the base or of the top
(qimg.faults, process kill or power loss) leaves both images without
corruptions for `qemu-img check` (leaks allowed); the top reads exactly as
before (the base holds the data durably before the top lets it go), and
each cluster of the base reads either as before or as after the commit."""

from __future__ import annotations

import random
import shutil

import pytest
from chaintools import io, make, overlay
from conftest import qemu_read_raw, run

from qimg.api import open_image
from qimg.commit import commit_image
from qimg.faults import FaultyStorage, SimulatedCrash

KiB = 1024
BLOCK = 4 * KiB  # the base's cluster size


@pytest.fixture(scope="module")
def chain(qemu_img, qemu_io, tmp_path_factory):
    """base.qcow2 (768 KiB) <- top.qcow2 (1 MiB, larger: the base grows)."""
    src = tmp_path_factory.mktemp("commit-crash")
    make(src, "base.qcow2", "768k", "-o", "cluster_size=4k")
    io(src, "base.qcow2", "write -P 1 0 256k", "write -P 2 512k 64k")
    overlay(src, "top.qcow2", "base.qcow2", "1M")
    io(src, "top.qcow2", "write -P 3 128k 200k", "write -z 520k 8k", "write -P 4 900k 20k")
    before = qemu_read_raw(src / "base.qcow2", src)
    top = qemu_read_raw(src / "top.qcow2", src)
    done = src / "done"
    shutil.copytree(src, done, ignore=shutil.ignore_patterns("done"))
    _commit(done / "top.qcow2", {}, {})
    after = qemu_read_raw(done / "base.qcow2", src)
    return src, top, before, after


def _commit(top, top_faults: dict, base_faults: dict) -> tuple[FaultyStorage, FaultyStorage]:
    """qimg commit of `top` into its backing file, each file's storage
    behind a FaultyStorage; the two storages, whether or not one crashed."""
    made = {}

    def wrap(key, faults):
        def wrapper(storage):
            made[key] = FaultyStorage(storage, **{"sync": False, **faults})
            return made[key]

        return wrapper

    image = open_image(str(top), "qcow2", writable=True, storage_wrapper=wrap("top", top_faults))
    try:
        commit_image(image, str(top), base_storage_wrapper=wrap("base", base_faults))
        image.close()
    except SimulatedCrash:
        try:
            image.close()
        except SimulatedCrash:
            pass
    return made["top"], made["base"]


@pytest.mark.parametrize("mode", ["kill", "power"])
@pytest.mark.parametrize("victim", ["base", "top"])
def test_commit_crash_leaks_but_never_corrupts(chain, tmp_path, victim, mode):
    src, top_data, before, after = chain
    work = tmp_path / "w"
    shutil.copytree(src, work, ignore=shutil.ignore_patterns("done"))
    top_log, base_log = _commit(work / "top.qcow2", {}, {})
    total = len(top_log.log if victim == "top" else base_log.log)
    rng = random.Random(f"{victim}-{mode}")
    points = set(rng.sample(range(total), min(total, 8))) | set(range(max(0, total - 3), total))
    for point in sorted(points):
        for name in ("top.qcow2", "base.qcow2"):
            shutil.copy(src / name, work / name)
        faults = {"crash_at": point, "mode": mode, "seed": point}
        _commit(
            work / "top.qcow2",
            faults if victim == "top" else {},
            faults if victim == "base" else {},
        )
        for name in ("top.qcow2", "base.qcow2"):
            proc = run(["qemu-img", "check", "-f", "qcow2", str(work / name)], check=False)
            assert proc.returncode in (0, 3), f"{name}, crash at {point}: {proc.stdout}"
        assert qemu_read_raw(work / "top.qcow2", tmp_path) == top_data, point
        base = qemu_read_raw(work / "base.qcow2", tmp_path)
        assert len(base) in (len(before), len(after)), point
        for pos in range(0, len(base), BLOCK):
            got = base[pos : pos + BLOCK]
            old = before[pos : pos + BLOCK] or bytes(BLOCK)
            assert got in (old, after[pos : pos + BLOCK]), (point, pos)


@pytest.mark.parametrize("mode", ["kill", "power"])
def test_commit_crash_while_discarding_a_top_with_a_snapshot(chain, tmp_path, mode):
    """A top with a snapshot is emptied cluster by cluster (its snapshot
    keeps them): a crash there leaks at most, and the top reads as before."""
    src, top_data, _before, _after = chain
    snap = tmp_path / "snap"
    shutil.copytree(src, snap, ignore=shutil.ignore_patterns("done"))
    run(["qemu-img", "snapshot", "-c", "s1", str(snap / "top.qcow2")])
    io(snap, "top.qcow2", "write -P 6 64k 64k")
    data = qemu_read_raw(snap / "top.qcow2", tmp_path)
    work = tmp_path / "w"
    shutil.copytree(snap, work)
    top_log, _ = _commit(work / "top.qcow2", {}, {})
    total = len(top_log.log)
    rng = random.Random(f"snapshot-{mode}")
    for point in sorted(set(rng.sample(range(total), min(total, 6)))):
        for name in ("top.qcow2", "base.qcow2"):
            shutil.copy(snap / name, work / name)
        _commit(work / "top.qcow2", {"crash_at": point, "mode": mode, "seed": point}, {})
        for name in ("top.qcow2", "base.qcow2"):
            proc = run(["qemu-img", "check", "-f", "qcow2", str(work / name)], check=False)
            assert proc.returncode in (0, 3), f"{name}, crash at {point}: {proc.stdout}"
        assert qemu_read_raw(work / "top.qcow2", tmp_path) == data, point
