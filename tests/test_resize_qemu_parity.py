"""qimg resize against qemu-img 7.2: the same image after the same resize
(virtual size, data below the new size, snapshots, check clean), and the
same refusals (message and exit code)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import qemu_check_clean, qemu_read_raw, run
from infotools import message, qemu_in, qimg_here


def _said(proc, prog: str) -> tuple[int, str]:
    """Exit code and message, the program's name taken out (also of "Try")."""
    return proc.returncode, message(proc.stderr, prog).replace(f"'{prog} --help'", "'PROG --help'")


MiB = 1 << 20


def _qemu_io(path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    run([*args, str(path)])


def _virtual_size(path) -> int:
    return json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)[
        "virtual-size"
    ]


def _make(tmp_path, name: str, options: str, size: int, snapshot: bool) -> tuple:
    """An image made by qemu-img holding data, zeros and compressed clusters
    (and a snapshot), with its guest data as qemu-img reads it."""
    path = tmp_path / name
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path), str(size)])
    cs = int(options.split("cluster_size=")[1].split(",")[0])
    _qemu_io(
        path,
        f"write -P 0x11 0 {3 * cs + 512}",
        f"write -P 0x22 {size // 2 - cs} {2 * cs}",
        f"write -P 0x33 {size - 2 * cs} {2 * cs}",
    )
    if "compat=0.10" not in options:
        _qemu_io(path, f"write -z {size // 2} {cs}")
    if "data_file" not in options and cs < 2 * MiB:
        _qemu_io(path, f"write -c -P 0x44 {size // 4 // cs * cs} {cs}")
    if snapshot:
        run(["qemu-img", "snapshot", "-c", "s1", str(path)])
        _qemu_io(path, f"write -P 0x55 {cs} {cs}")
    return path, qemu_read_raw(path, tmp_path)


def _snapshot_data(path, tmp_path) -> bytes:
    out = tmp_path / "snap.raw"
    run(["qemu-img", "convert", "-l", "s1", "-O", "raw", str(path), str(out)])
    return out.read_bytes()


CASES = [
    ("cluster_size=512", 2 * MiB),
    ("cluster_size=512,compat=0.10", 2 * MiB),
    ("cluster_size=16384,extended_l2=on", 4 * MiB),
    ("cluster_size=65536", 8 * MiB),
    ("cluster_size=65536,refcount_bits=2", 8 * MiB),
    ("cluster_size=65536,compat=0.10", 8 * MiB),
    ("cluster_size=2097152", 16 * MiB),
    ("cluster_size=2097152,extended_l2=on", 16 * MiB),
]


@pytest.mark.parametrize("snapshot", [False, True], ids=["plain", "snapshot"])
@pytest.mark.parametrize("options,size", CASES, ids=[c[0] for c in CASES])
def test_grow_then_shrink_keeps_the_data_below_the_new_size(
    qemu_img, tmp_path, options, size, snapshot
):
    path, data = _make(tmp_path, "a.qcow2", options, size, snapshot)
    snap = _snapshot_data(path, tmp_path)[:size] if snapshot else None
    v2 = "compat=0.10" in options
    if snapshot and v2:
        proc = qimg_here(tmp_path, "resize", "a.qcow2", "+1M")
        oracle = qemu_in(
            tmp_path, "qemu-img", "resize", shutil.copy(path, tmp_path / "q.qcow2"), "+1M"
        )
        assert _said(proc, "qimg") == _said(oracle, "qemu-img")
        return
    grown = 2 * size + 3 * 512  # past the L1 table's reach, not cluster aligned
    proc = qimg_here(tmp_path, "resize", "a.qcow2", str(grown))
    assert (proc.returncode, proc.stdout) == (0, "Image resized.\n"), proc.stderr
    qemu_check_clean(path)
    assert _virtual_size(path) == grown
    assert qemu_read_raw(path, tmp_path) == data + bytes(grown - size)
    # Writes past the old end land in L2 tables of the grown L1 table.
    _qemu_io(path, f"write -P 0x66 {grown - 4096} 4096")
    small = size // 2 - 512
    proc = qimg_here(tmp_path, "resize", "--shrink", "a.qcow2", str(small))
    assert proc.returncode == 0, proc.stderr
    qemu_check_clean(path)
    assert _virtual_size(path) == small
    assert qemu_read_raw(path, tmp_path) == data[:small]
    if snapshot:  # convert -l writes the image's current size of it
        assert _snapshot_data(path, tmp_path) == snap[:small]


