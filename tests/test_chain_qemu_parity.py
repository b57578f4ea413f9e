"""Backing chains, data files and pseudo-filenames opened as qemu-img 7.2 opens them.

qemu-img is the judge: exit codes, messages (program name taken off) and
JSON are compared with what it prints on the same image, at run time.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

import pytest
from infotools import message, qemu_in, qimg_in, without_actual_size

import qimg
from qimg.api import open_image

KiB = 1024
DEPTH = 1000
ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def this_trees_qimg(monkeypatch):
    """`python -m qimg` run from an image's directory imports this tree's
    qimg, not another one installed."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    )


def make(cwd: Path, name: str, *extra: str, size: str = "1M") -> None:
    qemu_in(cwd, "qemu-img", "create", "-q", "-f", "qcow2", *extra, name, size, check=True)


def write(cwd: Path, name: str, pattern: int, offset: int, length: int = 4 * KiB) -> None:
    qemu_in(cwd, "qemu-io", "-c", f"write -P {pattern} {offset} {length}", name, check=True)


def both(cwd: Path, *args: str):
    """(qemu-img's, qimg's) CompletedProcess of the same command in `cwd`."""
    return qemu_in(cwd, "qemu-img", *args), qimg_in(cwd, *args)


def assert_same_failure(cwd: Path, *args: str) -> str:
    q, m = both(cwd, *args)
    assert q.returncode == 1 and m.returncode == 1, (q.stderr, m.stderr)
    assert m.stderr.count("\n") == 1 and "Traceback" not in m.stderr
    assert message(m.stderr, "qimg") == message(q.stderr, "qemu-img")
    return message(m.stderr, "qimg")


# --- a chain of 1000 images -------------------------------------------------------


@pytest.fixture(scope="module")
def deep_chain(tmp_path_factory) -> Path:
    """c0000 <- c0001 <- ... <- c1000 (1 MiB each), with data in c0000 at 0
    and in c0500 at 64 KiB. Made with qimg's library: one overlay header,
    copied with the backing name changed (names of one length)."""
    cwd = tmp_path_factory.mktemp("deep")
    qimg.create_image(str(cwd / "c0000.qcow2"), "qcow2", 1 << 20)
    qimg.create_image(
        str(cwd / "c0001.qcow2"),
        "qcow2",
        1 << 20,
        backing_file="c0000.qcow2",
        backing_fmt="qcow2",
        check_backing=False,
    )
    overlay = (cwd / "c0001.qcow2").read_bytes()
    assert overlay.count(b"c0000.qcow2") == 1
    for i in range(2, DEPTH + 1):
        name = f"c{i - 1:04}.qcow2".encode()
        (cwd / f"c{i:04}.qcow2").write_bytes(overlay.replace(b"c0000.qcow2", name))
    with open_image(str(cwd / "c0000.qcow2"), writable=True) as img:
        img.write(0, b"\x11" * (4 * KiB))
    with open_image(str(cwd / "c0500.qcow2"), writable=True) as img:
        img.write(64 * KiB, b"\x22" * (4 * KiB))
    return cwd


def test_convert_reads_through_a_chain_of_1000_images(deep_chain):
    top = f"c{DEPTH:04}.qcow2"
    qimg_in(deep_chain, "convert", "-O", "raw", top, "out.raw", check=True)
    data = (deep_chain / "out.raw").read_bytes()
    expected = bytearray(1 << 20)
    expected[0 : 4 * KiB] = b"\x11" * (4 * KiB)
    expected[64 * KiB : 68 * KiB] = b"\x22" * (4 * KiB)
    assert data == expected


def test_library_reads_and_maps_a_chain_of_1000_images(deep_chain):
    with open_image(str(deep_chain / f"c{DEPTH:04}.qcow2")) as img:
        assert img.read(0, 2) == b"\x11\x11"
        assert img.read(64 * KiB, 2) == b"\x22\x22"
        runs = [(s, n) for s, n, is_data, _z in img.allocated_extents(0, img.size) if is_data]
        assert runs == [(0, 64 * KiB), (64 * KiB, 64 * KiB)]  # whole clusters


def test_info_backing_chain_of_1000_images_matches_qemu(deep_chain, qemu_img):
    q, m = both(deep_chain, "info", "--backing-chain", "--output=json", f"c{DEPTH:04}.qcow2")
    assert q.returncode == m.returncode == 0, m.stderr
    assert without_actual_size(json.loads(m.stdout)) == without_actual_size(json.loads(q.stdout))
    assert len(json.loads(m.stdout)) == DEPTH + 1


