"""qimg speaks with the name it was invoked by, as qemu-img does (error_init:
the basename of argv[0]), so qimg installed as `qemu-img` prints what
qemu-img prints, byte for byte, for bad command lines and failed commands.
"""

from __future__ import annotations

import pathlib
import struct
import sys

import pytest
from conftest import qimg, run

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Command lines that fail before or while opening an image; `{d}` is a
# scratch directory. Each is run by the real qemu-img and by qimg named qemu-img.
BAD_COMMAND_LINES = [
    [],
    ["info"],
    ["bogus"],
    ["-Z"],
    ["--bogus"],
    ["info", "-Z", "x"],
    ["check", "--bogus", "x"],
    ["info", "-f"],
    ["convert", "-O"],
    ["info", "--output"],
    ["info", "--output=xml", "x"],
    ["check", "-r", "foo", "x"],
    ["convert"],
    ["info", "{d}/missing.qcow2"],
    ["check", "{d}/missing.qcow2"],
    ["create", "-f", "qcow2", "{d}/new.qcow2", "12Q"],
    ["create", "-f", "qcow2", "{d}/new.qcow2", "-o", "refcount_bits=3", "1M"],
    ["create", "{d}/new.img"],
]


def console_script(directory: pathlib.Path, name: str) -> pathlib.Path:
    """What `pip install` makes of qimg's console script, installed as `name`."""
    directory.mkdir(exist_ok=True)
    script = directory / name
    script.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from qimg.cli import main\nmain()\n"
    )
    script.chmod(0o755)
    return script


def outcome(args: list[str]) -> tuple[int, str, str]:
    proc = run(args, check=False)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("line", BAD_COMMAND_LINES, ids=lambda a: " ".join(a) or "no-args")
def test_qimg_named_qemu_img_fails_in_qemu_img_words(tmp_path, qemu_img, line):
    args = [a.format(d=tmp_path) for a in line]
    ours = console_script(tmp_path / "bin", "qemu-img")
    expected = outcome([qemu_img, *args])
    assert expected[0] != 0
    assert outcome([str(ours), *args]) == expected


def test_messages_begin_with_the_name_as_invoked(tmp_path, qemu_img):
    # qemu-img names itself by argv[0]'s basename, but its "Try ... --help"
    # line always says qemu-img; qimg's names the program that was run.
    theirs = tmp_path / "theirs" / "myimg"
    theirs.parent.mkdir()
    theirs.symlink_to(qemu_img)
    ours = console_script(tmp_path / "ours", "myimg")
    for line in (["info"], ["bogus"], ["info", str(tmp_path / "missing")]):
        code, _, their_err = outcome([str(theirs), *line])
        our_code, _, our_err = outcome([str(ours), *line])
        assert our_code == code
        assert our_err.splitlines()[0] == their_err.splitlines()[0]
        assert our_err.splitlines()[0].startswith("myimg: ")
        if len(their_err.splitlines()) > 1:
            assert our_err.splitlines()[1] == "Try 'myimg --help' for more information"


def test_python_m_qimg_speaks_as_qimg(tmp_path, qemu_img):
    proc = qimg("info", tmp_path / "missing", check=False)
    theirs = run([qemu_img, "info", str(tmp_path / "missing")], check=False)
    assert proc.stderr == theirs.stderr.replace("qemu-img: ", "qimg: ")


CRASH = """
import os, sys
from qimg.api import open_image
img = open_image(sys.argv[1], "qcow2", writable=True)
img.write(0, b"y" * 4096)
img.flush()
os._exit(0)  # no close: the bitmap stays in use, as after a crash
"""


def test_qimg_named_qemu_img_warns_in_qemu_img_words(tmp_path, qemu_img):
    src = tmp_path / "src.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(src), "1M"])
    run([qemu_img, "bitmap", "--add", str(src), "b0"])
    run([sys.executable, "-c", CRASH, str(src)])
    ours = console_script(tmp_path / "bin", "qemu-img")
    args = ["convert", "-O", "qcow2", "--bitmaps", "--skip-broken-bitmaps", str(src)]
    expected = outcome([qemu_img, *args, str(tmp_path / "theirs.qcow2")])
    got = outcome([str(ours), *args, str(tmp_path / "ours.qcow2")])
    assert "qemu-img: warning: Skipping inconsistent bitmap 'b0'" in expected[2]
    assert got == expected


def test_qimg_named_qemu_img_reports_check_errors_in_qemu_img_words(tmp_path, qemu_img):
    # One snapshot whose table offset is not cluster-aligned: check prints
    # "ERROR snapshot table offset invalid" and "Check failed", both prefixed.
    image = tmp_path / "bad-snapshot-offset.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "1M"])
    with open(image, "r+b") as f:
        f.seek(60)  # nb_snapshots, snapshots_offset
        f.write(struct.pack(">IQ", 1, 0x10001))
    ours = console_script(tmp_path / "bin", "qemu-img")
    expected = outcome([qemu_img, "check", str(image)])
    assert "qemu-img: ERROR snapshot table offset invalid" in expected[2]
    assert outcome([str(ours), "check", str(image)]) == expected