def test_shrink_frees_the_tail_as_qemu_img_does(qemu_img, tmp_path):
    path, data = _make(tmp_path, "a.qcow2", "cluster_size=65536", 64 * MiB, False)
    _qemu_io(path, f"write -P 0x77 {40 * MiB} {8 * MiB}")
    theirs = shutil.copy(path, tmp_path / "q.qcow2")
    assert qimg_here(tmp_path, "resize", "--shrink", "a.qcow2", "16M").returncode == 0
    run(["qemu-img", "resize", "-q", "--shrink", str(theirs), "16M"])
    qemu_check_clean(path)
    assert path.stat().st_size <= (tmp_path / "q.qcow2").stat().st_size
    assert qemu_read_raw(path, tmp_path) == qemu_read_raw(theirs, tmp_path)


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_preallocation_maps_the_new_area_as_qemu_img_does(qemu_img, tmp_path, mode):
    path, data = _make(tmp_path, "a.qcow2", "cluster_size=65536", 1 * MiB + 512, False)
    theirs = shutil.copy(path, tmp_path / "q.qcow2")
    proc = qimg_here(tmp_path, "resize", f"--preallocation={mode}", "a.qcow2", "3M")
    assert proc.returncode == 0, proc.stderr
    run(["qemu-img", "resize", "-q", f"--preallocation={mode}", str(theirs), "3M"])
    qemu_check_clean(path)

    def mapped(p):
        m = json.loads(run(["qemu-img", "map", "--output=json", str(p)]).stdout)
        return [(e["start"], e["length"], e["data"], e["zero"]) for e in m if e["start"] >= 2 * MiB]

    assert mapped(path) == mapped(theirs)
    assert qemu_read_raw(path, tmp_path) == qemu_read_raw(theirs, tmp_path)


def test_growing_over_a_longer_backing_file_reads_zeros(qemu_img, tmp_path):
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "4M"])
    _qemu_io(tmp_path / "base.qcow2", "write -P 0x99 0 4M")
    for name in ("top.qcow2", "q.qcow2"):
        qemu_in(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2",
                "-F", "qcow2", name, "1000k", check=True)  # fmt: skip
    assert qimg_here(tmp_path, "resize", "top.qcow2", "3M").returncode == 0
    run(["qemu-img", "resize", "-q", str(tmp_path / "q.qcow2"), "3M"])
    qemu_check_clean(tmp_path / "top.qcow2")
    data = qemu_read_raw(tmp_path / "top.qcow2", tmp_path)
    assert data == qemu_read_raw(tmp_path / "q.qcow2", tmp_path)
    assert data == b"\x99" * 1000 * 1024 + bytes(3 * MiB - 1000 * 1024)


def test_bitmaps_follow_the_new_size(qemu_img, tmp_path):
    from qimg import open_image
    from qimg.formats.qcow2.bitmap import load_bitmaps

    path = tmp_path / "a.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M"])
    run(["qemu-img", "bitmap", "--add", str(path), "on"])
    run(["qemu-img", "bitmap", "--add", "-g", "512k", "--disable", str(path), "off"])
    _qemu_io(path, "write 0 64k", "write 3M 1M")
    run(["qemu-img", "bitmap", "--merge", "on", str(path), "off"])
    for size in ("6M", "1M"):
        theirs = shutil.copy(path, tmp_path / "q.qcow2")
        assert qimg_here(tmp_path, "resize", "--shrink", "a.qcow2", size).returncode == 0
        run(["qemu-img", "resize", "-q", "--shrink", str(theirs), size])
        qemu_check_clean(path)
        with open_image(str(path)) as a, open_image(str(theirs)) as b:
            mine, oracle = load_bitmaps(a), load_bitmaps(b)
        assert [(m.name, m.enabled, m.size, m.bits.tobytes()) for m in mine] == [
            (m.name, m.enabled, m.size, m.bits.tobytes()) for m in oracle
        ]
        _qemu_io(path, "write 0 512")  # the bitmaps still load and track


def test_raw_grows_and_shrinks(qemu_img, tmp_path):
    for name in ("a.raw", "q.raw"):
        (tmp_path / name).write_bytes(b"\xab" * 100_000)
    for args in (["3M"], ["--preallocation=falloc", "+1M"], ["--preallocation=full", "+1M"],
                 ["--shrink", "1000001"]):  # fmt: skip
        proc = qimg_here(tmp_path, "resize", "-f", "raw", *args[:-1], "a.raw", args[-1])
        oracle = qemu_in(tmp_path, "qemu-img", "resize", "-f", "raw", *args[:-1], "q.raw", args[-1])
        assert (proc.returncode, proc.stdout) == (oracle.returncode, oracle.stdout)
        assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "q.raw").read_bytes()


REFUSALS = [
    ["a.qcow2", "1M"],
    ["a.qcow2", "--", "-1M"],
    ["a.qcow2", "-1M"],
    ["a.qcow2", "-5M"],
    ["a.qcow2", "0"],
    ["a.qcow2", "xyz"],
    ["a.qcow2", "+-1M"],
    ["a.qcow2"],
    ["a.qcow2", "1", "2"],
    ["-q", "a.qcow2"],
    ["a.qcow2", "-U", "3M"],
    ["--preallocation=bogus", "a.qcow2", "3M"],
    ["--preallocation=metadata", "a.qcow2", "2M"],
    ["--shrink", "--preallocation=full", "a.qcow2", "1M"],
    ["a.qcow2", "2000001"],
    ["a.qcow2", "8E"],
    ["a.qcow2", "7E"],
    ["-f", "qcow2", "r.raw", "3M"],
    ["-f", "raw", "--preallocation=metadata", "r.raw", "3M"],
    ["--image-opts", "-f", "qcow2", "a.qcow2", "3M"],
    ["--image-opts", "a.qcow2", "3M"],
    ["--image-opts", "driver=qcow2,file.filename=a.qcow2,foo=1", "3M"],
    ["missing.qcow2", "3M"],
]


