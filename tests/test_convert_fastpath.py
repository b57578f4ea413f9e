"""convert's fast paths: data runs written together (Writer batches them
into one Driver.write_runs), judged against qemu-img: the target reads
back as the source (`qemu-img compare`), is clean (`qemu-img check`) and
maps as qemu-img's own convert of the same source (`qemu-img map`)."""

from __future__ import annotations

import os

import pytest

import qimg.convert.writer as writer
from qimg.convert import convert
from tests.conftest import qemu_check_clean, qemu_json, qimg, run

KiB = 1 << 10
MiB = 1 << 20


def _scattered_raw(path, size: int = 24 * MiB) -> None:
    """Data runs of many lengths (whole clusters, part clusters, one byte),
    holes between them, and zero blocks inside data."""
    with open(path, "wb") as f:
        f.truncate(size)
        pos, n = 0, 0
        while pos < size - 2 * MiB:
            length = [64 * KiB, 1 * MiB, 200 * KiB + 512, 1, 3 * MiB // 2, 4 * KiB][n % 6]
            data = bytearray(os.urandom(length))
            if length >= 256 * KiB:
                data[64 * KiB : 192 * KiB] = bytes(128 * KiB)  # zeros inside data
            os.pwrite(f.fileno(), bytes(data), pos)
            pos += length + [0, 64 * KiB, 4 * KiB, 300 * KiB][n % 4]
            n += 1


def _map(path, fmt="qcow2") -> list[tuple]:
    """qemu-img map's ranges, host offsets left out (where clusters land
    is the allocator's business)."""
    return [
        (e["start"], e["length"], e["data"], e["zero"])
        for e in qemu_json("map", "-f", fmt, "--output=json", str(path))
    ]


def _same_as_qemu(tmp_path, args: list[str], src, fmt="qcow2") -> None:
    ours, theirs = tmp_path / f"ours.{fmt}", tmp_path / f"theirs.{fmt}"
    qimg("convert", *args, str(src), str(ours))
    run(["qemu-img", "convert", *args, str(src), str(theirs)])
    run(["qemu-img", "compare", str(src), str(ours)])
    if fmt == "qcow2":
        qemu_check_clean(ours)
    assert _map(ours, fmt) == _map(theirs, fmt)


@pytest.mark.parametrize("cluster", ["65536", "4096", "2097152"])
def test_scattered_data_into_a_new_qcow2_reads_back_and_maps_as_qemu_img(
    qemu_img, tmp_path, cluster
):
    src = tmp_path / "src.raw"
    _scattered_raw(src)
    _same_as_qemu(tmp_path, ["-O", "qcow2", "-o", f"cluster_size={cluster}"], src)


def test_odd_sized_source_into_qcow2_ends_with_a_part_cluster(qemu_img, tmp_path):
    src = tmp_path / "src.raw"
    _scattered_raw(src, 5 * MiB)
    with open(src, "r+b") as f:
        f.truncate(5 * MiB + 3 * 512)
        os.pwrite(f.fileno(), os.urandom(3 * 512), 5 * MiB)
    _same_as_qemu(tmp_path, ["-O", "qcow2"], src)


def test_qcow2_to_qcow2_with_small_batches_reads_back(qemu_img, tmp_path, monkeypatch):
    """Batches of two runs: every batch boundary falls somewhere."""
    raw, src = tmp_path / "src.raw", tmp_path / "src.qcow2"
    _scattered_raw(raw)
    run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(src)])
    monkeypatch.setattr(writer, "WRITE_RUNS", 2)
    monkeypatch.setattr(writer, "WRITE_BYTES", 128 * KiB)
    out = tmp_path / "out.qcow2"
    convert([str(src)], str(out), target_format="qcow2")
    run(["qemu-img", "compare", str(src), str(out)])
    qemu_check_clean(out)
    theirs = tmp_path / "theirs.qcow2"
    run(["qemu-img", "convert", "-O", "qcow2", str(src), str(theirs)])
    assert _map(out) == _map(theirs)


