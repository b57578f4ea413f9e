"""`qimg snapshot` speaks as `qemu-img snapshot`: the same listing, the same
messages and exit codes for every refusal, and each tool lists, applies and
deletes the snapshots the other made."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import qemu_check_clean, run
from infotools import message, qemu_in, qimg_here

MiB = 1 << 20


def qemu_snapshot(d: Path, *args: str) -> subprocess.CompletedProcess:
    return qemu_in(d, "qemu-img", "snapshot", *args)


def qimg_snapshot(d: Path, *args: str) -> subprocess.CompletedProcess:
    return qimg_here(d, "snapshot", *args)


def make_qcow2(d: Path, name: str = "disk.qcow2", *snaps: str) -> Path:
    path = d / name
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M"])
    run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -c -P 2 2M 128k", str(path)])
    for s in snaps:
        run(["qemu-img", "snapshot", "-c", s, str(path)])
    return path


def assert_same_outcome(d: Path, *args: str) -> subprocess.CompletedProcess:
    """Both tools, each on its own copy of every image in `d` named in
    `args`: the same exit code, stdout and message."""
    names = [a for a in args if (d / a).is_file()]
    ours = d / "ours"
    ours.mkdir(exist_ok=True)
    for n in names:
        (ours / n).write_bytes((d / n).read_bytes())
    expected = qemu_snapshot(d, *args)
    got = qimg_snapshot(ours, *args)
    assert got.returncode == expected.returncode, (expected.stderr, got.stderr)
    ours_said = message(got.stderr, "qimg").replace("Try 'qimg --help'", "Try 'qemu-img --help'")
    assert ours_said == message(expected.stderr, "qemu-img")
    assert got.stdout == expected.stdout
    return got


CASES = {
    "apply-missing": ("-a", "nope", "disk.qcow2"),
    "delete-missing": ("-d", "nope", "disk.qcow2"),
    "mixed-actions": ("-l", "-c", "x", "disk.qcow2"),
    "same-action-twice": ("-c", "a", "-c", "b", "disk.qcow2"),
    "force-share-writable": ("-U", "-c", "x", "disk.qcow2"),
    "no-action": ("disk.qcow2",),
    "two-files": ("-l", "disk.qcow2", "disk.qcow2"),
    "no-file": ("-l",),
    "missing-argument": ("-c",),
    "unknown-option": ("-x", "disk.qcow2"),
    "missing-file": ("-l", "nonexistent.qcow2"),
    "list-empty": ("-l", "empty.qcow2"),
    "list-quiet": ("-q", "-l", "disk.qcow2"),
    "raw-create": ("-c", "x", "disk.raw"),
    "raw-apply": ("-a", "x", "disk.raw"),
    "raw-delete": ("-d", "x", "disk.raw"),
    "raw-list": ("-l", "disk.raw"),
    "not-an-image": ("-c", "x", "bad.qcow2"),
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_refusals_and_listings_match_qemu_img(tmp_path, args):
    make_qcow2(tmp_path, "disk.qcow2", "first", "2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "empty.qcow2"), "1M"])
    run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "disk.raw"), "1M"])
    (tmp_path / "bad.qcow2").write_bytes(b"QFI\xfb\0\0\0\x09".ljust(4096, b"\0"))
    assert_same_outcome(tmp_path, *args)


def test_apply_is_refused_on_an_image_with_bitmaps_as_qemu_img(tmp_path):
    path = make_qcow2(tmp_path, "disk.qcow2", "s")
    run(["qemu-img", "bitmap", "--add", str(path), "b0"])
    got = assert_same_outcome(tmp_path, "-a", "s", "disk.qcow2")
    assert got.returncode == 1


def test_create_on_an_image_with_bitmaps_works_as_qemu_img(tmp_path):
    make_qcow2(tmp_path, "disk.qcow2")
    run(["qemu-img", "bitmap", "--add", str(tmp_path / "disk.qcow2"), "b0"])
    assert qimg_snapshot(tmp_path, "-c", "s", "disk.qcow2").returncode == 0
    qemu_check_clean(tmp_path / "disk.qcow2")
    assert "s" in run(["qemu-img", "snapshot", "-l", str(tmp_path / "disk.qcow2")]).stdout


def test_an_image_in_use_is_refused_as_qemu_img(tmp_path):
    path = make_qcow2(tmp_path, "disk.qcow2", "s")
    holder = subprocess.Popen(
        ["qemu-io", str(path)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        for args in (("-c", "x"), ("-a", "s"), ("-d", "s"), ("-l",)):
            expected = qemu_snapshot(tmp_path, *args, "disk.qcow2")
            got = qimg_snapshot(tmp_path, *args, "disk.qcow2")
            assert got.returncode == expected.returncode == 1
            assert message(got.stderr, "qimg") == message(expected.stderr, "qemu-img")
    finally:
        holder.communicate(b"quit\n", timeout=30)


def test_names_match_ids_and_names_as_qemu_img(tmp_path):
    """-a takes an id first, then a name; -d a name first, then an id."""
    path = make_qcow2(tmp_path, "disk.qcow2", "s1", "1", "s1")
    run(["qemu-io", "-c", "write -P 5 0 64k", str(path)])
    theirs = tmp_path / "theirs.qcow2"
    for args in (("-d", "1"), ("-a", "1"), ("-d", "s1"), ("-a", "3")):
        theirs.write_bytes(path.read_bytes())
        qimg_snapshot(tmp_path, *args, "disk.qcow2")
        run(["qemu-img", "snapshot", *args, str(theirs)])
        assert qemu_listing(path) == qemu_listing(theirs)
        assert qemu_raw(path, tmp_path) == qemu_raw(theirs, tmp_path)
        path.write_bytes(theirs.read_bytes())


def qemu_listing(path: Path) -> list[tuple[str, str]]:
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    return [(s["id"], s["name"]) for s in info.get("snapshots", [])]


def qemu_raw(path: Path, tmp: Path) -> bytes:
    out = tmp / "active.raw"
    run(["qemu-img", "convert", "-O", "raw", str(path), str(out)])
    return out.read_bytes()


def test_each_tool_lists_and_uses_the_others_snapshots(tmp_path):
    path = make_qcow2(tmp_path, "disk.qcow2", "by-qemu")
    assert qimg_snapshot(tmp_path, "-c", "by-qimg", "disk.qcow2").returncode == 0
    listing = qemu_snapshot(tmp_path, "-l", "disk.qcow2").stdout
    assert qimg_snapshot(tmp_path, "-l", "disk.qcow2").stdout == listing
    assert "by-qemu" in listing and "by-qimg" in listing
    run(["qemu-io", "-c", "write -P 9 0 2M", str(path)])
    # qemu-img applies qimg's snapshot; qimg applies and deletes qemu-img's.
    run(["qemu-img", "snapshot", "-a", "by-qimg", str(path)])
    assert qemu_raw(path, tmp_path)[: 1 * MiB] == bytes([1]) * MiB
    qemu_check_clean(path)
    run(["qemu-io", "-c", "write -P 8 0 64k", str(path)])
    assert qimg_snapshot(tmp_path, "-a", "by-qemu", "disk.qcow2").returncode == 0
    assert qemu_raw(path, tmp_path)[: 1 * MiB] == bytes([1]) * MiB
    assert qimg_snapshot(tmp_path, "-d", "by-qemu", "disk.qcow2").returncode == 0
    run(["qemu-img", "snapshot", "-d", "by-qimg", str(path)])
    qemu_check_clean(path)
    assert qemu_listing(path) == []


def test_list_json_is_what_info_json_has_under_snapshots(tmp_path):
    make_qcow2(tmp_path, "disk.qcow2", "a", "b")
    got = json.loads(qimg_snapshot(tmp_path, "-l", "--output=json", "disk.qcow2").stdout)
    info = json.loads(
        run(["qemu-img", "info", "--output=json", str(tmp_path / "disk.qcow2")]).stdout
    )
    assert got == info["snapshots"]
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "none.qcow2"), "1M"])
    assert json.loads(qimg_snapshot(tmp_path, "-l", "--output=json", "none.qcow2").stdout) == []


def test_long_names_are_cut_to_255_bytes_as_qemu_img(tmp_path):
    make_qcow2(tmp_path, "disk.qcow2")
    make_qcow2(tmp_path, "theirs.qcow2")
    name = "n" * 300
    qimg_snapshot(tmp_path, "-c", name, "disk.qcow2")
    run(["qemu-img", "snapshot", "-c", name, str(tmp_path / "theirs.qcow2")])
    assert qemu_listing(tmp_path / "disk.qcow2") == qemu_listing(tmp_path / "theirs.qcow2")
    assert len(qemu_listing(tmp_path / "disk.qcow2")[0][1]) == 255
