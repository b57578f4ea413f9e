"""Helpers of the rebase and commit tests: backing chains built by qemu-img
in one directory, copied twice, one copy changed by qimg and the other by
qemu-img, and the results compared file by file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from conftest import run
from infotools import message, qemu_in, qimg_here

KiB = 1024
MiB = 1 << 20


def make(d: Path, name: str, size: str = "4M", *extra: str, fmt: str = "qcow2") -> None:
    qemu_in(d, "qemu-img", "create", "-q", "-f", fmt, *extra, name, size, check=True)


def overlay(d: Path, name: str, backing: str, size: str = "", fmt: str = "qcow2") -> None:
    extra = [size] if size else []
    qemu_in(
        d,
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        fmt,
        name,
        *extra,
        check=True,
    )


def img(d: Path, *args: str) -> None:
    """`qemu-img ARGS` in `d`, which must succeed."""
    qemu_in(d, "qemu-img", *args, check=True)


def io(d: Path, name: str, *commands: str, fmt: str = "qcow2") -> None:
    args = []
    for c in commands:
        args += ["-c", c]
    qemu_in(d, "qemu-io", "-f", fmt, *args, name, check=True)


def twins(src: Path, root: Path) -> tuple[Path, Path]:
    """Two copies of directory `src`: (for qimg, for qemu-img)."""
    mine, theirs = root / "qimg", root / "qemu"
    shutil.copytree(src, mine)
    shutil.copytree(src, theirs)
    return mine, theirs


def run_both(mine: Path, theirs: Path, *args: str):
    """(qimg's, qemu-img's) result of the same command, each in its copy
    ("{dir}" in an argument is the copy's directory); stderr with the
    program's name taken off."""
    m = qimg_here(mine, *[a.replace("{dir}", str(mine)) for a in args])
    q = qemu_in(theirs, "qemu-img", *[a.replace("{dir}", str(theirs)) for a in args])
    m.stderr = message(m.stderr, "qimg").replace("'qimg --help'", "'PROG --help'")
    q.stderr = message(q.stderr, "qemu-img").replace("'qemu-img --help'", "'PROG --help'")
    return m, q


def compare_both(d: Path, *args: str) -> tuple[tuple, tuple]:
    """(qemu-img's, qimg's) exit code, stdout and stderr of `compare ARGS`
    run in `d`, the program's name taken out."""
    q = subprocess.run(["qemu-img", "compare", *args], cwd=d, capture_output=True, timeout=60)
    m = qimg_here(d, "compare", *args)
    theirs = (q.returncode, q.stdout.decode(), q.stderr.decode().replace("qemu-img", "PROG"))
    ours = (m.returncode, m.stdout, m.stderr.replace("qimg", "PROG"))
    return theirs, ours


def alone(name: str) -> str:
    """A json: name opening qcow2 image `name` without its backing file."""
    file = {"driver": "file", "filename": name}
    return "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": file})


def image_map(d: Path, name: str, fmt: str | None = None) -> list:
    """qemu-img map --output=json of `name` (without its backing file where
    that is missing)."""
    args = ["map", "-U", "--output=json"] + (["-f", fmt] if fmt else [])
    proc = qemu_in(d, "qemu-img", *args, name)
    if proc.returncode and "Could not open backing file" in proc.stderr:
        proc = qemu_in(d, "qemu-img", *args, alone(name))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def allocation(extents: list) -> list:
    """A map without host offsets: runs of one (depth, present, zero,
    data) merged. Where QEMU's commit job places new clusters in the base
    depends on the order its concurrent requests finish in."""
    out: list[dict] = []
    for e in extents:
        e = {k: v for k, v in e.items() if k != "offset"}
        last = out[-1] if out else None
        if last and all(last[k] == e[k] for k in ("depth", "present", "zero", "data")):
            last["length"] += e["length"]
        else:
            out.append(e)
    return out


def assert_same_allocation(mine: Path, theirs: Path, *names: str) -> None:
    """Each image's allocation (qemu-img map: what each layer holds) is the
    same in both copies, host offsets aside."""
    for name in names:
        assert allocation(image_map(mine, name)) == allocation(image_map(theirs, name)), name


def assert_clean(d: Path, *names: str) -> None:
    """qemu-img check finds each image clean (a qcow2 image whose backing
    file is missing is checked alone)."""
    for name in names:
        proc = qemu_in(d, "qemu-img", "check", "-U", name)
        if proc.returncode and "Could not open backing file" in proc.stderr:
            proc = qemu_in(d, "qemu-img", "check", "-U", alone(name))
        assert proc.returncode in (0, 63), f"{name}: {proc.stdout}{proc.stderr}"


def assert_same_maps(mine: Path, theirs: Path, *names: str) -> None:
    """Each image's allocation (qemu-img map: what each layer holds, where
    the data sits in its file) is the same in both copies."""
    for name in names:
        assert image_map(mine, name) == image_map(theirs, name), name


def assert_same_guest(a: Path, b: Path, name: str, other: str | None = None) -> None:
    """qemu-img compare: image `name` in `a` reads as `other` (default the
    same name) in `b`."""
    proc = run(["qemu-img", "compare", "-U", str(a / name), str(b / (other or name))], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}
