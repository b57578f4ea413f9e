"""Target-side writes, in guest order: data runs with one `write()` each
(the qcow2 driver allocates contiguous host runs per L2 table), zero runs
as zeroes unless the target already reads zeros there, and with -c whole
clusters compressed by a thread pool, each run of compressed clusters with
one `write_compressed_many`.

Holes are never written to a fresh target (a new raw or qcow2 image without
a backing file reads zeros); an existing target (-n) gets its zero runs
written as zeroes unless it is known to be zero (--target-is-zero).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from qimg.convert.options import ConvertOptions
from qimg.convert.pipeline import Piece
from qimg.convert.plan import Plan
from qimg.convert.sharing import SharedWrites
from qimg.driver import Driver
from qimg.errors import ImageIOError, QimgError

COMPRESS_BATCH = 1 << 20  # guest bytes per compression task (-c)
# Data runs written together at most (Driver.write_runs: a qcow2 target
# allocates their clusters once and updates its L2 table once), their
# bytes, and the read buffers holding them: those stay out of the read
# pool until then (pipeline.READ_BUFFERS counts them).
WRITE_RUNS = 64
WRITE_BYTES = 4 << 20
WRITE_PIECES = 4


class RateLimit:
    """-r: guest data is written at `rate` bytes a second at most, measured
    from the first write; the writes may run ahead of that by one SLICE (as
    QEMU's ratelimit slices). A rate of 0 sets no limit."""

    SLICE = 0.1

    def __init__(self, rate: int):
        self.rate = rate
        self.start: float | None = None
        self.done = 0

    def account(self, length: int) -> None:
        """Count `length` bytes just written; wait while the writes are
        more than a SLICE ahead of the rate."""
        if not self.rate:
            return
        now = time.monotonic()
        if self.start is None:
            self.start = now
        self.done += length
        ahead = self.done / self.rate - (now - self.start) - self.SLICE
        if ahead > 0:
            time.sleep(ahead)


class Writer:
    """Writes pieces (pipeline.py) into `tgt` in order. `release(piece)` is
    called once the piece's data is written; `reached(pos)` once the copy
    has reached guest offset `pos`."""

    def __init__(
        self,
        tgt: Driver,
        plan: Plan,
        o: ConvertOptions,
        release: Callable[[Piece], None],
        reached: Callable[[int], None],
    ):
        self.tgt = tgt
        self.plan = plan
        self.release = release
        self.reached = reached
        # qemu-img: BDRV_REQ_MAY_UNMAP unless the target has a backing file.
        self.unmap = plan.backing is None
        self.limit = RateLimit(o.rate_limit)
        self.workers = min(o.coroutines, os.cpu_count() or 1)
        self.compression_level = o.compression_level
        self.shared = SharedWrites(plan.src, tgt, plan.grain) if plan.share else None
        # Data runs kept for one write_runs, where the target places runs
        # together and no rate limit asks for each write's time: (offset,
        # data) in guest order, the pieces holding them, their bytes, and
        # the guest offset the copy reaches once they are written.
        self.batching = type(tgt).write_runs is not Driver.write_runs and not o.rate_limit
        self._runs: list[tuple[int, object]] = []
        self._held: list[Piece] = []
        self._buffers = 0  # of the held pieces, those holding a read buffer
        self._run_bytes = 0
        self._run_end = 0

    def write_all(self, pieces: Iterable[Piece]) -> None:
        if self.plan.compress:
            self._write_compressed(pieces)
            return
        for piece in pieces:
            if self.shared is None and self.batching and self._keep(piece):
                continue
            self._flush_runs()
            for offset, length, data in piece.items:
                self._write(offset, length, data, piece.source)
            self.release(piece)
        self._flush_runs()
        self._flush_shared(self.plan.total)

    def _keep(self, piece: Piece) -> bool:
        """Keep `piece` for the next write_runs when it holds data and
        nothing else to write (zeros that a fresh target already reads,
        skips), and no source run to share from; written once WRITE_RUNS
        runs, WRITE_BYTES or WRITE_PIECES are kept. False, nothing kept,
        for any other piece."""
        if piece.source is not None:
            return False
        runs = []
        length = 0
        for offset, n, data in piece.items:
            if isinstance(data, memoryview):
                runs.append((offset, data))
                length += n
            elif data is None and not self.plan.zero_init:
                return False  # zeroes to write: in order, after the kept runs
        if not runs and not self._runs:
            return False  # nothing to wait for
        self._runs += runs
        self._run_bytes += length
        last = piece.items[-1] if piece.items else None
        if last is not None:
            self._run_end = last[0] + last[1]
        self._held.append(piece)
        self._buffers += piece.buffer is not None
        if (
            len(self._runs) >= WRITE_RUNS
            or self._run_bytes >= WRITE_BYTES
            or self._buffers >= WRITE_PIECES
        ):
            self._flush_runs()
        return True

    def _flush_runs(self) -> None:
        """Write the kept runs, in one write_runs, and release their pieces.
        An error names the first run's offset."""
        runs, held = self._runs, self._held
        if not runs:
            return
        self._runs, self._held, self._run_bytes, self._buffers = [], [], 0, 0
        try:
            self.tgt.write_runs(runs)
        except QimgError as exc:
            raise ImageIOError(f"error while writing at byte {runs[0][0]}: {exc}") from None
        for piece in held:
            self.release(piece)
        self.reached(self._run_end)

    def _write(self, offset: int, length: int, data, source: tuple | None = None) -> None:
        if data is None:
            self._write_zeroes(offset, length)
        elif data is not False:
            try:
                if self.shared is not None:
                    self._write_shared(offset, data, source)
                else:
                    self.tgt.write(offset, data)
            except QimgError as exc:
                raise _write_error(exc, offset) from None
            self.limit.account(length)
        self.reached(offset + length)

    def _flush_shared(self, offset: int) -> None:
        """Write the runs SharedWrites keeps back (before other writes)."""
        if self.shared is None:
            return
        try:
            self.shared.flush()
        except QimgError as exc:
            raise _write_error(exc, offset) from None
        if self.shared.confirmed:
            self.plan.share_confirmed = True

    def _write_shared(self, offset: int, data, source: tuple | None) -> None:
        self.shared.write(offset, data, source)
        if not self.shared.active:  # the target cannot share: plain writes from now on
            self.shared = None
            self.plan.share = False
        elif self.shared.confirmed:
            self.plan.share_confirmed = True

    def _write_zeroes(self, offset: int, length: int) -> None:
        if not self.plan.zero_init:
            self._flush_shared(offset)
            self.tgt.write_zeroes(offset, length, unmap=self.unmap)

    # --- -c ----------------------------------------------------------------------

    def _write_compressed(self, pieces: Iterable[Piece]) -> None:
        """Whole clusters through the compressor pool, a batch of
        consecutive clusters per task, written in order."""
        from qimg.formats.qcow2.compress import ClusterCompressor

        pending: deque[_Batch] = deque()  # handed to the pool, not yet written
        compression_type = _compression_type(self.tgt)
        with ClusterCompressor(compression_type, self.compression_level, self.workers) as pool:
            for results in pool.map_batches(self._cluster_batches(pieces, pending)):
                batch = pending.popleft()
                self._store_batch(batch.offset, batch.length, batch.data, results)
                self.limit.account(batch.length)
                self.reached(batch.offset + batch.length)
                for piece in batch.done:
                    self.release(piece)

    def _cluster_batches(self, pieces: Iterable[Piece], pending: deque) -> Iterator[list]:
        """The clusters of each compression task; each task's batch is
        appended to `pending`. Zero runs are written on the way. A piece is
        released after the last batch that holds its data is written (with
        the batch then last in `pending`: batches are written in order)."""
        for piece in pieces:
            for offset, length, data in piece.items:
                if data is None or data is False:
                    if data is None:
                        self._write_zeroes(offset, length)
                    if not pending:
                        self.reached(offset + length)
                    continue
                for batch in self._split(offset, data):
                    pending.append(batch)
                    yield batch.clusters
            if pending:
                pending[-1].done.append(piece)
            else:
                self.release(piece)

    def _split(self, offset: int, data: memoryview) -> Iterator[_Batch]:
        """The compression tasks of one data run, COMPRESS_BATCH bytes each."""
        cs = self.plan.cluster_size
        per_task = max(1, COMPRESS_BATCH // cs) * cs
        for pos in range(0, len(data), per_task):
            piece = data[pos : pos + per_task]
            n = len(piece)
            clusters = [piece[i : i + cs] for i in range(0, n, cs)]
            if n % cs:  # the image's last cluster, zero-padded as QEMU does
                clusters[-1] = bytes(clusters[-1]) + bytes(cs - n % cs)
            yield _Batch(offset + pos, n, piece, clusters, [])

    def _store_batch(self, offset: int, n: int, data: memoryview, results: list) -> None:
        """Write one batch: `results[i]` is cluster i compressed, or None to
        store it as it is (the first n bytes of `data` are the data)."""
        cs = self.plan.cluster_size
        tgt = self.tgt
        a = 0
        count = len(results)
        for b in range(1, count + 1):
            if b < count and (results[b] is None) == (results[a] is None):
                continue
            if results[a] is None:
                tgt.write(offset + a * cs, data[a * cs : min(n, b * cs)])
            else:
                try:
                    tgt.write_compressed_many(offset + a * cs, results[a:b])
                except QimgError as exc:
                    raise ImageIOError(
                        f"error while writing at byte {offset + a * cs}: {exc}"
                    ) from None
            a = b


class _Batch:
    """One compression task: guest bytes [offset, offset+length) held in
    `data`, cut into `clusters`; `done` lists the pieces to release once
    it is written."""

    __slots__ = ("offset", "length", "data", "clusters", "done")

    def __init__(self, offset: int, length: int, data, clusters: list, done: list[Piece]):
        self.offset = offset
        self.length = length
        self.data = data
        self.clusters = clusters
        self.done = done


def _compression_type(tgt: Driver) -> int:
    """The target's compression_type header field (qcow2 only: -c is
    refused for other formats before the copy starts)."""
    return tgt.compression_type


def _write_error(exc: QimgError, offset: int) -> ImageIOError:
    """qemu-img's message for a failed write at `offset` (or at the
    offset the error names: SharedWrites' `write_offset`)."""
    at = getattr(exc, "write_offset", offset)
    return ImageIOError(f"error while writing at byte {at}: {exc}")
