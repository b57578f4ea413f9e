"""qimg dd against qemu-img 7.2 dd: the same output file, byte for byte
(raw and qcow2), for a grid of bs/count/skip; the same messages and exit
codes; nothing written where qemu-img writes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import qemu_check_clean, require_tool, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infotools import qimg_here

MiB = 1 << 20


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """An odd-sized raw file (QEMU counts it in whole sectors) and a qcow2
    overlay over a compressed backing file, made by qemu-img and qemu-io."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("dd")
    (d / "odd.raw").write_bytes(os.urandom(300000) + bytes(200000) + os.urandom(500001))
    run(["qemu-img", "create", "-q", "-f", "raw", "back.raw", "2M"], cwd=d)
    run(["qemu-io", "-f", "raw", "-c", "write -P 3 0 2M", "back.raw"], cwd=d)
    run(["qemu-img", "convert", "-c", "-O", "qcow2", "back.raw", "back.qcow2"], cwd=d)
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "back.qcow2",
            "ov.qcow2",
            "3M",
        ],
        cwd=d,
    )
    run(["qemu-io", "-c", "write -P 9 1000k 100k", "-c", "write -z 64k 64k", "ov.qcow2"], cwd=d)
    return d


def _both(d: Path, *args: str, out: str = "out") -> tuple[tuple, tuple]:
    """(qemu-img's, qimg's) exit code, stdout, stderr and output file bytes
    (None: not written) of `dd ARGS of=OUT`, the program's name taken out."""
    outputs = []
    q_out, m_out = d / f"q-{out}", d / f"m-{out}"
    for path in (q_out, m_out):
        if path.exists():
            path.unlink()
    q = subprocess.run(
        ["qemu-img", "dd", *args, f"of={q_out.name}"], cwd=d, capture_output=True, timeout=60
    )
    m = qimg_here(d, "dd", *args, f"of={m_out.name}")
    for path in (q_out, m_out):
        outputs.append(path.read_bytes() if path.exists() else None)
    theirs = (q.returncode, q.stdout.decode(), q.stderr.decode().replace("qemu-img", "PROG"))
    ours = (m.returncode, m.stdout, m.stderr.replace("qimg", "PROG"))
    theirs = (*theirs[:2], theirs[2].replace(q_out.name, "OUT"), outputs[0])
    ours = (*ours[:2], ours[2].replace(m_out.name, "OUT"), outputs[1])
    return theirs, ours


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    bs=st.sampled_from(["512", "1000", "4k", "64k", "1.5k", "1M", "333333"]),
    count=st.one_of(st.none(), st.integers(0, 40)),
    skip=st.one_of(st.none(), st.integers(0, 40)),
    source=st.sampled_from(["odd.raw", "ov.qcow2"]),
    fmt=st.sampled_from(["raw", "qcow2"]),
)
def test_dd_output_is_byte_identical_to_qemu_img(inputs, bs, count, skip, source, fmt):
    """Any bs / count / skip: the same output, byte for byte, in raw and in
    qcow2 (qcow2 outputs also check clean)."""
    args = [f"bs={bs}", f"if={source}", "-O", fmt]
    if count is not None:
        args.append(f"count={count}")
    if skip is not None:
        args.append(f"skip={skip}")
    theirs, ours = _both(inputs, *args)
    assert ours == theirs
    if fmt == "qcow2" and ours[3] is not None:
        qemu_check_clean(inputs / "m-out")


@pytest.mark.parametrize(
    "args",
    [
        ("bs=64k", "count=4", "skip=1"),  # count counts skipped blocks: 3 copied
        ("bs=64k", "count=2", "skip=2"),  # skip at count's end: empty, no notice
        ("bs=64k", "count=2", "skip=3"),  # past it: empty, a notice, exit 0
        ("bs=64k", "skip=20"),  # past the input's end
        ("bs=1000448", "skip=1"),  # exactly at the end (the length in sectors)
        ("bs=1000449", "skip=1"),
        ("skip=9223372036854775807",),  # skip * bs overflows
        ("count=9223372036854775807",),  # count * bs overflows: the whole input
        ("count=1e",),
        ("count=0x10",),
        ("count=0",),
        ("bs=1000", "count=3"),  # 3000 bytes into a 3072-byte output
        ("bs=2147483647", "count=0"),
    ],
)
def test_dd_counting_and_skipping_as_qemu_img(inputs, args):
    """qemu-img dd's arithmetic, oddities included."""
    for fmt in ("raw", "qcow2"):
        theirs, ours = _both(inputs, *args, "if=odd.raw", "-O", fmt)
        assert ours == theirs, fmt


@pytest.mark.parametrize(
    "args",
    [
        ("bs=0", "if=odd.raw"),
        ("bs=2147483648", "if=odd.raw"),
        ("bs=1x", "if=odd.raw"),
        ("bs=18446744073709551616", "if=odd.raw"),
        ("count=-1", "if=odd.raw"),
        ("count=1.5", "if=odd.raw"),
        ("count=", "if=odd.raw"),
        ("skip=-1", "if=odd.raw"),
        ("foo=1", "if=odd.raw"),
        ("conv=notrunc", "if=odd.raw"),
        ("badword", "if=odd.raw"),
        ("=3", "if=odd.raw"),
        ("if=missing.raw",),
        ("if=",),
        ("-f", "qcow2", "if=odd.raw"),
        ("-f", "foo", "if=odd.raw"),
        ("-O", "foo", "if=odd.raw"),
        ("-O", "foo", "if=missing.raw"),
        ("--object", "foo", "if=odd.raw"),
        ("-x", "if=odd.raw"),
        ("--image-opts", "-f", "raw", "if=driver=raw,file.filename=odd.raw"),
    ],
)
def test_dd_bad_input_fails_as_qemu_img_and_writes_nothing(inputs, args):
    """Bad operands, sizes, files and formats: qemu-img's message and exit
    code, and no output file."""
    theirs, ours = _both(inputs, *args)
    assert ours == theirs
    assert ours[0] != 0 and ours[3] is None


def test_dd_missing_operands_and_unknown_options_as_qemu_img(inputs):
    for args in ((), ("bs=1k",), ("-O",), ("-U", "if=odd.raw")):
        q = subprocess.run(["qemu-img", "dd", *args], cwd=inputs, capture_output=True)
        m = qimg_here(inputs, "dd", *args)
        assert (m.returncode, m.stderr.replace("qimg", "PROG")) == (
            q.returncode,
            q.stderr.decode().replace("qemu-img", "PROG"),
        )


def test_dd_overwrites_an_existing_output_and_reads_image_opts(inputs):
    """An existing output is replaced (created again), as qemu-img does;
    --image-opts names the input with an option string."""
    for path in (inputs / "q-out", inputs / "m-out"):
        path.write_bytes(b"x" * 3 * MiB)
    args = (
        "--image-opts",
        "if=driver=qcow2,file.filename=ov.qcow2",
        "bs=64k",
        "skip=2",
        "-O",
        "qcow2",
    )
    q = subprocess.run(["qemu-img", "dd", *args, "of=q-out"], cwd=inputs, capture_output=True)
    m = qimg_here(inputs, "dd", *args, "of=m-out")
    assert m.returncode == q.returncode == 0
    assert (inputs / "m-out").read_bytes() == (inputs / "q-out").read_bytes()
    qemu_check_clean(inputs / "m-out")
