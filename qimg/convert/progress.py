"""Progress as qemu-img convert counts it, so that the percentages printed
are qemu-img's: bytes of data to copy, counted a copy request at a time,
each request as it starts."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from qimg.convert.plan import Plan
from qimg.convert.scan import DATA, ZERO
from qimg.convert.source import block_status
from qimg.driver import Driver

ProgressCallback = Callable[[int, int], None]

# qemu-img convert's progress steps: a block-status request covers at most
# BDRV_REQUEST_MAX_SECTORS, and each copy request at most IO_BUF_SIZE.
QEMU_REQUEST_MAX = (2**31 - 1) // 512 * 512
QEMU_IO_BUF = 2 << 20


class Progress:
    """Reports `callback(done, total)` as the copy passes the start of each
    of qemu-img's counted copy requests (see request_marks)."""

    def __init__(self, plan: Plan, callback: ProgressCallback):
        self.callback = callback
        self.marks, self.total = request_marks(plan)

    def reached(self, pos: int) -> None:
        """The copy has reached guest offset `pos`: report each request
        that starts before it (qemu-img counts a request as it starts it)."""
        marks = self.marks
        while marks and marks[0][0] < pos:
            self.callback(marks.popleft()[1], self.total)


def request_marks(plan: Plan) -> tuple[deque[tuple[int, int]], int]:
    """(start, bytes counted once the request is started) of each of
    qemu-img convert's counted copy requests, and their total.

    As qemu-img's convert_iteration_sectors steps through the sources:
    block status is asked from where it is, up to QEMU_REQUEST_MAX; an
    extent that ends off the source's alignment (its cluster) gives up
    its tail, asked for again. A request is at most QEMU_IO_BUF of data
    (one target cluster with -c, where a shorter extent is read as a
    whole cluster of data). Data requests (and zero ones with -S 0; not
    what the target's backing file provides with -B) are counted."""
    marks: deque[tuple[int, int]] = deque()
    done = 0
    cs = plan.cluster_size
    io_buf = cs if plan.compress else QEMU_IO_BUF
    extents = _status_source(plan)
    pos = next_status = 0
    kind = ZERO
    while pos < plan.total:
        if next_status <= pos:
            kind, next_status = extents.status(pos)
        n = next_status - pos
        if _counted(kind, plan):
            n = min(n, io_buf)
        if plan.compress:
            if n < cs:
                n, kind = min(cs, plan.total - pos), DATA
            else:
                n = n // cs * cs
        if _counted(kind, plan):
            done += n
            marks.append((pos, done))
        pos += n
    return marks, done


def _counted(kind: int, plan: Plan) -> bool:
    """Whether qemu-img counts a request of this kind."""
    return kind == DATA or (kind == ZERO and not plan.sparse)


def _status_source(plan: Plan) -> StatusSource:
    """qemu-img's block status answers over the sources."""
    src = plan.src
    parts = []
    for start, end, d in src.spans():
        if plan.backing is not None or plan.skip_same_backing:
            runs = src.top_extents(start, end - start)
        else:
            runs = (
                (s, n, DATA if is_data else ZERO)
                for s, n, is_data, _z in block_status(src, start, end - start, plan.salvage)
            )
        parts.append((start, end, _alignment(d), in_sectors(runs)))
    return StatusSource(parts)


def _alignment(d: Driver) -> int:
    """The unit of a source's block status answers: a qcow2 image's
    cluster, 512 bytes elsewhere."""
    return d.cluster_bytes


def in_sectors(runs: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(offset, length, kind) extents as qemu-img counts them, in whole
    sectors (a partial sector at the end of a file belongs to the extent
    before it). Not merged: each extent is one block-status answer."""
    out: list[tuple[int, int, int]] = []
    for s, n, kind in runs:
        e = -(-(s + n) // 512) * 512
        s = max(s, out[-1][1]) if out else s
        if e > s:
            out.append((s, e, kind))
    return out


class StatusSource:
    """Block status as qemu-img asks for it (bdrv_block_status from a
    guest offset), from each source's extents: (start, end, alignment,
    [(start, end, kind)])."""

    def __init__(self, parts: list[tuple[int, int, int, list[tuple[int, int, int]]]]):
        self.parts = parts
        self.part = 0
        self.run = 0

    def status(self, pos: int) -> tuple[int, int]:
        """(kind, end) of the extent at `pos`, as qemu-img takes it: at most
        QEMU_REQUEST_MAX long, its unaligned tail cut off when the rest is
        longer (asked for again)."""
        while self.parts[self.part][1] <= pos:
            self.part, self.run = self.part + 1, 0
        start, end, align, runs = self.parts[self.part]
        while self.run < len(runs) and runs[self.run][1] <= pos:
            self.run += 1
        _s, e, kind = runs[self.run] if self.run < len(runs) else (pos, end, ZERO)
        n = min(e - pos, QEMU_REQUEST_MAX)
        tail = (pos - start + n) % align
        if n > tail:
            n -= tail
        return kind, pos + n
