"""convert's command line beside qemu-img 7.2: size options, option
conflicts, -o help and -p output, each judged by running qemu-img."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import qimg, run


@pytest.fixture
def images(tmp_path):
    """A 1 MiB raw source full of data and an existing 1 MiB qcow2 target
    (for -n), each once per tool."""
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(1 << 20))
    for tool in ("q", "m"):
        (tmp_path / tool).mkdir()
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / tool / "t.qcow2"), "1M"])
    return tmp_path


def _both(tmp, args: list[str]):
    """Run `convert ARGS` with both tools; SRC, TGT (new) and EXIST (-n
    target) name the files. Returns the two results, names made neutral."""
    out = []
    for tool in ("q", "m"):
        d = tmp / tool
        paths = {"SRC": tmp / "src.raw", "TGT": d / "new.qcow2", "EXIST": d / "t.qcow2"}
        argv = ["convert", *[str(paths.get(a, a)) for a in args]]
        proc = run(["qemu-img", *argv], check=False) if tool == "q" else qimg(*argv, check=False)
        text = proc.stdout + "|" + proc.stderr
        text = text.replace("qemu-img:", "PROG:").replace("qimg:", "PROG:").replace(str(d), "DIR")
        # qemu-img splits the suffix hint over two lines; qimg's convert keeps one.
        text = text.replace(" for\nPROG: ", " for ")
        out.append((proc.returncode, text, (d / "new.qcow2").exists()))
    return out


@pytest.mark.parametrize(
    "args",
    [
        ["-n", "-o", "cluster_size=4k", "SRC", "EXIST"],
        ["-n", "-O", "qcow2", "-o", "help", "SRC", "EXIST"],
        ["-n", "-O", "qcow2", "-o", "?", "SRC", "EXIST"],
        ["-n", "-B", "base", "-o", "x=y", "SRC", "EXIST"],
        ["-c", "-n", "-o", "x=y", "SRC", "EXIST"],
        ["--target-is-zero", "-n", "-o", "x=y"],
        ["-n", "-o", ""],
        ["-n", "-o", "a,"],
        ["-C", "-c", "-O", "qcow2", "-o", "help"],
        ["--target-is-zero", "-o", "help"],
        ["--skip-broken-bitmaps", "-n", "-o", "x=y"],
        ["-m", "0", "-o", "help"],
        ["-O", "qcow2", "-o", "help=on", "SRC", "TGT"],
        ["--target-is-zero", "-O", "qcow2", "SRC", "TGT"],
        ["-O", "qcow2", "-c", "-o", "preallocation=full", "SRC", "TGT"],
        ["-O", "qcow2", "-C", "-S", "0", "SRC", "TGT"],
    ],
)
def test_convert_option_conflicts_match_qemu_img(qemu_img, images, args):
    q, m = _both(images, args)
    assert m == q


@pytest.mark.parametrize(
    "args",
    [
        ["-O", "qcow2", "-o", "?", "SRC"],
        ["-O", "qcow2", "-o", "cluster_size=64k,help"],
        ["-O", "qcow2", "-o", "cluster_size=64k,?", "SRC", "TGT"],
        ["-O", "raw", "-o", "?", "SRC", "TGT"],
        ["-O", "raw", "-o", "help"],
    ],
)
def test_convert_question_mark_help_lists_qemu_img_options(qemu_img, images, args):
    (qrc, qtext, qmade), (mrc, mtext, mmade) = _both(images, args)

    def names(text):
        lines = text.split("|")[0].splitlines()
        opts = [line.split("=")[0].strip() for line in lines if line.startswith("  ")]
        return lines[0], opts

    assert (mrc, names(mtext), mmade) == (qrc, names(qtext), qmade)


@pytest.mark.parametrize(
    "args",
    [
        ["-S", "1024.0"],
        ["-S", "1.5"],
        ["-S", "1k5"],
        ["-S", "100"],
        ["-S", "32M"],
        ["-S", "99999999999999999999"],
        ["-S", "8E"],
        ["-S", "0x10k"],
        ["-r", "1.5"],
        ["-r", "8E"],
        ["-r", "1G"],
        ["-m", "0x4"],
        ["-m", "010"],
        ["-m", "+4"],
        ["-m", "4k"],
        ["-m", "17"],
    ],
)
def test_convert_size_and_number_options_match_qemu_img(qemu_img, images, args):
    q, m = _both(images, ["-O", "qcow2", *args, "SRC", "TGT"])
    assert m == q


# Progress sources (8 MiB): qemu-io writes into a qcow2 (or a raw file with
# holes); "zero" ones hold no data, "full" ones nothing else.
PROGRESS_SOURCES = {
    "full.raw": ("raw", ["write -P 7 0 8M"]),
    "zero.raw": ("raw", []),
    "mixed.raw": ("raw", ["write -P 1 0 4k", "write -P 2 100k 300k", "write -P 3 3M 3M"]),
    "full.qcow2": ("qcow2", ["write -P 7 0 8M"]),
    "zero.qcow2": ("qcow2", ["write -z 1M 1M"]),
    "sparse.qcow2": ("qcow2", ["write -P 1 5M 64k", "write -z 6M 64k", "write -P 2 7M 512"]),
    "mixed.qcow2": ("qcow2", ["write -P 1 0 4k", "write -P 2 100k 300k", "write -P 3 3M 3M"]),
    # A raw file whose size is not a multiple of 512, its last 1 MiB data.
    "odd.raw": ("raw", []),
}


def _progress_source(tmp_path, name: str):
    fmt, writes = PROGRESS_SOURCES[name]
    path = tmp_path / name
    if name == "odd.raw":
        with open(path, "wb") as f:
            f.truncate((7 << 20) + 1000)
            f.seek(6 << 20)
            f.write(b"z" * ((1 << 20) + 1000))
        return path
    run(["qemu-img", "create", "-q", "-f", fmt, str(path), "8M"])
    for w in writes:
        run(["qemu-io", "-f", fmt, "-c", w, str(path)])
    return path


def _progress_outputs(tmp_path, args: list[str]) -> list[tuple[int, bytes, bytes]]:
    outs = []
    for tool in ("q", "m"):
        target = tmp_path / f"{tool}.out"
        prog = ["qemu-img"] if tool == "q" else [sys.executable, "-m", "qimg"]
        proc = subprocess.run(
            prog + ["convert", *args, str(target)], capture_output=True, timeout=120
        )
        err = proc.stderr.replace(b"qemu-img: ", b"PROG: ").replace(b"qimg: ", b"PROG: ")
        outs.append((proc.returncode, proc.stdout, err.replace(str(target).encode(), b"TGT")))
        target.unlink(missing_ok=True)
    return outs


@pytest.mark.parametrize(
    "source,args",
    [
        *[(name, ["-O", fmt]) for name in PROGRESS_SOURCES for fmt in ("raw", "qcow2")],
        ("mixed.raw", ["-O", "qcow2", "-S", "0"]),
        ("sparse.qcow2", ["-O", "raw", "-S", "0"]),
        ("mixed.qcow2", ["-O", "qcow2", "-c"]),
        ("sparse.qcow2", ["-O", "qcow2", "-c"]),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_convert_progress_lines_when_piped_match_qemu_img(tmp_path, qemu_img, source, args):
    # qemu-img counts progress over the data it copies, a copy request at a
    # time: "    (N.NN/100%)\r" steps on stdout, 100% twice, then a newline.
    src = _progress_source(tmp_path, source)
    theirs, ours = _progress_outputs(tmp_path, ["-p", *args, str(src)])
    assert theirs[0] == 0
    assert theirs[1].endswith(b"(100.00/100%)\r    (100.00/100%)\r\n") or source.startswith(
        "zero.qcow2"
    )
    assert ours == theirs


def test_convert_progress_of_sources_concatenated_matches_qemu_img(tmp_path, qemu_img):
    srcs = [str(_progress_source(tmp_path, n)) for n in ("mixed.raw", "sparse.qcow2", "full.raw")]
    theirs, ours = _progress_outputs(tmp_path, ["-p", "-O", "qcow2", *srcs])
    assert ours == theirs


@pytest.mark.parametrize(
    "args",
    [["-O", "foo"], ["-n"], ["-O", "qcow2", "-o", "cluster_size=3"], ["-S", "3"], []],
    ids=" ".join,
)
def test_convert_progress_before_a_failure_matches_qemu_img(tmp_path, qemu_img, args):
    # qemu-img prints 0% once the command line is taken, before it opens
    # anything; the line ends (newline) when the command ends.
    src = _progress_source(tmp_path, "zero.raw")
    theirs, ours = _progress_outputs(tmp_path, ["-p", *args, str(src)])
    if not args:
        theirs, ours = _progress_outputs(tmp_path, ["-p", str(tmp_path / "missing")])
    assert theirs[0] == 1
    assert ours == theirs
