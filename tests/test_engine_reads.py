"""What qemu-io writes, qimg reads back identically.

Random qemu-io command sequences (write, write -z with and without -u,
compressed write -c, discard; subclusters with extended_l2; zlib and zstd)
build the image; qimg's read of the whole disk must equal what
`qemu-img convert -O raw` reads.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from conftest import qemu_read_raw, run
from hypothesis import given
from hypothesis import strategies as st

from qimg.api import open_image

KiB, MiB = 1 << 10, 1 << 20


def qemu_io_commands(rnd: random.Random, size: int, cs: int, n: int, compress: bool) -> list[str]:
    cmds = []
    for _ in range(n):
        kind = rnd.choice(["write", "write", "zero", "zero_u", "discard"] + ["comp"] * compress)
        if kind == "comp":
            c = rnd.randrange(size // cs)
            cmds.append(f"write -c -P {rnd.randrange(1, 255)} {c * cs} {cs}")
            continue
        # 512-aligned, any length, often unaligned to clusters/subclusters.
        off = rnd.randrange(size // 512) * 512
        length = min(size - off, rnd.randrange(1, 3 * cs // 512 + 8) * 512)
        if kind == "write":
            cmds.append(f"write -P {rnd.randrange(1, 255)} {off} {length}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {length}")
        elif kind == "zero_u":
            cmds.append(f"write -z -u {off} {length}")
        else:
            cmds.append(f"discard {off} {length}")
    return cmds


CASES = [
    pytest.param(4 * KiB, "", id="c4k"),
    pytest.param(64 * KiB, "", id="c64k"),
    pytest.param(64 * KiB, "compat=0.10", id="c64k-v2"),
    pytest.param(64 * KiB, "extended_l2=on", id="c64k-extl2"),
    pytest.param(32 * KiB, "extended_l2=on,compression_type=zstd", id="c32k-extl2-zstd"),
    pytest.param(64 * KiB, "compression_type=zstd", id="c64k-zstd"),
    pytest.param(512, "refcount_bits=1", id="c512-rb1"),
    pytest.param(2 * MiB, "extended_l2=on", id="c2m-extl2"),
]


@pytest.mark.parametrize("cs,opts", CASES)
@pytest.mark.parametrize("backing", [False, True], ids=["", "backing"])
def test_qimg_reads_what_qemu_io_wrote(cs, opts, backing, qemu_img, qemu_io, tmp_path: Path):
    size = max(2 * MiB, 6 * cs)
    path = tmp_path / "disk.qcow2"
    o = f"cluster_size={cs}" + (f",{opts}" if opts else "")
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", o]
    rnd = random.Random(cs + backing)
    if backing:
        base = tmp_path / "base.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size - size // 3)])
        run(["qemu-io", "-c", f"write -P 0x5a 0 {size // 2}", str(base)])
        args += ["-b", str(base), "-F", "qcow2"]
    run(args + [str(path), str(size)])
    # qemu-io refuses compressed writes to 2 MiB zstd clusters (QEMU-NOTES).
    compress = cs < 2 * MiB
    cmds = qemu_io_commands(rnd, size, cs, 30, compress)
    # A compressed write over an allocated cluster fails in QEMU with an I/O
    # error and qemu-io goes on; whatever it did write is the test's input.
    run(
        ["qemu-io", "-f", "qcow2"] + [a for c in cmds for a in ("-c", c)] + [str(path)], check=False
    )
    expected = qemu_read_raw(path, tmp_path, "qcow2")
    with open_image(str(path)) as img:
        assert img.read(0, size) == expected
        # Unaligned reads across runs of different kinds agree too.
        for _ in range(20):
            off = rnd.randrange(size)
            n = rnd.randrange(1, min(size - off, 3 * cs) + 1)
            assert img.read(off, n) == expected[off : off + n]


@pytest.mark.parametrize("opts", ["", "compression_type=zstd"], ids=["zlib", "zstd"])
def test_reads_from_several_threads_at_once_match_qemu(opts, qemu_img, qemu_io, tmp_path: Path):
    """convert reads one image from several threads: with a tiny L2 cache
    (tables loaded and evicted all the time) every read still returns what
    qemu-img reads."""
    import threading

    cs, size = 512, 4 * MiB  # 64 entries per L2 table: 128 tables
    path = tmp_path / "disk.qcow2"
    o = f"cluster_size={cs}" + (f",{opts}" if opts else "")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", o, str(path), str(size)])
    rnd = random.Random(7)
    cmds = qemu_io_commands(rnd, size, cs, 60, compress=True)
    cmds += [f"write -c -P {i % 200 + 1} {i * 64 * KiB} {cs}" for i in range(size // (64 * KiB))]
    run(
        ["qemu-io", "-f", "qcow2"] + [a for c in cmds for a in ("-c", c)] + [str(path)], check=False
    )
    expected = qemu_read_raw(path, tmp_path, "qcow2")
    failures: list[str] = []

    def reader(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(150):
            off = r.randrange(size)
            n = r.randrange(1, min(size - off, 96 * KiB) + 1)
            try:
                if img.read(off, n) != expected[off : off + n]:
                    failures.append(f"read({off}, {n}) returned other bytes")
            except Exception as exc:  # noqa: BLE001 - a thread's failure is the test's
                failures.append(f"read({off}, {n}) raised {exc!r}")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave between any two bytecodes
    try:
        with open_image(str(path)) as img:
            img.clusters.l2_cache.capacity = 2
            threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []


@given(
    st.lists(st.integers(0, 64), min_size=0, max_size=12),
    st.integers(0, 300),
    st.integers(1, 300),
)
def test_data_extent_splits_into_host_data_and_holes(cuts, host, length):
    """_split_by_runs tiles the extent; a byte is data iff a run covers it."""
    from qimg.driver import DATA, Extent
    from qimg.formats.qcow2.image import _split_by_runs

    edges = sorted(set(c * 5 for c in cuts))
    runs = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if a < b]
    pieces = _split_by_runs(Extent(DATA, 1000, length, host), runs)
    pos = 1000
    for offset, n, is_data, is_zero in pieces:
        assert offset == pos and n > 0 and is_data != is_zero
        for byte in (offset, offset + n - 1):
            h = host + byte - 1000
            assert is_data == any(a <= h < b for a, b in runs)
        pos += n
    assert pos == 1000 + length