@pytest.mark.parametrize("args", REFUSALS, ids=[" ".join(a) for a in REFUSALS])
def test_refusals_match_qemu_img(qemu_img, tmp_path, args):
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "2M"])
    run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "2M"])
    before = (tmp_path / "a.qcow2").read_bytes()
    oracle = qemu_in(tmp_path, "qemu-img", "resize", *args)
    assert (tmp_path / "a.qcow2").read_bytes() == before
    proc = qimg_here(tmp_path, "resize", *args)
    assert _said(proc, "qimg") == _said(oracle, "qemu-img")
    assert (tmp_path / "a.qcow2").read_bytes() == before


def test_v2_image_over_a_longer_backing_file_is_refused(qemu_img, tmp_path):
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "4M"])
    for name in ("top.qcow2", "q.qcow2"):
        qemu_in(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10",
                "-b", "base.qcow2", "-F", "qcow2", name, "1M", check=True)  # fmt: skip
    proc = qimg_here(tmp_path, "resize", "top.qcow2", "2M")
    oracle = qemu_in(tmp_path, "qemu-img", "resize", "q.qcow2", "2M")
    assert _said(proc, "qimg") == _said(oracle, "qemu-img")
    assert _virtual_size(tmp_path / "top.qcow2") == 1 * MiB


def test_inconsistent_bitmap_refuses_the_resize(qemu_img, tmp_path):
    from qimg.formats.qcow2 import layout as L

    path = tmp_path / "a.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"])
    run(["qemu-img", "bitmap", "--add", str(path), "bm0"])
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    assert info["format-specific"]["data"]["bitmaps"]
    from qimg import open_image
    from qimg.formats.qcow2.bitmap import read_bitmap_directory

    with open_image(str(path)) as img:
        directory = img.header.bitmaps_ext[2]
        flags = read_bitmap_directory(img)[0].flags
    with open(path, "r+b") as f:
        f.seek(directory + 12)
        f.write((flags | L.BME_FLAG_IN_USE).to_bytes(4, "big"))
    shutil.copy(path, tmp_path / "q.qcow2")
    proc = qimg_here(tmp_path, "resize", "a.qcow2", "2M")
    oracle = qemu_in(tmp_path, "qemu-img", "resize", "q.qcow2", "2M")
    assert _said(proc, "qimg") == _said(oracle, "qemu-img")
    assert path.read_bytes() == (tmp_path / "q.qcow2").read_bytes()


def test_data_file_follows_the_new_size(qemu_img, tmp_path):
    path = tmp_path / "a.qcow2"
    qemu_in(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=a.data",
            "a.qcow2", "1M", check=True)  # fmt: skip
    qemu_in(tmp_path, "qemu-io", "-c", "write -P 0x42 0 1M", "a.qcow2", check=True)
    assert qimg_here(tmp_path, "resize", "a.qcow2", "3M").returncode == 0
    assert (tmp_path / "a.data").stat().st_size == 3 * MiB
    assert qimg_here(tmp_path, "resize", "--shrink", "a.qcow2", "512k").returncode == 0
    assert (tmp_path / "a.data").stat().st_size == 512 * 1024
    qemu_in(tmp_path, "qemu-img", "check", "a.qcow2", check=True)
    data = qemu_in(tmp_path, "qemu-io", "-c", "read -P 0x42 0 512k", "a.qcow2", check=True)
    assert "Pattern verification failed" not in data.stdout
    assert _virtual_size(path) == 512 * 1024


@pytest.mark.parametrize(
    "command", [["resize", "a.qcow2", "2M"], ["amend", "-o", "size=2M", "a.qcow2"]]
)
def test_an_image_in_use_is_refused_as_qemu_img_does(qemu_img, tmp_path, command):
    import subprocess
    import time

    run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M"])
    holder = subprocess.Popen(
        ["qemu-io", str(tmp_path / "a.qcow2")],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):  # until qemu-io holds its locks
            probe = run(
                ["qemu-img", "check", "-r", "leaks", str(tmp_path / "a.qcow2")], check=False
            )
            if "lock" in probe.stderr:
                break
            time.sleep(0.05)
        oracle = qemu_in(tmp_path, "qemu-img", *command)
        proc = qimg_here(tmp_path, *command)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert oracle.returncode == 1
    assert _said(proc, "qimg") == _said(oracle, "qemu-img")
