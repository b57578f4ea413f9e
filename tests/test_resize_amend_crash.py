"""Crash safety of resize and amend refcount_bits: a crash at any write
(qimg.faults) leaves an image `qemu-img check` finds without corruptions
(leaks allowed), holding the old or the new data."""

from __future__ import annotations

import random
import shutil

import pytest
from conftest import qemu_read_raw, run

from qimg.faults import run_until_crash

MiB = 1 << 20


def _amend_width(img) -> None:
    from qimg.formats.qcow2.amend import amend

    amend(img, {"refcount_bits": 64})


def _grow(img) -> None:
    from qimg.resize import resize_image

    resize_image(img, 300 * MiB)  # the L1 table moves (512-byte clusters)


def _shrink(img) -> None:
    from qimg.resize import resize_image

    resize_image(img, MiB // 2, shrink=True)


def _run(path, action, faulty_args: dict) -> int:
    """Run `action` on the image through FaultyStorage; operations issued."""
    faulty, _ = run_until_crash(str(path), action, **faulty_args)
    return len(faulty.log)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash-base")
    path = d / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "2M"])
    run(["qemu-io", "-c", "write -P 1 0 256k", "-c", "write -P 2 1536k 64k", str(path)])
    run(["qemu-img", "snapshot", "-c", "s1", str(path)])
    run(["qemu-io", "-c", "write -P 3 0 4k", str(path)])
    return path, qemu_read_raw(path, d)


@pytest.mark.parametrize("mode", ["kill", "power"])
@pytest.mark.parametrize("action", [_amend_width, _grow, _shrink], ids=["amend", "grow", "shrink"])
def test_crash_leaks_but_never_corrupts(qemu_img, tmp_path, base, action, mode):
    source, data = base
    work = tmp_path / "w.qcow2"
    shutil.copy(source, work)
    total = _run(work, action, {})
    rng = random.Random(f"{action.__name__}-{mode}")
    points = sorted(rng.sample(range(total), min(total, 12)))
    for point in points:
        shutil.copy(source, work)
        _run(work, action, {"crash_at": point, "mode": mode, "seed": point})
        proc = run(["qemu-img", "check", "-f", "qcow2", str(work)], check=False)
        assert proc.returncode in (0, 3), f"crash at {point}: {proc.stdout}{proc.stderr}"
        got = qemu_read_raw(work, tmp_path)
        if action is _shrink:
            assert got[: MiB // 2] == data[: MiB // 2], point
            assert len(got) in (MiB // 2, len(data)), point
        else:
            assert got[: len(data)] == data, point
            assert not got[len(data) :].strip(b"\0"), point
