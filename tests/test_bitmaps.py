"""Persistent dirty bitmaps: convert --bitmaps and the write hook.

The oracle is QEMU: qemu-nbd exports a bitmap (-B NAME) over a unix socket
in tmp_path and `qemu-img map` with x-dirty-bitmap reads it back; qemu-img
info/check judge the images; qemu-io makes the same writes on a copy.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import qemu_check_clean, qimg, require_tool, run

from qimg.api import open_image
from qimg.formats.qcow2.bitmap import load_bitmaps, set_bits

MiB = 1 << 20
SIZE = 4 * MiB + 1536  # the last granule of every bitmap is partial
# name -> qemu-img bitmap --add options
BITMAPS = {"b64k": [], "fine": ["-g", "512"], "coarse": ["-g", "1M"], "off": ["--disable"]}


@pytest.fixture(scope="module")
def qemu_nbd() -> str:
    return require_tool("qemu-nbd")


def dirty_extents(path, name: str, sock_dir) -> list[tuple[int, int]]:
    """The dirty (start, length) runs of bitmap `name` as QEMU exports them."""
    sock = os.path.join(sock_dir, f"nbd-{name}.sock")
    for attempt in range(20):
        if os.path.exists(sock):
            os.unlink(sock)
        nbd = subprocess.Popen(
            ["qemu-nbd", "-r", "-k", sock, "-f", "qcow2", "-B", name, str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(sock) and nbd.poll() is None:
                assert time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.01)
            assert nbd.poll() is None, nbd.stderr.read().decode()
            opts = (
                f"driver=nbd,server.type=unix,server.path={sock},"
                f"x-dirty-bitmap=qemu:dirty-bitmap:{name}"
            )
            proc = run(["qemu-img", "map", "--output=json", "--image-opts", opts], check=False)
        finally:
            nbd.terminate()
            nbd.wait(timeout=10)
        if proc.returncode == 0:
            # x-dirty-bitmap reports dirty areas as "data": false.
            return [(e["start"], e["length"]) for e in json.loads(proc.stdout) if not e["data"]]
        time.sleep(0.05 * (attempt + 1))  # socket bound but not yet listening
    raise AssertionError(f"qemu-img map of bitmap {name}: {proc.stderr}")


def info(path) -> dict:
    data = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
    data.pop("actual-size", None)
    data.pop("filename", None)
    return data


def bitmap_flags(path) -> dict[str, list[str]]:
    bms = info(path)["format-specific"]["data"].get("bitmaps", [])
    return {b["name"]: b["flags"] for b in bms}


def runs_from_bits(bits: np.ndarray, granularity: int, size: int) -> list[tuple[int, int]]:
    """Dirty runs of an LSB-first bit array, clipped to the guest size."""
    flags = np.unpackbits(bits, bitorder="little").astype(bool)
    padded = np.concatenate(([False], flags, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    out = []
    for a, b in zip(edges[::2], edges[1::2]):
        start, end = int(a) * granularity, min(int(b) * granularity, size)
        out.append((start, end - start))
    return out


def make_image(path, size: int = SIZE, extra: list[str] = ()) -> None:
    run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), str(size)])
    for name, opts in BITMAPS.items():
        run(["qemu-img", "bitmap", "--add", *opts, str(path), name])


def run_qemu_io(path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    run(args + [str(path)])


@pytest.fixture(scope="module")
def source(tmp_path_factory, qemu_img, qemu_io):
    """A qcow2 with enabled, fine, coarse and disabled (merged into) bitmaps."""
    path = tmp_path_factory.mktemp("bitmaps") / "src.qcow2"
    make_image(path)
    run_qemu_io(path, "write -P 1 100k 10k", "write -z 2M 1", "discard 3M 70000", "write 4M 1536")
    run(["qemu-img", "bitmap", "--merge", "fine", str(path), "off"])
    return path


def assert_same_bitmaps(a, b, names, tmp_path) -> None:
    for name in names:
        assert dirty_extents(a, name, tmp_path) == dirty_extents(b, name, tmp_path), name


# --- convert --bitmaps ---------------------------------------------------------------


@pytest.mark.parametrize(
    "create_opts", [[], ["-o", "cluster_size=512"], ["-c", "-o", "cluster_size=4096"]]
)
def test_convert_bitmaps_copies_what_qemu_img_copies(source, tmp_path, qemu_nbd, create_opts):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    args = ["convert", "-O", "qcow2", *create_opts, "--bitmaps", str(source)]
    run(["qemu-img", *args, str(theirs)])
    qimg(*args, str(ours))
    qemu_check_clean(ours)
    assert info(ours) == info(theirs)
    assert_same_bitmaps(ours, theirs, BITMAPS, tmp_path)


def test_reader_loads_the_bits_qemu_exports(source, tmp_path, qemu_nbd):
    img = open_image(str(source), "qcow2")
    try:
        bitmaps = load_bitmaps(img)
    finally:
        img.close()
    assert [b.name for b in bitmaps] == list(BITMAPS)
    assert [b.enabled for b in bitmaps] == [True, True, True, False]
    for bm in bitmaps:
        runs = runs_from_bits(bm.bits, 1 << bm.granularity_bits, SIZE)
        assert runs == dirty_extents(source, bm.name, tmp_path), bm.name


def test_convert_bitmaps_of_a_source_without_bitmaps_adds_none(tmp_path, qemu_img):
    src, ours, theirs = (tmp_path / n for n in ("s.qcow2", "o.qcow2", "t.qcow2"))
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "1M"])
    run(["qemu-img", "convert", "-O", "qcow2", "--bitmaps", str(src), str(theirs)])
    qimg("convert", "-O", "qcow2", "--bitmaps", str(src), str(ours))
    assert info(ours) == info(theirs)


def test_convert_bitmaps_into_existing_target_keeps_and_dirties_its_bitmaps(
    source, tmp_path, qemu_nbd
):
    """-n: the target's own enabled bitmap records the copy; a name clash fails
    after the bitmaps walked before it (newest first) were added, as in qemu-img."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(theirs), str(SIZE)])
    run(["qemu-img", "bitmap", "--add", str(theirs), "b64k"])
    shutil.copy(theirs, ours)
    args = ["convert", "-n", "-O", "qcow2", "--bitmaps", str(source)]
    q = run(["qemu-img", *args, str(theirs)], check=False)
    r = qimg(*args, str(ours), check=False)
    assert q.returncode != 0 and r.returncode != 0
    assert "Failed to create bitmap b64k: Bitmap already exists: b64k" in q.stderr
    assert "Failed to create bitmap b64k: Bitmap already exists: b64k" in r.stderr
    qemu_check_clean(ours)
    assert info(ours) == info(theirs)
    assert_same_bitmaps(ours, theirs, BITMAPS, tmp_path)


