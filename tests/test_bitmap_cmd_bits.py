"""The bits `qimg bitmap` leaves, read through QEMU (qemu-nbd -B and
`qemu-img map` with x-dirty-bitmap, see all_dirty_extents): the
same command lines run by qemu-img and by qimg on copies of an image leave
the same dirty ranges in every bitmap, across granularities (512 B to
2 MiB), cluster sizes (512 B, 64 KiB, 2 MiB) and images; bitmaps qimg adds
record writes through qimg as bitmaps qemu-img adds record the same writes
through qemu-io; `--list` counts what QEMU exports.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time

import pytest
from conftest import qemu_check_clean, qimg, require_tool, run
from infotools import qimg_here

from qimg.api import open_image

MiB = 1 << 20
SIZE = 8 * MiB + 1536  # the last granule of every bitmap is partial
GRANULARITIES = {"g512": "512", "g4k": "4k", "g64k": "64k", "g1m": "1M", "g2m": "2M"}


@pytest.fixture(scope="module")
def qemu_nbd() -> str:
    return require_tool("qemu-nbd")


def all_dirty_extents(path, names: list[str], sock_dir) -> dict[str, list[tuple[int, int]]]:
    """dirty_extents of several bitmaps through one qemu-nbd (-t, a -B for
    each): one server start per image instead of one per bitmap."""
    sock = os.path.join(sock_dir, "nbd-all.sock")
    for attempt in range(20):
        if os.path.exists(sock):
            os.unlink(sock)
        args = ["qemu-nbd", "-r", "-t", "-k", sock, "-f", "qcow2"]
        for name in names:
            args += ["-B", name]
        nbd = subprocess.Popen(
            [*args, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(sock) and nbd.poll() is None:
                assert time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.01)
            assert nbd.poll() is None, nbd.stderr.read().decode()
            out = {}
            for name in names:
                opts = (
                    f"driver=nbd,server.type=unix,server.path={sock},"
                    f"x-dirty-bitmap=qemu:dirty-bitmap:{name}"
                )
                proc = run(["qemu-img", "map", "--output=json", "--image-opts", opts], check=False)
                if proc.returncode:
                    break
                # x-dirty-bitmap reports dirty areas as "data": false.
                extents = json.loads(proc.stdout)
                out[name] = [(e["start"], e["length"]) for e in extents if not e["data"]]
            else:
                return out
        finally:
            nbd.terminate()
            nbd.wait(timeout=10)
        time.sleep(0.05 * (attempt + 1))  # socket bound but not yet listening
    raise AssertionError(f"qemu-img map of {path}: {proc.stderr}")


def info_bitmaps(path) -> list:
    out = run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout
    return json.loads(out)["format-specific"]["data"].get("bitmaps", [])


def random_writes(seed: int, size: int = SIZE, n: int = 12) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        offset = rng.randrange(0, size - 1) // 512 * 512
        length = min(size - offset, rng.choice([512, 1536, 4096, 65536, 300000, MiB + 512]))
        out.append(f"write -P {rng.randrange(1, 255)} {offset} {length}")
    return out


def qemu_io(path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    run(args + [str(path)])


def make_image(path, cluster_size: int, seed: int) -> None:
    """An image with one enabled bitmap per granularity, written at random
    places (so every bitmap is dirty), then a disabled one merged from them."""
    opts = ["-o", f"cluster_size={cluster_size}"]
    run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), str(SIZE)])
    for name, g in GRANULARITIES.items():
        run(["qemu-img", "bitmap", "--add", "-g", g, str(path), name])
    run(["qemu-img", "bitmap", "--add", str(path), "gdefault"])
    qemu_io(path, *random_writes(seed))
    run(["qemu-img", "bitmap", "--add", "--disable", "--merge", "g4k", str(path), "frozen"])


# Command lines run in order on the image (OTHER: a second image whose
# bitmaps were dirtied by other writes).
SCRIPT = [
    ["--merge", "g512", "IMG", "g2m"],  # finer into coarser
    ["--merge", "g1m", "IMG", "g512"],  # coarser into finer
    ["--add", "-g", "8k", "--merge", "g64k", "--merge", "g4k", "IMG", "new8k"],
    ["--clear", "--merge", "g2m", "IMG", "g64k"],
    ["--merge", "g4k", "-b", "OTHER", "IMG", "frozen"],
    ["--merge", "g512", "-b", "OTHER", "-F", "qcow2", "IMG", "g1m"],
    ["--clear", "IMG", "g4k"],
    ["--disable", "IMG", "gdefault"],
    ["--remove", "--add", "-g", "512", "--merge", "g1m", "IMG", "g2m"],
    ["--enable", "IMG", "frozen"],
]


def names(path) -> list[str]:
    return [b["name"] for b in info_bitmaps(path)]


@pytest.mark.parametrize("cluster_size", [512, 2 * MiB])
def test_edits_leave_the_bits_qemu_img_leaves(tmp_path, qemu_nbd, cluster_size):
    base, other = tmp_path / "base.qcow2", tmp_path / "other.qcow2"
    make_image(base, cluster_size, seed=cluster_size)
    make_image(other, 65536, seed=7)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(base, ours)
    shutil.copy(base, theirs)
    for line in SCRIPT:
        for path, tool in ((theirs, "qemu"), (ours, "qimg")):
            args = [str(path) if a == "IMG" else str(other) if a == "OTHER" else a for a in line]
            if tool == "qemu":
                run(["qemu-img", "bitmap", *args])
            else:
                got = qimg_here(tmp_path, "bitmap", *args)
                assert got.returncode == 0, got.stderr
    qemu_check_clean(ours)
    assert info_bitmaps(ours) == info_bitmaps(theirs)
    # qimg info shows them with qemu-img's keys and values
    mine = json.loads(qimg("info", "--output=json", ours).stdout)
    assert mine["format-specific"]["data"]["bitmaps"] == info_bitmaps(ours)
    every = names(theirs)
    assert all_dirty_extents(ours, every, tmp_path) == all_dirty_extents(theirs, every, tmp_path)


@pytest.mark.parametrize("cluster_size", [512, 2 * MiB])
def test_bitmaps_qimg_adds_record_writes_as_qemu_records_them(tmp_path, qemu_nbd, cluster_size):
    """qimg adds bitmaps and writes through its library; qemu-img adds the
    same bitmaps to a copy and qemu-io makes the same writes."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    opts = ["-o", f"cluster_size={cluster_size}"]
    run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(theirs), str(SIZE)])
    shutil.copy(theirs, ours)
    for name, g in GRANULARITIES.items():
        run(["qemu-img", "bitmap", "--add", "-g", g, str(theirs), name])
        assert qimg_here(tmp_path, "bitmap", "--add", "-g", g, str(ours), name).returncode == 0
    qemu_check_clean(ours)
    assert info_bitmaps(ours) == info_bitmaps(theirs)
    writes = random_writes(cluster_size)
    qemu_io(theirs, *writes)
    with open_image(str(ours), "qcow2", writable=True) as img:
        for w in writes:
            _, _, pattern, offset, length = w.split()
            img.write(int(offset), bytes([int(pattern)]) * int(length))
    qemu_check_clean(ours)
    every = list(GRANULARITIES)
    assert all_dirty_extents(ours, every, tmp_path) == all_dirty_extents(theirs, every, tmp_path)


