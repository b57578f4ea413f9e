"""Command lines with too few or too many file names, and unknown options,
fail in qemu-img's words: qimg installed as `qemu-img` prints what qemu-img
7.2 prints (stdout, stderr and exit code), judged by running both.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest
from conftest import run
from test_cli_qemu_parity import console_script

# Each line runs in a scratch directory holding a.qcow2 and b.qcow2 (1 MiB).
POSITIONAL_LINES = [
    ["info"],
    ["info", "a.qcow2"],
    ["info", "a.qcow2", "b.qcow2"],
    ["info", "a.qcow2", "b.qcow2", "c"],
    ["check"],
    ["check", "a.qcow2"],
    ["check", "a.qcow2", "b.qcow2"],
    ["create"],
    ["create", "-f", "qcow2"],
    ["create", "-f", "qcow2", "new.qcow2"],
    ["create", "-f", "qcow2", "new.qcow2", "1M"],
    ["create", "-f", "qcow2", "new.qcow2", "1M", "y"],
    ["create", "-f", "qcow2", "new.qcow2", "1M", "y", "z"],
    ["create", "-f", "qcow2", "new.qcow2", "1Q", "y"],
    ["create", "-f", "qcow2", "new.qcow2", "1M", "--", "-1"],
    ["convert"],
    ["convert", "a.qcow2"],
    ["convert", "a.qcow2", "new.raw"],
    ["convert", "a.qcow2", "b.qcow2", "new.raw"],
]

# getopt's "unrecognized option" names argv[optind - 1]: the whole word
# when the bad letter ends it, else the word before it (after getopt has
# moved the file names seen so far behind the options).
OPTION_LINES = [
    ["create", "-f", "qcow2", "new.qcow2", "-1"],
    ["create", "-f", "qcow2", "new.qcow2", "1M", "-1"],
    ["create", "-1"],
    ["info", "-1"],
    ["info", "a.qcow2", "-1"],
    ["check", "a.qcow2", "-1"],
    ["convert", "a.qcow2", "new.raw", "-1"],
    ["check", "-q1", "a.qcow2"],
    ["check", "-qZ", "a.qcow2"],
    ["check", "-Zq", "a.qcow2"],
    ["info", "-Zx", "a.qcow2"],
    ["info", "a.qcow2", "-Zx"],
    ["info", "-U", "-Zx", "a.qcow2"],
    ["info", "a.qcow2", "-U", "-Zx"],
    ["info", "-f", "qcow2", "-Zx", "a.qcow2"],
    ["info", "--foo=bar", "a.qcow2"],
    ["info", "--foo", "a.qcow2"],
]


def scratch(root: pathlib.Path, name: str, qemu_img: str) -> pathlib.Path:
    directory = root / name
    directory.mkdir()
    for image in ("a.qcow2", "b.qcow2"):
        run([qemu_img, "create", "-q", "-f", "qcow2", str(directory / image), "1M"])
    return directory


def both(tmp_path: pathlib.Path, qemu_img: str, line: list[str]) -> tuple[tuple, tuple]:
    """(qemu-img's outcome, qimg's as qemu-img), each in its own scratch dir."""
    ours = console_script(tmp_path / "bin", "qemu-img")
    results = []
    for name, program in (("theirs", qemu_img), ("ours", str(ours))):
        cwd = scratch(tmp_path, name, qemu_img)
        proc = run([program, *line], check=False, cwd=cwd)
        results.append((proc.returncode, proc.stdout, proc.stderr))
        shutil.rmtree(cwd)
    return results[0], results[1]


@pytest.mark.parametrize("line", POSITIONAL_LINES, ids=" ".join)
def test_file_name_count_errors_match_qemu_img(tmp_path, qemu_img, line):
    theirs, ours = both(tmp_path, qemu_img, line)
    assert ours == theirs


@pytest.mark.parametrize("line", OPTION_LINES, ids=" ".join)
def test_unrecognized_option_names_the_word_qemu_img_names(tmp_path, qemu_img, line):
    theirs, ours = both(tmp_path, qemu_img, line)
    assert theirs[0] == 1
    assert "unrecognized option" in theirs[2]
    assert ours == theirs
