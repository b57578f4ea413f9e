"""Writes into qemu-made images with internal snapshots never change what a
snapshot reads: data clusters, L2 tables and compressed clusters shared with
a snapshot are copied on write, exactly as QEMU does.

Every snapshot is read by qemu-img (`convert -l snapshot.name=X`) before and
after qimg writes, the active layer must equal a bytearray model, and
`qemu-img check` must stay clean.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import qemu_check_clean, qemu_read_raw, run

from qimg.api import open_image

KiB, MiB = 1 << 10, 1 << 20


def snapshot_raw(path: Path, name: str, tmp: Path) -> bytes:
    out = tmp / f"snap-{name}.raw"
    run(
        [
            "qemu-img",
            "convert",
            "-U",
            "-l",
            f"snapshot.name={name}",
            "-O",
            "raw",
            str(path),
            str(out),
        ]
    )
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_io(path: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    run(args + [str(path)])


def random_ops(rnd: random.Random, size: int, cs: int, n: int):
    for _ in range(n):
        kind = rnd.choice(("write", "write", "write", "zero", "zero_unmap", "discard"))
        if rnd.random() < 0.5:
            offset = rnd.randrange(size // cs) * cs + rnd.choice((0, 0, rnd.randrange(cs)))
        else:
            offset = rnd.randrange(size)
        offset = min(offset, size - 1)
        length = min(size - offset, rnd.randrange(1, 3 * cs + 4 * KiB))
        yield kind, offset, length


def apply_ops(img, model: bytearray, ops, cs: int) -> None:
    for i, (kind, offset, length) in enumerate(ops):
        if kind == "write":
            data = random.Random(offset * 31 + i).randbytes(length)
            img.write(offset, data)
            model[offset : offset + length] = data
        elif kind in ("zero", "zero_unmap"):
            img.write_zeroes(offset, length, unmap=kind == "zero_unmap")
            model[offset : offset + length] = bytes(length)
        else:
            img.discard(offset, length)
            start, end = -(-offset // cs) * cs, (offset + length) // cs * cs
            if offset + length == len(model):
                end = len(model)
            if end > start:
                model[start:end] = bytes(end - start)


def build_image(tmp: Path, cs: int, size: int, opts: str, compressed: bool) -> Path:
    """An image with data, zero clusters, compressed clusters (optionally) and
    two snapshots, all made by qemu-img and qemu-io."""
    path = tmp / "disk.qcow2"
    o = f"cluster_size={cs}" + (f",{opts}" if opts else "")
    if compressed:
        raw = tmp / "seed.raw"
        rnd = random.Random(cs)
        buf = bytearray(size)
        for _ in range(8):
            off = rnd.randrange(size)
            n = min(size - off, rnd.randrange(1, 6 * cs))
            # compressible: short repeated random pattern
            buf[off : off + n] = (rnd.randbytes(64) * (n // 64 + 1))[:n]
        raw.write_bytes(bytes(buf))
        run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", o, str(raw), str(path)])
        raw.unlink()
    else:
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", o, str(path), str(size)])
    qemu_io(path, f"write -P 0x11 {cs // 2} {3 * cs}", f"write -z {5 * cs} {2 * cs}")
    run(["qemu-img", "snapshot", "-c", "s1", str(path)])
    qemu_io(path, f"write -P 0x22 {cs} {4 * cs + 1024}", f"discard {8 * cs} {cs}")
    run(["qemu-img", "snapshot", "-c", "s2", str(path)])
    qemu_io(path, f"write -P 0x33 {2 * cs} {cs}")
    return path


CASES = [
    pytest.param(4 * KiB, "", False, id="c4k"),
    pytest.param(4 * KiB, "", True, id="c4k-compressed"),
    pytest.param(64 * KiB, "", True, id="c64k-compressed"),
    pytest.param(64 * KiB, "compat=0.10", True, id="c64k-v2-compressed"),
    pytest.param(64 * KiB, "extended_l2=on", True, id="c64k-extl2-compressed"),
    pytest.param(64 * KiB, "compression_type=zstd", True, id="c64k-zstd-compressed"),
    pytest.param(512, "refcount_bits=64", True, id="c512-rb64-compressed"),
]


@pytest.mark.parametrize("cs,opts,compressed", CASES)
@pytest.mark.parametrize("seed", [1, 2])
def test_writes_never_change_what_snapshots_read(cs, opts, compressed, seed, qemu_img, tmp_path):
    size = max(2 * MiB, 40 * cs)
    path = build_image(tmp_path, cs, size, opts, compressed)
    before = {name: snapshot_raw(path, name, tmp_path) for name in ("s1", "s2")}
    model = bytearray(qemu_read_raw(path, tmp_path, "qcow2"))
    rnd = random.Random(seed)
    with open_image(str(path), writable=True) as img:
        apply_ops(img, model, random_ops(rnd, size, cs, 25), cs)
    qemu_check_clean(path)
    for name, data in before.items():
        assert snapshot_raw(path, name, tmp_path) == data, f"snapshot {name} changed"
    assert qemu_read_raw(path, tmp_path, "qcow2") == bytes(model)
    with open_image(str(path)) as img:
        assert img.read(0, size) == bytes(model)


def test_overwriting_every_shared_cluster_copies_all_l2_tables(qemu_img, tmp_path):
    """A full overwrite of an image whose every L2 table is shared with a
    snapshot: each table is copied once, the snapshot keeps the old ones."""
    cs = 512
    size = 1 * MiB  # 32 L2 tables of 32 KiB each
    path = build_image(tmp_path, cs, size, "", True)
    before = snapshot_raw(path, "s2", tmp_path)
    data = random.Random(9).randbytes(size)
    with open_image(str(path), writable=True) as img:
        img.write(0, data)
    qemu_check_clean(path)
    assert snapshot_raw(path, "s2", tmp_path) == before
    assert qemu_read_raw(path, tmp_path, "qcow2") == data