@pytest.mark.parametrize(
    "case",
    ["raw-source", "v2-target", "raw-target", "two-sources", "bigger-target"],
)
def test_convert_bitmaps_refusals_match_qemu_img(source, tmp_path, qemu_img, case):
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    srcs, target_opts = [str(source)], ["-O", "qcow2"]
    if case == "raw-source":
        srcs = [str(raw)]
    elif case == "v2-target":
        target_opts += ["-o", "compat=0.10"]
    elif case == "raw-target":
        target_opts = ["-O", "raw"]
    elif case == "two-sources":
        srcs = [str(source), str(source)]
    outs = []
    for tool, name in (("qemu-img", "theirs"), ("qimg", "ours")):
        target = tmp_path / name
        extra = []
        if case == "bigger-target":
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(2 * SIZE)])
            extra = ["-n"]
        args = ["convert", *extra, *target_opts, "--bitmaps", *srcs, str(target)]
        proc = (
            run(["qemu-img", *args], check=False)
            if tool == "qemu-img"
            else qimg(*args, check=False)
        )
        assert proc.returncode != 0, (tool, proc.stderr)
        outs.append(proc.stderr.splitlines()[0].split(": ", 1)[1])
    assert outs[1] == outs[0]
    if case == "bigger-target":
        assert bitmap_flags(tmp_path / "ours") == bitmap_flags(tmp_path / "theirs") == {}
    else:
        assert not (tmp_path / "ours").exists()  # qimg leaves no partial target