def test_check_opens_a_chain_of_1000_images(deep_chain, qemu_img):
    # qemu-img takes ~8 s to open the 1000 images; its verdict on the
    # first overlay (the same layout, one image deep) is the one to match.
    q = qemu_in(deep_chain, "qemu-img", "check", "c0001.qcow2")
    m = qimg_in(deep_chain, "check", f"c{DEPTH:04}.qcow2")
    assert (m.returncode, m.stdout, m.stderr) == (q.returncode, q.stdout, q.stderr)
    assert m.returncode == 0
    (deep_chain / "c0000.qcow2").rename(deep_chain / "gone.qcow2")
    try:
        m = qimg_in(deep_chain, "check", f"c{DEPTH:04}.qcow2")
    finally:
        (deep_chain / "gone.qcow2").rename(deep_chain / "c0000.qcow2")
    assert m.returncode == 1 and m.stderr.count("\n") == 1
    assert m.stderr.count("Could not open backing file: ") == DEPTH


# --- check opens the backing chain and the data file ---------------------------


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("command", ["check", "convert"])
def test_missing_backing_file_fails_check_and_convert_as_qemu(tmp_path, qemu_img, depth, command):
    make(tmp_path, "i0.qcow2")
    for i in range(1, depth + 1):
        make(tmp_path, f"i{i}.qcow2", "-b", f"i{i - 1}.qcow2", "-F", "qcow2")
    (tmp_path / "i0.qcow2").unlink()
    args = [command, f"i{depth}.qcow2"] + (["out.raw"] if command == "convert" else [])
    text = assert_same_failure(tmp_path, *args)
    assert text.count("Could not open backing file: ") == depth


@pytest.mark.parametrize("repair", [[], ["-r", "all"]])
def test_check_fails_on_a_missing_data_file_as_qemu(tmp_path, qemu_img, repair):
    make(tmp_path, "img.qcow2", "-o", "data_file=img.data")
    (tmp_path / "img.data").unlink()
    assert_same_failure(tmp_path, "check", *repair, "img.qcow2")


def test_check_with_data_file_present_matches_qemu(tmp_path, qemu_img):
    make(tmp_path, "img.qcow2", "-o", "data_file=img.data")
    write(tmp_path, "img.qcow2", 0x33, 0)
    q, m = both(tmp_path, "check", "--output=json", "img.qcow2")
    assert q.returncode == m.returncode == 0
    assert json.loads(m.stdout) == json.loads(q.stdout)


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))


def loop(cwd: Path) -> None:
    """a.qcow2 -> b.qcow2 -> a.qcow2."""
    make(cwd, "a.qcow2")
    make(cwd, "b.qcow2", "-b", "a.qcow2", "-F", "qcow2")
    qemu_in(cwd, "qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", check=True)


@pytest.mark.parametrize("command", ["check", "convert"])
def test_backing_loop_is_one_clean_error_where_qemu_runs_out_of_memory(tmp_path, qemu_img, command):
    loop(tmp_path)
    args = [command, "a.qcow2"] + (["out.raw"] if command == "convert" else [])
    # qemu-img recurses until a memory limit stops it (512 MiB: quicker
    # than run()'s 2 GiB, ~12 s here).
    q = subprocess.run(
        ["qemu-img", *args], cwd=tmp_path, capture_output=True, timeout=300, preexec_fn=_limit
    )
    assert q.returncode != 0
    m = qimg_in(tmp_path, *args)
    assert m.returncode == 1
    assert m.stderr.count("\n") == 1 and "Traceback" not in m.stderr
    # The words are those of qemu-img info --backing-chain on the same loop.
    chain = qemu_in(tmp_path, "qemu-img", "info", "--backing-chain", "a.qcow2")
    assert chain.returncode == 1
    assert message(m.stderr, "qimg") == (
        "Could not open 'a.qcow2': Could not open backing file: "
        + message(chain.stderr, "qemu-img")
    )
    assert not (tmp_path / "out.raw").exists()


def test_info_backing_chain_on_a_loop_matches_qemu(tmp_path, qemu_img):
    loop(tmp_path)
    q, m = both(tmp_path, "info", "--backing-chain", "a.qcow2")
    assert q.returncode == m.returncode == 1
    assert message(m.stderr, "qimg") == message(q.stderr, "qemu-img")


def test_image_naming_itself_as_raw_backing_file_is_not_a_loop(tmp_path, qemu_img):
    make(tmp_path, "a.qcow2")
    qemu_in(tmp_path, "qemu-img", "rebase", "-u", "-b", "a.qcow2", "-F", "raw", "a.qcow2")
    q, m = both(tmp_path, "check", "a.qcow2")
    assert (m.returncode, m.stdout) == (q.returncode, q.stdout)


# --- compressed clusters in an image with an external data file --------------