def test_into_an_existing_target_writes_its_zeros_in_order(qemu_img, tmp_path):
    """-n into a qcow2 target that holds data everywhere: the source's
    holes are written as zeroes between the data runs, and the runs land
    on clusters already allocated (no batch placement there)."""
    src = tmp_path / "src.raw"
    _scattered_raw(src, 8 * MiB)
    out = tmp_path / "out.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(out), str(8 * MiB)])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {6 * MiB}", str(out)])
    qimg("convert", "-n", "-O", "qcow2", str(src), str(out))
    run(["qemu-img", "compare", str(src), str(out)])
    qemu_check_clean(out)


def test_with_a_backing_file_only_what_differs_is_written(qemu_img, tmp_path):
    """-B: zero runs that differ from the backing file are written between
    the kept data runs."""
    src = tmp_path / "src.raw"
    _scattered_raw(src, 8 * MiB)
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.write(b"\x11" * (8 * MiB))
    out, theirs = tmp_path / "out.qcow2", tmp_path / "theirs.qcow2"
    args = ["-O", "qcow2", "-B", str(base), "-F", "raw"]
    qimg("convert", *args, str(src), str(out))
    run(["qemu-img", "convert", *args, str(src), str(theirs)])
    run(["qemu-img", "compare", str(src), str(out)])
    qemu_check_clean(out)
    assert _map(out) == _map(theirs)


def test_progress_is_reported_as_qemu_img_reports_it(qemu_img, tmp_path):
    src = tmp_path / "src.raw"
    _scattered_raw(src, 8 * MiB)
    ours = qimg("convert", "-p", "-O", "qcow2", str(src), str(tmp_path / "a.qcow2"))
    theirs = run(["qemu-img", "convert", "-p", "-O", "qcow2", str(src), str(tmp_path / "b.q")])
    assert ours.stdout == theirs.stdout


def test_data_runs_of_a_sparse_source_reach_the_qcow2_target_together(
    qemu_img, tmp_path, monkeypatch
):
    """The holes between data runs (nothing to write into a new target)
    do not cut a batch: runs of several chunks reach write_runs at once."""
    from qimg.formats.qcow2.image import Qcow2Image

    calls: list[int] = []
    original = Qcow2Image.write_runs

    def spy(self, runs):
        calls.append(len(runs))
        original(self, runs)

    monkeypatch.setattr(Qcow2Image, "write_runs", spy)
    src = tmp_path / "src.raw"
    _scattered_raw(src)
    out = tmp_path / "out.qcow2"
    convert([str(src)], str(out), target_format="qcow2")
    assert max(calls) > 1
    run(["qemu-img", "compare", str(src), str(out)])
    qemu_check_clean(out)


@pytest.mark.parametrize("seed", range(6))
def test_surely_data_never_claims_a_buffer_with_a_zero_block(seed):
    """The zero scan's shortcut: where it says "all data", zero_blocks
    finds no zero block; it says so for a buffer of data blocks."""
    import numpy as np

    from qimg.convert.scan import Blocks, surely_data, zero_blocks

    rng = np.random.default_rng(seed)
    block = [512, 4096, 65536][seed % 3]
    buf = rng.integers(1, 256, size=16 * block, dtype=np.uint8)
    assert surely_data(buf, 0, block)
    for _ in range(20):
        words = buf.copy()
        i = int(rng.integers(0, 16))
        how = int(rng.integers(0, 3))
        if how == 0:
            words[i * block : (i + 1) * block] = 0  # a zero block
        elif how == 1:
            words[i * block : i * block + 8] = 0  # a block's first word
            words[(i + 1) * block - 8 : (i + 1) * block] = 0  # and last
        else:
            words[i * block + 8 : (i + 1) * block - 8] = 0  # all but its ends
        offset = int(rng.integers(0, 4)) * block
        zero = zero_blocks(words, Blocks.cut(offset, len(words), block))
        if surely_data(words, offset, block):
            assert not zero.any()
        else:
            assert how != 2
    assert not surely_data(buf[: 16 * block - 8], 0, block)  # not whole blocks
    assert not surely_data(buf, 512 if block > 512 else 256, block)  # off a boundary
