"""Zero detection: which parts of a disk read as zeros, as runs.

Two levels, both returning runs of kinds DATA / ZERO:
- over an extent list (what an image's mapping says, nothing read):
  `allocation_runs`;
- over a buffer read from guest `offset`, cut into blocks on multiples of
  `block` in the guest: `zero_blocks` (which blocks read as zeros),
  `differing_blocks` (which differ from another buffer, e.g. a backing
  file's), `state_runs` (blocks of one state merged), and `zero_runs`, the
  three together for a caller that only wants the runs (compare, rebase).

Block tests stop at a block's first non-zero word as QEMU's buffer_is_zero
does, without a Python loop per block.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np

# Run kinds.
DATA = 0  # read the source and write what it holds
ZERO = 1  # reads as zeros
SKIP = 2  # left to the target's backing file (same data there)


def allocation_runs(extents: Iterable[tuple[int, int, bool, bool]]) -> list[list[int]]:
    """(offset, length, is_data, is_zero) extents (Driver.allocated_extents)
    as merged [start, end, DATA or ZERO] runs."""
    return merge_runs((s, n, DATA if is_data else ZERO) for s, n, is_data, _z in extents)


def merge_runs(runs: Iterable[tuple[int, int, int]]) -> list[list[int]]:
    """Adjacent (offset, length, kind) runs of one kind merged: [[start, end, kind]]."""
    out: list[list[int]] = []
    for s, n, kind in runs:
        if n <= 0:
            continue
        if out and out[-1][2] == kind and out[-1][1] == s:
            out[-1][1] = s + n
        else:
            out.append([s, s + n, kind])
    return out


class Blocks(NamedTuple):
    """A buffer at guest `offset` cut on multiples of `size` in the guest:
    a part-block `head` before the first boundary, `full` whole blocks, a
    part-block `tail` after the last one. Block i is bytes
    bound(i):bound(i+1) of the buffer."""

    size: int
    head: int
    full: int
    tail: int

    @classmethod
    def cut(cls, offset: int, length: int, size: int) -> Blocks:
        head = min(length, (-offset) % size)
        full = (length - head) // size
        return cls(size, head, full, length - head - full * size)

    @property
    def count(self) -> int:
        return (1 if self.head else 0) + self.full + (1 if self.tail else 0)

    @property
    def first_full(self) -> int:
        """Index of the first whole block."""
        return 1 if self.head else 0

    def bound(self, i: int) -> int:
        """Where block i starts in the buffer (i == count: the buffer's length)."""
        if i <= 0:
            return 0
        end = self.head + self.full * self.size + self.tail
        return min(end, self.head + (i - self.first_full) * self.size)

    @property
    def bounds(self) -> list[int]:
        """Where each block starts, and the buffer's length last."""
        return [self.bound(i) for i in range(self.count + 1)]

    def parts(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The buffer's bytes (uint8) as (the head, the whole blocks as rows
        of 64-bit words, the tail)."""
        end = self.head + self.full * self.size
        rows = words[self.head : end].view("<u8").reshape(self.full, self.size // 8)
        return words[: self.head], rows, words[end:]


def surely_data(words: np.ndarray, offset: int, size: int) -> bool:
    """Whether every block of a buffer (uint8) read from guest `offset`
    has a non-zero first or last word: then no block reads as zeros
    (zero_blocks finds none), known from one read of each block's ends.
    False where that does not settle it (a block's ends are zero, or the
    buffer does not start and end on block boundaries)."""
    n = len(words)
    if offset % size or n % size or not n:
        return False
    rows = words.view("<u8").reshape(n // size, size // 8)
    return bool((rows[:, 0] | rows[:, -1]).all())


def zero_blocks(words: np.ndarray, blocks: Blocks, min_zero: int = 0) -> np.ndarray:
    """Which blocks of the buffer (uint8) read as zeros. Zero blocks after
    data that together hold fewer than `min_zero` bytes count as data
    (qemu-img's is_allocated_sectors_min)."""
    import numpy as np

    zero = np.zeros(blocks.count, dtype=bool)
    head, rows, tail = blocks.parts(words)
    if blocks.full:
        # A block whose first or last word is non-zero is data (one cache
        # line read per block); only the others are scanned in full.
        cand = np.flatnonzero((rows[:, 0] | rows[:, -1]) == 0)
        if len(cand):
            zero[blocks.first_full + cand] = rows[cand].max(axis=1) == 0
    if blocks.head:
        zero[0] = not head.any()
    if blocks.tail:
        zero[-1] = not tail.any()
    if min_zero > blocks.size:
        _absorb_short_gaps(zero, blocks, min_zero)
    return zero


def _absorb_short_gaps(zero: np.ndarray, blocks: Blocks, min_zero: int) -> None:
    """Runs of zero blocks that follow data and hold fewer than `min_zero`
    bytes become data (zero[i] covers block i)."""
    import numpy as np

    edges = np.diff(np.concatenate(([0], zero.astype(np.int8), [0])))
    for a, b in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()):
        if a > 0 and blocks.bound(b) - blocks.bound(a) < min_zero:
            zero[a:b] = False


def differing_blocks(mine: np.ndarray, theirs: np.ndarray, blocks: Blocks) -> np.ndarray:
    """Which blocks differ between two buffers (uint8) of the same length."""
    import numpy as np

    a, b = blocks.parts(mine), blocks.parts(theirs)
    out = np.empty(blocks.count, dtype=bool)
    first = blocks.first_full
    if blocks.full:
        out[first : first + blocks.full] = (a[1] != b[1]).any(axis=1)
    if blocks.head:
        out[0] = bool((a[0] != b[0]).any())
    if blocks.tail:
        out[-1] = bool((a[2] != b[2]).any())
    return out


def state_runs(blocks: Blocks, state: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, end, state) of each run of blocks in one state (an integer
    per block), in buffer bytes."""
    import numpy as np

    edges = (np.flatnonzero(state[1:] != state[:-1]) + 1).tolist()
    bound = blocks.bound
    starts = [0, *edges]
    stops = [*edges, blocks.count]
    return [(bound(a), bound(b), int(state[a])) for a, b in zip(starts, stops)]


def zero_runs(buf, offset: int, block: int, min_zero: int = 0) -> list[tuple[int, int, int]]:
    """(guest offset, length, DATA or ZERO) runs of a buffer read from
    guest `offset`, judged `block` bytes at a time (see zero_blocks)."""
    import numpy as np

    words = np.frombuffer(buf, dtype=np.uint8)
    if not len(words):
        return []
    blocks = Blocks.cut(offset, len(words), block)
    zero = zero_blocks(words, blocks, min_zero)
    return [
        (offset + lo, hi - lo, ZERO if st else DATA)
        for lo, hi, st in state_runs(blocks, zero.astype(np.int8))
    ]