# --- the write hook ------------------------------------------------------------------


def random_ops(seed: int) -> list[tuple[str, int, int]]:
    rng = random.Random(seed)
    ops = []
    for _ in range(12):
        kind = rng.choice(["write", "write", "zero", "discard"])
        offset = rng.randrange(0, SIZE - 1)
        length = rng.choice([1, 511, 4096, 65536, 200000, rng.randrange(1, 300000)])
        ops.append((kind, offset, min(length, SIZE - offset)))
    return ops


def qemu_io_command(kind: str, offset: int, length: int) -> str:
    return {"write": "write -P 7", "zero": "write -z", "discard": "discard"}[kind] + (
        f" {offset} {length}"
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_library_writes_mark_bitmaps_as_qemu_io_does(tmp_path, qemu_io, qemu_nbd, seed):
    from qimg.formats.qcow2.compress import compress_cluster

    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    make_image(theirs)
    run_qemu_io(theirs, "write -P 3 0 64k")  # something for the disabled bitmap to hold
    run(["qemu-img", "bitmap", "--merge", "b64k", str(theirs), "off"])
    run(["qemu-img", "bitmap", "--clear", str(theirs), "b64k"])
    shutil.copy(theirs, ours)
    off_before = dirty_extents(theirs, "off", tmp_path)
    ops = random_ops(seed)
    run_qemu_io(theirs, "write -c -P 5 1M 64k", *(qemu_io_command(*op) for op in ops))

    img = open_image(str(ours), "qcow2", writable=True)
    try:
        packed = compress_cluster(bytes([5]) * 65536, img.header.compression_type)
        img.write_compressed(MiB, packed)
        for kind, offset, length in ops:
            if kind == "write":
                img.write(offset, bytes([7]) * length)
            elif kind == "zero":
                img.write_zeroes(offset, length)
            else:
                img.discard(offset, length)
    finally:
        img.close()
    qemu_check_clean(ours)
    assert info(ours) == info(theirs)  # flags: no in-use left
    assert_same_bitmaps(ours, theirs, BITMAPS, tmp_path)
    assert dirty_extents(ours, "off", tmp_path) == off_before  # disabled: untouched


def test_enabled_bitmaps_are_in_use_only_while_written(tmp_path, qemu_img):
    path = tmp_path / "a.qcow2"
    make_image(path)
    img = open_image(str(path), "qcow2", writable=True)
    try:
        img.read(0, 512)
        assert "in-use" not in bitmap_flags(path)["b64k"]  # nothing written yet
        img.write(0, b"x")
        flags = bitmap_flags(path)
        assert flags["b64k"] == ["in-use", "auto"] and flags["fine"] == ["in-use", "auto"]
        assert flags["off"] == []  # a disabled bitmap records nothing
    finally:
        img.close()
    assert bitmap_flags(path) == {"b64k": ["auto"], "fine": ["auto"], "coarse": ["auto"], "off": []}
    qemu_check_clean(path)


CRASH = """
import os, sys
from qimg.api import open_image
img = open_image(sys.argv[1], "qcow2", writable=True)
img.write(65536, b"y" * 70000)
img.flush()
os._exit(0)  # no close: the bitmaps stay in-use, as after a crash
"""


def test_crash_leaves_bitmaps_inconsistent_and_convert_skips_them(tmp_path, qemu_nbd):
    src = tmp_path / "crashed.qcow2"
    make_image(src)
    run([sys.executable, "-c", CRASH, str(src)])
    qemu_check_clean(src)
    assert bitmap_flags(src) == {
        "b64k": ["in-use", "auto"],
        "fine": ["in-use", "auto"],
        "coarse": ["in-use", "auto"],
        "off": [],
    }
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    args = ["convert", "-O", "qcow2", "--bitmaps", str(src)]
    q = run(["qemu-img", *args, str(theirs)], check=False)
    r = qimg(*args, str(ours), check=False)
    assert q.returncode != 0 and r.returncode != 0
    assert "Cannot copy inconsistent bitmap 'coarse'" in q.stderr
    assert "Cannot copy inconsistent bitmap 'coarse'" in r.stderr
    assert not ours.exists()

    q = run(["qemu-img", *args, "--skip-broken-bitmaps", str(theirs)])
    r = qimg(*args, "--skip-broken-bitmaps", str(ours))
    assert q.stderr.replace("qemu-img: ", "qimg: ") == r.stderr
    for name in ("coarse", "fine", "b64k"):
        assert f"qimg: warning: Skipping inconsistent bitmap '{name}'" in r.stderr
    qemu_check_clean(ours)
    assert info(ours) == info(theirs)
    assert bitmap_flags(ours) == {"off": []}

    # Writing again: in-use bitmaps stay as they are; the image stays clean.
    img = open_image(str(src), "qcow2", writable=True)
    try:
        img.write(0, b"z")
    finally:
        img.close()
    qemu_check_clean(src)
    assert bitmap_flags(src)["b64k"] == ["in-use", "auto"]


def test_set_bits_matches_a_loop_per_bit():
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randrange(1, 64)
        bits = np.zeros(n, dtype=np.uint8)
        expected = np.zeros(n * 8, dtype=bool)
        for _ in range(3):
            a = rng.randrange(0, n * 8)
            b = rng.randrange(a, n * 8 + 1)
            set_bits(bits, a, b)
            expected[a:b] = True
        assert np.array_equal(np.unpackbits(bits, bitorder="little").astype(bool), expected)


def _session(path, faulty_args: dict):
    """Write 100 KiB at 1 MiB and close, through a FaultyStorage; the storage."""
    from qimg.faults import run_until_crash

    faulty, _ = run_until_crash(str(path), lambda img: img.write(MiB, b"w" * 100000), **faulty_args)
    return faulty


@pytest.mark.parametrize("mode", ["kill", "power"])
def test_crash_at_any_point_leaves_bitmaps_in_use_or_right(tmp_path, qemu_nbd, mode):
    """Whatever write a crash stops at: no corruption (leaks at worst), and a
    bitmap not flagged in-use holds either nothing (no data written) or
    exactly the granules written."""
    base = tmp_path / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"])
    run(["qemu-img", "bitmap", "--add", str(base), "b64k"])
    done = tmp_path / "done.qcow2"
    shutil.copy(base, done)
    total = _session(done, {}).op_count
    final = dirty_extents(done, "b64k", tmp_path)
    assert final == [(MiB, 2 * 65536)]
    for crash_at in range(total):
        path = tmp_path / f"crash{crash_at}.qcow2"
        shutil.copy(base, path)
        _session(path, {"crash_at": crash_at, "mode": mode, "seed": crash_at})
        proc = run(["qemu-img", "check", "--output=json", str(path)], check=False)
        assert proc.returncode in (0, 3), (crash_at, proc.stdout, proc.stderr)
        flags = bitmap_flags(path)["b64k"]
        if "in-use" in flags:
            continue
        got = dirty_extents(path, "b64k", tmp_path)
        if got == []:
            proc = run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P 0 {MiB} 100000", str(path)])
            assert "Pattern verification failed" not in proc.stdout, crash_at
        else:
            assert got == final, crash_at