@pytest.fixture
def compressed_with_data_file(tmp_path, qemu_img) -> Path:
    """An image with a data file whose L2 entry for guest 128 KiB says
    "compressed" (QEMU never writes one: a corruption)."""
    from damage import Layout

    from qimg.formats.qcow2 import layout as L

    make(tmp_path, "img.qcow2", "-o", "data_file=img.data")
    write(tmp_path, "img.qcow2", 0x55, 0, 64 * KiB)
    write(tmp_path, "img.qcow2", 0x66, 128 * KiB, 64 * KiB)
    lay = Layout.read(tmp_path / "img.qcow2")
    entry = lay.l2_entry(128 * KiB)
    lay.set_l2_entry(128 * KiB, L.QCOW_OFLAG_COMPRESSED | (entry & L.L2E_OFFSET_MASK))
    return tmp_path


@pytest.mark.parametrize(
    "args",
    [["-O", "raw"], ["-O", "qcow2"], ["-S", "0", "-O", "raw"], ["-c", "-O", "qcow2"]],
    ids=["raw", "qcow2", "S0", "compress"],
)
def test_convert_fails_on_compressed_cluster_with_data_file_as_qemu(
    compressed_with_data_file, args
):
    cwd = compressed_with_data_file
    q = qemu_in(cwd, "qemu-img", "convert", *args, "img.qcow2", "q.out")
    m = qimg_in(cwd, "convert", *args, "img.qcow2", "m.out")
    assert q.returncode == m.returncode == 1
    # Two lines in both: the qcow2 driver's corruption event, then the error.
    assert message(m.stderr, "qimg") == message(q.stderr, "qemu-img")
    assert "Compressed cluster entry found" in m.stderr
    assert "Traceback" not in m.stderr


def test_convert_salvage_reads_compressed_cluster_with_data_file_as_qemu(
    compressed_with_data_file,
):
    cwd = compressed_with_data_file
    q = qemu_in(cwd, "qemu-img", "convert", "--salvage", "-O", "raw", "img.qcow2", "q.raw")
    m = qimg_in(cwd, "convert", "--salvage", "-O", "raw", "img.qcow2", "m.raw")
    assert q.returncode == m.returncode == 0
    assert (cwd / "m.raw").read_bytes() == (cwd / "q.raw").read_bytes()


def test_check_and_info_on_compressed_cluster_with_data_file_match_qemu(
    compressed_with_data_file,
):
    cwd = compressed_with_data_file
    q, m = both(cwd, "check", "--output=json", "img.qcow2")
    assert q.returncode == m.returncode == 2
    assert json.loads(m.stdout) == json.loads(q.stdout)
    assert message(m.stderr, "qimg") == message(q.stderr, "qemu-img")
    q, m = both(cwd, "info", "--output=json", "img.qcow2")
    assert q.returncode == m.returncode == 0
    assert without_actual_size(json.loads(m.stdout)) == without_actual_size(json.loads(q.stdout))


# --- file: and json: names ---------------------------------------------------------

JSON_TOP = 'json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"}}'
JSON_BASE = 'json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}'


@pytest.fixture
def named(tmp_path, qemu_img) -> Path:
    """base.qcow2 <- top.qcow2, and overlays of base named "file:base.qcow2"
    (t_file.qcow2) and by a json: name (t_json.qcow2)."""
    make(tmp_path, "base.qcow2")
    write(tmp_path, "base.qcow2", 0x42, 0)
    make(tmp_path, "top.qcow2", "-b", "base.qcow2", "-F", "qcow2")
    write(tmp_path, "top.qcow2", 0x43, 64 * KiB)
    for name, backing in (("t_file.qcow2", "file:base.qcow2"), ("t_json.qcow2", JSON_BASE)):
        make(tmp_path, name, "-u", "-b", backing, "-F", "qcow2")
    return tmp_path


@pytest.mark.parametrize(
    "name",
    [
        "file:top.qcow2",
        JSON_TOP,
        'json:{"file.driver":"file","file.filename":"top.qcow2"}',
        'json:{"file":{"filename":"top.qcow2"}}',
        'json:{"driver":"qcow2","file":{"filename":"top.qcow2"},"backing":null}',
    ],
)
def test_file_and_json_names_open_as_in_qemu(named, name):
    q, m = both(named, "info", "--backing-chain", "--output=json", name)
    assert q.returncode == m.returncode == 0, m.stderr
    assert without_actual_size(json.loads(m.stdout)) == without_actual_size(json.loads(q.stdout))


