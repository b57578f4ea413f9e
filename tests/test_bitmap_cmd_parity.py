"""`qimg bitmap` against `qemu-img bitmap` 7.2: the same command line on
copies of the same images gives the same exit code and message, and the
same bitmaps (qemu-img info) where it succeeds; where it fails, qimg's image
is left byte for byte as it was (qemu-img keeps the actions before the one
that failed: compared by meaning only on success).

QEMU names the image in two messages by its node name ("#block123", a
counter that changes from run to run); qimg names the file there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import qemu_check_clean, run
from infotools import message, qimg_here

from qimg.api import open_image
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.bitmap import read_bitmap_directory

MiB = 1 << 20
LONG = "x" * 1024

CRASH = """
import os, sys
from qimg.api import open_image
img = open_image(sys.argv[1], "qcow2", writable=True)
img.write(0, b"y" * 70000)
img.flush()
os._exit(0)  # no close: the enabled bitmaps stay in-use, as after a crash
"""


def qemu_img(cwd, *args) -> None:
    run(["qemu-img", *args], cwd=cwd)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """img.qcow2 (64 MiB): 'bad' in-use, 'b0' enabled and dirty, 'off'
    disabled, 'fine' (512 B); src.qcow2 (64 MiB) and small.qcow2 (32 MiB)
    with 's0' and in-use 'sbad'; r.raw; v2.qcow2 (compat 0.10)."""
    d = tmp_path_factory.mktemp("bitmap-parity")
    for name, size in (("img", "64M"), ("src", "64M"), ("small", "32M")):
        path = d / f"{name}.qcow2"
        qemu_img(d, "create", "-q", "-f", "qcow2", path.name, size)
        qemu_img(d, "bitmap", "--add", path.name, "bad" if name == "img" else "sbad")
        run([sys.executable, "-c", CRASH, str(path)])
    qemu_img(d, "bitmap", "--add", "img.qcow2", "b0")
    qemu_img(d, "bitmap", "--add", "--disable", "img.qcow2", "off")
    qemu_img(d, "bitmap", "--add", "-g", "512", "img.qcow2", "fine")
    for name in ("src", "small"):
        qemu_img(d, "bitmap", "--add", f"{name}.qcow2", "s0")
    run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write 1M 100k",
            "-c",
            "write 40M 1k",
            str(d / "img.qcow2"),
        ]
    )
    run(["qemu-io", "-f", "qcow2", "-c", "write 3M 1k", str(d / "src.qcow2")])
    qemu_img(d, "create", "-q", "-f", "qcow2", "one.qcow2", "1M")
    qemu_img(d, "bitmap", "--add", "one.qcow2", "only")
    shutil.copy(d / "img.qcow2", d / "dmg.qcow2")
    damage_in_use_table(d / "dmg.qcow2", "bad")
    qemu_img(d, "create", "-q", "-f", "raw", "r.raw", "1M")
    qemu_img(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M")
    return d


def damage_in_use_table(path, name: str) -> None:
    """Reserved bits set in the first table entry of in-use bitmap `name`
    (QEMU loads no in-use bitmap's table, so the image still opens)."""
    with open_image(str(path), "qcow2") as img:
        e = next(e for e in read_bitmap_directory(img) if e.name == name)
    with open(path, "r+b") as f:
        f.seek(e.table_offset)
        f.write((1 << 62 | 1).to_bytes(8, "big"))


CASES = {
    # qemu-img's own checks of the command line, in its order
    "no_action": ["img.qcow2", "b0"],
    "no_name": ["--add", "img.qcow2"],
    "extra_word": ["--add", "img.qcow2", "b0", "more"],
    "granularity_without_add": ["-g", "4096", "--remove", "img.qcow2", "b0"],
    "source_format_without_file": ["-F", "qcow2", "--add", "img.qcow2", "n"],
    "source_file_without_merge": ["-b", "src.qcow2", "--add", "img.qcow2", "n"],
    "granularity_zero_is_default": ["--add", "-g", "0", "img.qcow2", "n"],
    "granularity_not_power_of_2": ["--add", "-g", "1000", "img.qcow2", "n"],
    "granularity_under_512": ["--add", "-g", "256", "img.qcow2", "n"],
    "granularity_4G_wraps_to_0": ["--add", "-g", "4G", "img.qcow2", "n"],
    "granularity_4G_512_wraps_to_512": ["--add", "-g", "4294967808", "img.qcow2", "n"],
    "granularity_2G": ["--add", "-g", "2G", "img.qcow2", "n"],
    "granularity_negative": ["--add", "-g", "-1", "img.qcow2", "n"],
    "granularity_garbage": ["--add", "-g", "abc", "img.qcow2", "n"],
    "merge_missing_argument": ["--merge"],
    "unknown_short": ["--add", "-Z", "img.qcow2", "n"],
    "unknown_long": ["--add", "--foo", "img.qcow2", "n"],
    "merge_equals_and_attached_g": ["--add", "-g4k", "--merge=b0", "img.qcow2", "n"],
    "options_after_names": ["img.qcow2", "n", "--add", "--disable"],
    "abbreviations": ["--merg", "b0", "--ad", "img.qcow2", "n"],
    "image_opts_and_format": ["--add", "--image-opts", "-f", "qcow2", "img.qcow2", "n"],
    "image_opts": ["--add", "--image-opts", "driver=qcow2,file.filename=img.qcow2", "n"],
    "image_opts_bare_word": ["--add", "--image-opts", "img.qcow2", "n"],
    "object_without_id": ["--add", "--object", "secret", "img.qcow2", "n"],
    "object_unknown_type": ["--add", "--object", "foo,id=x", "img.qcow2", "n"],
    "object_secret": ["--add", "--object", "secret,id=s0,data=abc", "img.qcow2", "n"],
    # add
    "add": ["--add", "img.qcow2", "n"],
    "add_disabled": ["--add", "--disable", "img.qcow2", "n"],
    "disable_before_add": ["--disable", "--add", "img.qcow2", "n"],
    "add_existing": ["--add", "img.qcow2", "b0"],
    "add_twice": ["--add", "--add", "img.qcow2", "n"],
    "add_remove_add": ["--add", "--remove", "--add", "img.qcow2", "n"],
    "add_in_use_name": ["--add", "img.qcow2", "bad"],
    "add_empty_name": ["--add", "img.qcow2", ""],
    "add_name_1023": ["--add", "img.qcow2", LONG[:1023]],
    "add_name_1024": ["--add", "img.qcow2", LONG],
    "add_then_merge": ["--add", "-g", "4096", "--merge", "b0", "--merge", "fine", "img.qcow2", "n"],
    # remove, clear, enable, disable
    "remove_missing": ["--remove", "img.qcow2", "nob"],
    "clear_missing": ["--clear", "img.qcow2", "nob"],
    "enable_missing": ["--enable", "img.qcow2", "nob"],
    "disable_missing": ["--disable", "img.qcow2", "nob"],
    "remove": ["--remove", "img.qcow2", "b0"],
    "remove_in_use": ["--remove", "img.qcow2", "bad"],
    "remove_the_last": ["--remove", "one.qcow2", "only"],
    "remove_the_last_and_add": ["--remove", "--add", "-g", "1M", "one.qcow2", "only"],
    "remove_in_use_damaged": ["--remove", "dmg.qcow2", "bad"],
    "clear_in_use_damaged": ["--clear", "dmg.qcow2", "bad"],
    "remove_then_clear": ["--remove", "--clear", "img.qcow2", "b0"],
    "clear": ["--clear", "img.qcow2", "b0"],
    "clear_in_use": ["--clear", "img.qcow2", "bad"],
    "enable_in_use": ["--enable", "img.qcow2", "bad"],
    "disable_in_use": ["--disable", "img.qcow2", "bad"],
    "enable_disable_enable": ["--enable", "--disable", "--enable", "img.qcow2", "off"],
    "disable_then_fail": ["--disable", "--clear", "img.qcow2", "bad"],
    "clear_then_fail": ["--clear", "--merge", "nob", "img.qcow2", "b0"],
    # merge
    "merge_self": ["--merge", "b0", "img.qcow2", "b0"],
    "merge_finer_into_coarser": ["--merge", "fine", "img.qcow2", "b0"],
    "merge_coarser_into_finer": ["--merge", "b0", "img.qcow2", "fine"],
    "merge_into_disabled": ["--merge", "b0", "img.qcow2", "off"],
    "merge_missing_source": ["--merge", "nob", "img.qcow2", "b0"],
    "merge_missing_target": ["--merge", "b0", "img.qcow2", "nob"],
    "merge_both_missing": ["--merge", "nob", "img.qcow2", "nob2"],
    "merge_in_use_source": ["--merge", "bad", "img.qcow2", "b0"],
    "merge_into_in_use": ["--merge", "b0", "img.qcow2", "bad"],
    "merge_missing_into_in_use": ["--merge", "nob", "img.qcow2", "bad"],
    "merge_other_image": ["--merge", "s0", "-b", "src.qcow2", "img.qcow2", "b0"],
    "merge_other_image_format": ["--merge", "s0", "-b", "src.qcow2", "-F", "qcow2", "img.qcow2", "b0"],
    "merge_other_image_as_raw": ["--merge", "s0", "-b", "src.qcow2", "-F", "raw", "img.qcow2", "b0"],
    "merge_other_image_in_use": ["--merge", "sbad", "-b", "src.qcow2", "img.qcow2", "b0"],
    "merge_other_size": ["--merge", "s0", "-b", "small.qcow2", "img.qcow2", "b0"],
    "merge_other_size_into_in_use": ["--merge", "s0", "-b", "small.qcow2", "img.qcow2", "bad"],
    "merge_missing_file": ["--merge", "s0", "-b", "nonexist.qcow2", "img.qcow2", "b0"],
    "merge_from_itself_as_file": ["--merge", "b0", "-b", "img.qcow2", "img.qcow2", "fine"],
    # other images
    "missing_file": ["--add", "nonexist.qcow2", "n"],
    "raw_probed": ["--add", "r.raw", "n"],
    "raw_add": ["--add", "-f", "raw", "r.raw", "n"],
    "raw_remove": ["--remove", "r.raw", "n"],
    "v2_add": ["--add", "v2.qcow2", "n"],
    "v2_clear": ["--clear", "v2.qcow2", "n"],
}  # fmt: skip

_NODE = re.compile(r"(persistent bitmaps to |persistent in ')(#block\d+|[\w.]+)")


def normalized(stderr: str, prog: str) -> str:
    text = message(stderr, prog).replace(f"Try '{prog} --help'", "Try 'PROG --help'")
    return _NODE.sub(r"\1NODE", text)


def digest(d) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def check_result(path) -> tuple:
    """Exit code and findings; not where the image ends (qemu-img rewrites
    every bitmap, qimg the one edited)."""
    proc = run(["qemu-img", "check", str(path)], check=False)
    kept = [
        ln for ln in proc.stdout.splitlines() if "allocated" not in ln and "end offset" not in ln
    ]
    return proc.returncode, kept, proc.stderr


def extension(path) -> tuple[bool, bool]:
    """Whether the header has a bitmaps extension, and the autoclear bit."""
    with open_image(str(path), "qcow2", force_share=True) as img:
        h = img.header
        return h.bitmaps_ext is not None, bool(h.autoclear_features & L.QCOW2_AUTOCLEAR_BITMAPS)


def bitmaps(path) -> list:
    out = run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout
    return json.loads(out)["format-specific"]["data"].get("bitmaps", [])


@pytest.mark.parametrize("case", CASES)
def test_bitmap_command_matches_qemu_img(images, tmp_path, case):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    shutil.copytree(images, ours)
    shutil.copytree(images, theirs)
    args = CASES[case]
    q = run(["qemu-img", "bitmap", *args], check=False, cwd=theirs)
    before = digest(ours)
    got = qimg_here(ours, "bitmap", *args)
    assert "Traceback" not in got.stderr and "internal error" not in got.stderr
    assert (got.returncode, normalized(got.stderr, "qimg")) == (
        q.returncode,
        normalized(q.stderr, "qemu-img"),
    )
    assert got.stdout == q.stdout
    if got.returncode:
        assert digest(ours) == before  # nothing written on failure
        return
    # Success: every image the command names is compared; the others are untouched.
    named = set(args) | ({"img.qcow2"} if case == "image_opts" else set())
    untouched = {k: v for k, v in before.items() if k not in named}
    assert {k: v for k, v in digest(ours).items() if k in untouched} == untouched
    for name in {"img.qcow2", "src.qcow2", "one.qcow2"} & named:
        assert bitmaps(ours / name) == bitmaps(theirs / name)
        assert extension(ours / name) == extension(theirs / name)
        qemu_check_clean(ours / name)
    if "dmg.qcow2" in args:  # fails qemu-img check from the start (its damaged table)
        assert bitmaps(ours / "dmg.qcow2") == bitmaps(theirs / "dmg.qcow2")
        assert check_result(ours / "dmg.qcow2") == check_result(theirs / "dmg.qcow2")


def test_image_in_use_is_refused_as_qemu_img_refuses_it(images, tmp_path):
    """QEMU's locks: an image qemu-io holds open for writing cannot be edited."""
    path = tmp_path / "img.qcow2"
    shutil.copy(images / "img.qcow2", path)
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        q = run(["qemu-img", "bitmap", "--add", "img.qcow2", "n"], check=False, cwd=tmp_path)
        before = path.read_bytes()
        got = qimg_here(tmp_path, "bitmap", "--add", "img.qcow2", "n")
        assert q.returncode == 1 and "lock" in q.stderr
        assert (got.returncode, message(got.stderr, "qimg")) == (1, message(q.stderr, "qemu-img"))
        assert path.read_bytes() == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_read_only_file_is_refused_as_qemu_img_refuses_it(images, tmp_path):
    path = tmp_path / "img.qcow2"
    shutil.copy(images / "img.qcow2", path)
    path.chmod(0o444)
    q = run(["qemu-img", "bitmap", "--add", "img.qcow2", "n"], check=False, cwd=tmp_path)
    got = qimg_here(tmp_path, "bitmap", "--add", "img.qcow2", "n")
    assert q.returncode == 1 and "Permission denied" in q.stderr
    assert (got.returncode, message(got.stderr, "qimg")) == (1, message(q.stderr, "qemu-img"))


def test_list_gives_the_bitmaps_of_info_and_no_count_for_an_in_use_one(images):
    got = qimg_here(images, "bitmap", "--list", "--output=json", "img.qcow2")
    assert got.returncode == 0, got.stderr
    rows = json.loads(got.stdout)
    assert [{k: r[k] for k in ("name", "granularity", "flags")} for r in rows] == [
        {k: b[k] for k in ("name", "granularity", "flags")} for b in bitmaps(images / "img.qcow2")
    ]
    assert [("count" in r) for r in rows] == [("in-use" not in r["flags"]) for r in rows]
    assert "bad" in {r["name"] for r in rows if "count" not in r}
