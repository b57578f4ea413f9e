"""qimg.convert.scan: zero detection as runs, judged against a byte-by-byte
model (a block is zero when every byte in it is zero)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from qimg.convert.scan import (
    DATA,
    ZERO,
    Blocks,
    allocation_runs,
    differing_blocks,
    zero_blocks,
    zero_runs,
)


def model_blocks(offset: int, length: int, block: int) -> list[tuple[int, int]]:
    """(start, end) in buffer bytes of each block cut on multiples of `block`
    in the guest."""
    out = []
    pos = 0
    while pos < length:
        end = min(length, pos + block - (offset + pos) % block)
        out.append((pos, end))
        pos = end
    return out


def model_zero_runs(buf: bytes, offset: int, block: int) -> list[tuple[int, int, int]]:
    runs: list[list[int]] = []
    for lo, hi in model_blocks(offset, len(buf), block):
        kind = ZERO if not any(buf[lo:hi]) else DATA
        if runs and runs[-1][2] == kind:
            runs[-1][1] += hi - lo
        else:
            runs.append([offset + lo, hi - lo, kind])
    return [tuple(r) for r in runs]


def patterned(rng: random.Random, nblocks: int, block: int) -> bytearray:
    """Blocks that are zeros, data, or zeros but for one byte at the start,
    the end or the middle (the cases a first/last-word test could miss)."""
    buf = bytearray(nblocks * block)
    for i in range(nblocks):
        base = i * block
        kind = rng.choice(["zero", "data", "first", "last", "middle"])
        if kind == "data":
            buf[base : base + block] = rng.randbytes(block)
        elif kind != "zero":
            at = {"first": 0, "last": block - 1, "middle": block // 2 + 3}[kind]
            buf[base + at] = rng.randrange(1, 256)
    return buf


@pytest.mark.parametrize("seed", range(6))
def test_zero_runs_match_a_byte_by_byte_model_at_any_offset_and_length(seed):
    rng = random.Random(seed)
    block = rng.choice([512, 4096, 65536])
    buf = patterned(rng, 40, block)
    offset = rng.randrange(0, 3 * block)
    start = rng.randrange(0, block)
    end = len(buf) - rng.randrange(0, block)
    piece = bytes(buf[start:end])
    assert zero_runs(piece, offset, block) == model_zero_runs(piece, offset, block)


def test_zero_runs_of_a_buffer_shorter_than_one_block():
    assert zero_runs(bytes(100), 1000, 4096) == [(1000, 100, ZERO)]
    assert zero_runs(b"\0" * 50 + b"x" + b"\0" * 49, 7, 4096) == [(7, 100, DATA)]
    assert zero_runs(b"", 0, 512) == []


def test_short_zero_gaps_after_data_count_as_data():
    """min_zero: a zero gap after data holding fewer bytes is data (qemu-img's
    is_allocated_sectors_min); a gap at the start of the buffer stays zero."""
    block = 512
    layout = "z" + "d" + "zz" + "d" + "zzzzzzzz" + "d"
    buf = b"".join(bytes(block) if c == "z" else b"\1" * block for c in layout)
    runs = zero_runs(buf, 0, block, min_zero=4 * block)
    assert runs == [
        (0, block, ZERO),
        (block, 4 * block, DATA),  # data, the two-block gap, data
        (5 * block, 8 * block, ZERO),
        (13 * block, block, DATA),
    ]


def test_blocks_cut_on_guest_multiples_of_the_block_size():
    blocks = Blocks.cut(offset=1000, length=10000, size=4096)
    assert (blocks.head, blocks.full, blocks.tail) == (3096, 1, 10000 - 3096 - 4096)
    assert blocks.bounds == [0, 3096, 3096 + 4096, 10000]
    aligned = Blocks.cut(offset=8192, length=8192, size=4096)
    assert (aligned.head, aligned.full, aligned.tail, aligned.count) == (0, 2, 0, 2)


def test_zero_blocks_and_differing_blocks_agree_with_the_model():
    rng = random.Random(7)
    block = 4096
    mine = patterned(rng, 16, block)[100:-300]
    theirs = bytearray(mine)
    changed = {2, 5, 15}
    blocks = Blocks.cut(12345, len(mine), block)
    for i in changed:
        lo, hi = blocks.bounds[i], blocks.bounds[i + 1]
        theirs[rng.randrange(lo, hi)] ^= 0xFF
    a = np.frombuffer(bytes(mine), dtype=np.uint8)
    b = np.frombuffer(bytes(theirs), dtype=np.uint8)
    assert set(np.flatnonzero(differing_blocks(a, b, blocks)).tolist()) == changed
    zero = zero_blocks(a, blocks).tolist()
    assert zero == [not any(mine[lo:hi]) for lo, hi in zip(blocks.bounds, blocks.bounds[1:])]


def test_allocation_runs_merge_extents_of_one_kind():
    extents = [
        (0, 4096, True, False),
        (4096, 4096, True, False),
        (8192, 512, False, True),
        (8704, 0, True, False),  # empty: dropped
        (8704, 1024, False, False),  # unallocated: reads as zeros too
        (9728, 512, True, False),
    ]
    assert allocation_runs(extents) == [[0, 8192, DATA], [8192, 9728, ZERO], [9728, 10240, DATA]]