def test_bitmaps_qemu_img_made_survive_qimg_edits_of_others(tmp_path, qemu_nbd):
    path = tmp_path / "a.qcow2"
    make_image(path, 65536, seed=3)
    before = all_dirty_extents(path, names(path), tmp_path)
    qimg("bitmap", "--add", path, "mine")
    qimg("bitmap", "--merge", "g4k", path, "mine")
    qimg("bitmap", "--remove", path, "g2m")
    qemu_check_clean(path)
    del before["g2m"]
    assert "g2m" not in names(path)
    after = all_dirty_extents(path, list(before), tmp_path)
    assert after == before


def test_list_counts_the_dirty_bytes_qemu_exports(tmp_path, qemu_nbd):
    """Dirty granules times the granularity: on an image whose size is a
    multiple of every granularity, the total length QEMU exports as dirty."""
    path = tmp_path / "a.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(8 * MiB)])
    for name, g in GRANULARITIES.items():
        run(["qemu-img", "bitmap", "--add", "-g", g, str(path), name])
    qemu_io(path, *random_writes(5, 8 * MiB))
    rows = json.loads(qimg("bitmap", "--list", "--output=json", path).stdout)
    assert [r["name"] for r in rows] == list(GRANULARITIES)
    assert [(r["granularity"], r["flags"]) for r in rows] == [
        (b["granularity"], b["flags"]) for b in info_bitmaps(path)
    ]
    extents = all_dirty_extents(path, [r["name"] for r in rows], tmp_path)
    for r in rows:
        assert r["count"] == sum(n for _s, n in extents[r["name"]])
    human = qimg("bitmap", "--list", path).stdout.splitlines()
    assert human[0].split() == ["NAME", "GRANULARITY", "FLAGS", "DIRTY"]
    assert [line.split()[0] for line in human[1:]] == list(GRANULARITIES)
