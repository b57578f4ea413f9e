"""Command lines with too few or too many file names, and unknown options,
fail in qemu-img's words: qimg installed as `qemu-img` prints what qemu-img
7.2 prints (stdout, stderr and exit code), judged by running both.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest
from conftest import host_data, qimg, run
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
    # An empty file name is one: QEMU's file driver refuses it.
    ["info", ""],
    ["check", ""],
    ["convert", "", "new.raw"],
    ["convert", "-n", "a.qcow2", ""],
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
    ["info", "--force-share=1", "a.qcow2"],
    ["convert", "--target-is=1", "a.qcow2", "new.raw"],
    ["info", "--o=json", "a.qcow2"],
    ["check", "--q", "a.qcow2"],
    ["create", "--f", "qcow2", "new.qcow2", "1M"],
    ["convert", "--t", "-n", "a.qcow2", "b.qcow2"],
    ["convert", "--s", "a.qcow2", "new.raw"],
]

# getopt_long takes an unambiguous prefix of one of qemu-img's long options.
ABBREVIATED_LINES = [
    ["info", "--b", "a.qcow2"],
    ["info", "--out=json", "a.qcow2"],
    ["info", "--outp"],
    ["check", "--rep=leaks", "a.qcow2"],
    ["check", "--outp", "json", "a.qcow2"],
    ["convert", "--target-is", "-n", "a.qcow2", "b.qcow2"],
    ["convert", "--sa", "a.qcow2", "new.raw"],
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


@pytest.mark.parametrize("line", POSITIONAL_LINES, ids=lambda a: " ".join(map(repr, a)))
def test_file_name_count_errors_match_qemu_img(tmp_path, qemu_img, line):
    theirs, ours = both(tmp_path, qemu_img, line)
    assert ours == theirs


@pytest.mark.parametrize("line", OPTION_LINES, ids=" ".join)
def test_unrecognized_option_names_the_word_qemu_img_names(tmp_path, qemu_img, line):
    theirs, ours = both(tmp_path, qemu_img, line)
    assert theirs[0] == 1
    assert "unrecognized option" in theirs[2]
    assert ours == theirs


def _raw_target_layout(path: pathlib.Path) -> tuple:
    """What a raw file looks like from outside: qemu-img's map, the host
    file's data extents, its size and the blocks it takes."""
    mapped = run(["qemu-img", "map", "--output=json", "-f", "raw", str(path)]).stdout
    st = path.stat()
    return mapped, host_data(path), st.st_size, st.st_blocks


@pytest.mark.parametrize("mode", ["off", "falloc", "full"])
@pytest.mark.parametrize("size", ["1M", "1k", "0"])
def test_raw_create_preallocation_lays_out_the_file_as_qemu_img(tmp_path, qemu_img, mode, size):
    # qemu's raw driver writes zeros into the first block of a new file (4
    # KiB, or 512 bytes if the file is smaller) after fallocate too, so
    # qemu-img map shows data there.
    paths = {tool: tmp_path / f"{tool}.raw" for tool in ("theirs", "ours")}
    run(
        [
            qemu_img,
            "create",
            "-q",
            "-f",
            "raw",
            "-o",
            f"preallocation={mode}",
            str(paths["theirs"]),
            size,
        ]
    )
    qimg("create", "-q", "-f", "raw", "-o", f"preallocation={mode}", paths["ours"], size)
    assert _raw_target_layout(paths["ours"]) == _raw_target_layout(paths["theirs"])


@pytest.mark.parametrize("mode", ["off", "falloc"])
@pytest.mark.parametrize(
    "writes", [(), ("write -P 1 1M 64k", "write -z 2M 64k")], ids=["zero", "data"]
)
def test_raw_convert_preallocation_lays_out_the_target_as_qemu_img(
    tmp_path, qemu_img, mode, writes
):
    src = tmp_path / "src.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(src), "4M"])
    for w in writes:
        run(["qemu-io", "-f", "qcow2", "-c", w, str(src)])
    paths = {tool: tmp_path / f"{tool}.raw" for tool in ("theirs", "ours")}
    args = ["convert", "-O", "raw", "-o", f"preallocation={mode}", str(src)]
    run([qemu_img, *args, str(paths["theirs"])])
    qimg(*args, paths["ours"])
    assert _raw_target_layout(paths["ours"]) == _raw_target_layout(paths["theirs"])


@pytest.mark.parametrize("line", ABBREVIATED_LINES, ids=" ".join)
def test_abbreviated_long_options_are_taken_as_qemu_img_takes_them(tmp_path, qemu_img, line):
    theirs, ours = both(tmp_path, qemu_img, line)
    assert ours == theirs


@pytest.mark.parametrize("word", ["--vers", "--v", "--version"])
def test_abbreviated_version_option_prints_the_version(tmp_path, qemu_img, word):
    # Both print their own version line: compared are the outcome and stderr.
    theirs, ours = both(tmp_path, qemu_img, [word])
    assert (ours[0], ours[2]) == (theirs[0], theirs[2]) == (0, "")
    assert "version" in ours[1]


@pytest.mark.parametrize("args", [["-r", "leaks"], ["-r", "all", "-q"], ["-r", "all", "-f", "raw"]])
def test_check_repair_of_a_probed_raw_image_warns_as_qemu_img(tmp_path, qemu_img, args):
    # Opening a probed raw image read-write: QEMU's three-line WARNING, then
    # "This image format does not support checks" (exit 63).
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    ours = console_script(tmp_path / "bin", "qemu-img")
    results = [run([prog, "check", *args, str(image)], check=False) for prog in (qemu_img, ours)]
    theirs, mine = ((p.returncode, p.stdout, p.stderr) for p in results)
    assert theirs[0] == 63
    assert mine == theirs