@pytest.mark.parametrize("name", ["file:top.qcow2", JSON_TOP])
def test_check_and_convert_take_file_and_json_names_as_qemu(named, name):
    q, m = both(named, "check", "--output=json", name)
    assert q.returncode == m.returncode == 0
    assert json.loads(m.stdout) == json.loads(q.stdout)
    qemu_in(named, "qemu-img", "convert", "-O", "raw", name, "q.raw", check=True)
    qimg_in(named, "convert", "-O", "raw", name, "m.raw", check=True)
    assert (named / "m.raw").read_bytes() == (named / "q.raw").read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        'json:{"filename":"top.qcow2"}',
        'json:{"driver":"qcow2","filename":"top.qcow2"}',
        'json:{"driver":"qcow2","file":"top.qcow2"}',
        'json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"},"foo":1}',
        'json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2","bar":1}}',
        'json:{"driver":"qcow2","file":{"filename":"nope.qcow2"}}',
        "json:[1]",
        "file:nope.qcow2",
        "nope:top.qcow2",
    ],
)
def test_bad_file_and_json_names_fail_in_qemus_words(named, name):
    assert_same_failure(named, "info", name)
    if name.startswith(("file:", "nope:")):
        assert_same_failure(named, "check", name)


@pytest.mark.parametrize("overlay", ["t_file.qcow2", "t_json.qcow2", "top.qcow2"])
@pytest.mark.parametrize("where", ["here", "parent"])
def test_backing_names_with_file_or_json_prefix_match_qemu(named, overlay, where):
    """A file: or json: backing name is taken as it is (relative to the
    working directory), a plain one relative to the overlay; human info
    prints "(actual path: ...)" where the two differ, as qemu-img does."""
    cwd = named if where == "here" else named.parent
    name = overlay if where == "here" else f"{named.name}/{overlay}"
    for args in (["info"], ["info", "--output=json"], ["check"]):
        q, m = both(cwd, *args, name)
        assert (m.returncode, message(m.stderr, "qimg")) == (
            q.returncode,
            message(q.stderr, "qemu-img"),
        )
        if args == ["info"]:
            assert [ln for ln in m.stdout.splitlines() if not ln.startswith("disk size")] == [
                ln for ln in q.stdout.splitlines() if not ln.startswith("disk size")
            ]
        elif args == ["check"]:
            assert m.stdout == q.stdout
        else:
            assert without_actual_size(json.loads(m.stdout)) == without_actual_size(
                json.loads(q.stdout)
            )
    if where == "here":
        qemu_in(cwd, "qemu-img", "convert", "-O", "raw", name, "q.raw", check=True)
        qimg_in(cwd, "convert", "-O", "raw", name, "m.raw", check=True)
        assert (cwd / "m.raw").read_bytes() == (cwd / "q.raw").read_bytes()


def test_self_referencing_json_backing_name_fails_cleanly(tmp_path, qemu_img):
    make(tmp_path, "a.qcow2")
    self_name = 'json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"}}'
    qemu_in(tmp_path, "qemu-img", "rebase", "-u", "-b", self_name, "-F", "qcow2", "a.qcow2")
    chain = qemu_in(tmp_path, "qemu-img", "info", "--backing-chain", "a.qcow2")
    assert chain.returncode == 1
    for args in (["check", "a.qcow2"], ["convert", "a.qcow2", "out.raw"]):
        q = subprocess.run(
            ["qemu-img", *args], cwd=tmp_path, capture_output=True, timeout=300, preexec_fn=_limit
        )
        assert q.returncode != 0
        m = qimg_in(tmp_path, *args)
        assert m.returncode == 1 and m.stderr.count("\n") == 1
        assert message(m.stderr, "qimg") == "Could not open 'a.qcow2': " + message(
            chain.stderr, "qemu-img"
        )
    assert not (tmp_path / "out.raw").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["create", "-q", "-f", "qcow2", "file:out.qcow2", "1M"],
        ["convert", "-O", "qcow2", "top.qcow2", "file:out.qcow2"],
        ["convert", "-O", "raw", "top.qcow2", 'json:{"driver":"raw","file":{"filename":"out"}}'],
        ["create", "-f", "raw", 'json:{"driver":"raw","file":{"filename":"out"}}', "1M"],
    ],
)
def test_targets_named_with_file_or_json_prefix_as_qemu(named, args):
    runs = {}
    for tool in ("qemu-img", "qimg"):
        cwd = named / tool
        cwd.mkdir()
        for name in ("base.qcow2", "top.qcow2"):
            (cwd / name).write_bytes((named / name).read_bytes())
        proc = qemu_in(cwd, "qemu-img", *args) if tool == "qemu-img" else qimg_in(cwd, *args)
        runs[tool] = (proc.returncode, message(proc.stderr, tool), sorted(os.listdir(cwd)))
    assert runs["qimg"] == runs["qemu-img"]
