"""A crash at any write of a bitmap edit (qimg.faults: a process killed, or
power lost with unflushed writes dropped at random) leaves an image that
qemu-img check finds free of corruption (leaked clusters at worst) and a
bitmap QEMU exports either as it was or as the edit made it."""

from __future__ import annotations

import shutil

import pytest
from conftest import run
from test_bitmaps import dirty_extents

from qimg.faults import FaultyStorage, run_until_crash
from qimg.formats.qcow2.bitmap_ops import Action, apply_plan, plan_actions

MiB = 1 << 20


@pytest.fixture(scope="module")
def qemu_nbd():
    from conftest import require_tool

    return require_tool("qemu-nbd")


def _edit(path, name: str, actions: list[Action], faulty_args: dict) -> FaultyStorage:
    """The edit through the library over a FaultyStorage; the storage."""
    faulty, _ = run_until_crash(
        str(path), lambda img: apply_plan(img, plan_actions(img, name, actions)),
        backing=False, **faulty_args,
    )  # fmt: skip
    return faulty


def _names(path) -> list[str]:
    import json

    out = run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout
    return [b["name"] for b in json.loads(out)["format-specific"]["data"].get("bitmaps", [])]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("crash") / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M"])
    run(["qemu-img", "bitmap", "--add", str(path), "a"])
    run(["qemu-io", "-f", "qcow2", "-c", f"write {MiB} 70000", str(path)])
    run(["qemu-img", "bitmap", "--disable", str(path), "a"])
    run(["qemu-img", "bitmap", "--add", "-g", "4k", str(path), "src"])
    run(["qemu-io", "-f", "qcow2", "-c", f"write {3 * MiB} 5000", str(path)])
    return path


@pytest.mark.parametrize(
    "name,actions,mode",
    [
        ("a", [Action("merge", "src")], "power"),
        ("src", [Action("remove")], "kill"),
        ("new", [Action("add"), Action("merge", "src")], "kill"),
    ],
    ids=["merge-power", "remove-kill", "add-merge-kill"],
)
def test_crash_during_an_edit_leaves_the_old_bitmap_or_the_new(
    base, tmp_path, qemu_nbd, name, actions, mode
):
    done = tmp_path / "done.qcow2"
    shutil.copy(base, done)
    total = _edit(done, name, actions, {}).op_count
    after = dirty_extents(done, name, tmp_path) if name in _names(done) else None
    before = dirty_extents(base, name, tmp_path) if name in _names(base) else None
    assert after != before
    for crash_at in range(total):
        path = tmp_path / f"crash{crash_at}.qcow2"
        shutil.copy(base, path)
        _edit(path, name, actions, {"crash_at": crash_at, "mode": mode, "seed": crash_at})
        proc = run(["qemu-img", "check", "--output=json", str(path)], check=False)
        assert proc.returncode in (0, 3), (crash_at, proc.stdout, proc.stderr)
        got = dirty_extents(path, name, tmp_path) if name in _names(path) else None
        assert got in (before, after), crash_at
        path.unlink()
