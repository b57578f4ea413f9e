"""Writing an overlay's data down its backing chain (qemu-img commit).

What the images above the base hold (data and zeros, and zeros past the end
of a shorter image between them) is written into the base, grown first to
the top's size where it is smaller, as QEMU's commit job does; then, unless
dropped (-d, and always with -b), the top image is emptied: every cluster
unallocated, as qcow2_make_empty leaves it.

Written against the driver interface; the base is reopened read-write the
way QEMU reopens it for the job (the chain is opened read-only below a
writable top).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

from qimg.chain import read_ahead, read_host
from qimg.convert.scan import DATA
from qimg.driver import Driver
from qimg.errors import QimgError
from qimg.storage import Storage

# Guest bytes of one data piece at most; data pieces read (in one job) and
# written (in one Driver.write_runs) together, at most BATCH bytes (>= CHUNK);
# data pieces copied host to host together (one Driver.copy_runs: one
# allocation per L2 table), at most COPY_BATCH bytes without a rate limit;
# reader threads.
CHUNK = 4 << 20
BATCH = 4 << 20
COPY_BATCH = 32 << 20
READERS = 2
# Bytes written into the base between starts of its write-back.
WRITEBACK_STEP = 32 << 20

Progress = Callable[[int, int], None]


def commit_image(
    image: Driver,
    filename: str,
    base: str | None = None,
    *,
    drop: bool = False,
    rate_limit: int = 0,
    progress: Progress | None = None,
    cache=None,
    base_storage_wrapper: Callable[[Storage], Storage] | None = None,
    secrets: Mapping[str, bytes] | None = None,
) -> None:
    """Commit `image` (opened writable with its backing chain; `filename`
    is its name in messages) into its backing file, or into the image of
    its chain that `base` names (qimg.chain.find_backing_image). `drop`
    keeps the top's clusters (-d); a `base` implies it, as in qemu-img.
    `rate_limit` is bytes a second (0: none); `cache` the base's cache
    mode (qimg.cachemode: a name or a CacheMode; writeback when None), as
    the top's. `base_storage_wrapper` wraps
    the base's storage when it is reopened read-write (crash tests).
    `secrets` (the --object secrets by id) serve the base's reopening."""
    from qimg.chain import find_backing_image

    if base is not None:
        target = find_backing_image(image, base)
        if target is None:
            raise QimgError(f"Did not find '{base}' in the backing chain of '{filename}'")
        drop = True
    else:
        target = image.backing
        if target is None:
            raise QimgError("Image does not have a backing file")
    target = _reopen_writable(image, target, cache, base_storage_wrapper, secrets)
    copy_down(image, target, rate_limit, progress)
    # Ordering: the base holds the data durably before the top lets go of it.
    target.flush()
    if not drop:
        make_empty(image)


def _reopen_writable(
    image: Driver,
    target: Driver,
    cache,
    wrapper: Callable[[Storage], Storage] | None,
    secrets: Mapping[str, bytes] | None = None,
) -> Driver:
    """The image `target` of `image`'s chain, closed and opened again
    read-write with the chain below it, in its place in the chain (an
    encrypted one by its json: name, which names its key-secret)."""
    from qimg.api import open_image

    parent = image
    while parent.backing is not target:
        parent = parent.backing
    path, fmt = target.filename, target.format_name
    parent.backing = None
    target.close()
    reopened = open_image(
        path, fmt, writable=True, cache=cache, storage_wrapper=wrapper, secrets=secrets
    )
    parent.backing = reopened
    return reopened


def copy_down(
    image: Driver, base: Driver, rate_limit: int = 0, progress: Progress | None = None
) -> int:
    """Write into `base` (writable, in `image`'s chain) what `image` reads
    wherever an image above `base` decides the bytes; returns the bytes
    copied. Zeros are written as zeros (unmapping where the base can).
    Data an image above the base holds as plain host bytes is copied host
    to host where the base can (Driver.copies_from, copy_runs: no read
    into memory); the rest is read in READERS threads ahead of the writes
    (this thread)."""
    if base.size < image.size:
        from qimg.resize import resize_image

        resize_image(base, image.size)
    pieces = _plan(image, base)
    limit = _rate_limiter(rate_limit)
    total = sum(p.end - p.start for p in pieces)
    done = 0
    # The reads stop above the base (the images above it decide those
    # bytes), so they run beside the base's writes.
    # Read buffers are reused (fresh memory costs a page fault per page):
    # at most READ_AHEAD + 1 are in use at once.
    spare: list[bytearray] = []
    size = min(BATCH, sum(p.end - p.start for p in pieces if p.kind == DATA))
    base.stream_writes()  # the flush after the copy waits for the data anyway
    unsynced = 0
    # The pool (and concurrent.futures, logging with it) is made on the
    # first read or write-back: a small commit copied host to host needs neither.
    pool = None

    def submit(fn: Callable, *args):
        nonlocal pool
        if pool is None:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(READERS)
        return pool.submit(fn, *args)

    def start_read(item: tuple[list[_Piece], bool]):
        """None for zeros; the copy_runs runs of a host copy; else the
        read's future."""
        batch, copy = item
        if batch[0].kind != DATA:
            return None
        if copy:
            return [(p.start, p.end - p.start, *p.source) for p in batch]
        return submit(_read, image, batch, spare.pop() if spare else bytearray(size))

    copy_batch = BATCH if rate_limit else COPY_BATCH
    batches = _batches(pieces, lambda p: _host_copies(p, base), copy_batch)
    try:
        for (batch, _copy), read in read_ahead(batches, start_read):
            length = sum(p.end - p.start for p in batch)
            if read is None:
                _write_zeroes(base, batch[0].start, length)
            else:
                if isinstance(read, list):
                    scratch = spare.pop() if spare else bytearray(size)
                    base.copy_runs(read, memoryview(scratch))
                    spare.append(scratch)
                else:
                    buf = read.result()
                    base.write_runs(_runs(batch, memoryview(buf)))
                    spare.append(buf)
                unsynced += length
                if unsynced >= WRITEBACK_STEP:
                    # The disk writes while the copy goes on: the flush
                    # after it waits only for the tail.
                    submit(base.start_writeback)
                    unsynced = 0
                if limit is not None:
                    limit.account(length)
            done += length
            if progress is not None:
                progress(done, total)
    finally:
        if pool is not None:
            pool.shutdown()
    return total


def _batches(
    pieces: list[_Piece], copies: Callable[[_Piece], bool], copy_batch: int
) -> Iterator[tuple[list[_Piece], bool]]:
    """The pieces in order, as (list, copied host to host): a zero piece
    alone, consecutive data pieces together, those that `copies` up to
    `copy_batch` bytes, the others (to read) up to BATCH."""
    batch: list[_Piece] = []
    size = 0
    copy = False
    for piece in pieces:
        n = piece.end - piece.start
        this = piece.kind == DATA and copies(piece)
        limit = copy_batch if copy else BATCH
        if batch and (piece.kind != DATA or this != copy or size + n > limit):
            yield batch, copy
            batch, size = [], 0
        if piece.kind != DATA:
            yield [piece], False
            continue
        batch.append(piece)
        size += n
        copy = this
    if batch:
        yield batch, copy


def _host_copies(piece: _Piece, base: Driver) -> bool:
    """Whether `base` copies the data piece from its host source host to
    host (a piece without one is read)."""
    return piece.source is not None and base.copies_from(piece.source[0])


def _runs(batch: list[_Piece], view: memoryview) -> list[tuple[int, memoryview]]:
    """(guest offset, data) of each piece of `batch`, read one after
    another into `view`."""
    runs = []
    at = 0
    for piece in batch:
        n = piece.end - piece.start
        runs.append((piece.start, view[at : at + n]))
        at += n
    return runs


class _Piece(NamedTuple):
    start: int
    end: int
    kind: int  # DATA or ZERO
    # (storage, host offset) where the piece is plain data one image above
    # the base holds at following host offsets: read there, not mapped
    # again through the chain (qimg.driver host_extents).
    source: tuple | None = None


def _plan(image: Driver, base: Driver) -> list[_Piece]:
    """The pieces to copy, in order: what the images above `base` decide
    (a part of a base cluster written leaves the cluster as QEMU's copy of
    the whole unit leaves it: allocated, the rest as it read), cut where
    `image` reads data or zeros (block status through the chain, asked
    once per window) and into CHUNK-sized data pieces, each with its
    host source where it has one. As QEMU's commit asks (is_allocated,
    without want_zero), a data cluster that is a hole in its file is data
    to copy, not zeros."""
    from qimg.chain import STATUS_STEP, HostRuns, allocated_above
    from qimg.convert.scan import allocation_runs

    size = image.size
    runs = allocated_above(image, base, 0, size)
    pieces: list[_Piece] = []
    # The status of what the images above the base decide never depends
    # on the base: it is asked with the base cut off (no host scan of a
    # file being written, and no request per range that falls through).
    above = [image]
    while above[-1].backing is not base:
        above.append(above[-1].backing)
    parent = above[-1]
    parent.backing = None
    asked = [node for node in above if getattr(node, "want_zero", False)]
    for node in asked:
        node.want_zero = False
    try:
        for window in range(0, size, STATUS_STEP):
            inside = _clip(runs, window, min(size, window + STATUS_STEP))
            if not inside:
                continue
            lo, hi = inside[0][0], inside[-1][1]
            status = allocation_runs(image.allocated_extents(lo, hi - lo))
            hosts = HostRuns(image.host_extents(lo, hi - lo))
            for s, e, kind in _intersect(status, inside):
                if kind != DATA:
                    pieces.append(_Piece(s, e, kind))
                    continue
                for a in range(s, e, CHUNK):
                    b = min(e, a + CHUNK)
                    pieces.append(_Piece(a, b, kind, hosts.source(a, b)))
    finally:
        parent.backing = base
        for node in asked:
            node.want_zero = True
    return pieces


def _clip(runs: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    return [(max(a, lo), min(b, hi)) for a, b in runs if a < hi and b > lo]


def _intersect(status: list, runs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(start, end, kind) of `status` (sorted, disjoint) inside `runs`."""
    out = []
    i = 0
    for a, b in runs:
        while i < len(status) and status[i][1] <= a:
            i += 1
        j = i
        while j < len(status) and status[j][0] < b:
            s, e, kind = status[j]
            if min(e, b) > max(s, a):
                out.append((max(s, a), min(e, b), kind))
            j += 1
    return out


def _read(image: Driver, batch: list[_Piece], buf: bytearray) -> bytearray:
    """The pieces of `batch` read one after another into `buf`."""
    for piece, (_start, view) in zip(batch, _runs(batch, memoryview(buf))):
        if piece.source is None:
            image.readinto(piece.start, view)
        else:
            read_host(piece.source, view)
    return buf


def _write_zeroes(base: Driver, start: int, length: int) -> None:
    """Zeros as QEMU's job writes them (unmapping): a qcow2 version 2 image
    with nothing below it, which has no zero clusters, has its whole
    clusters discarded (they read as zeros) and zeros written around them."""
    cs = base.cluster_bytes
    v2_alone = base.format_name == "qcow2" and base.header.version < 3 and base.backing is None
    lo, hi = -(-start // cs) * cs, (start + length) // cs * cs
    if not v2_alone or hi <= lo:
        base.write_zeroes(start, length, unmap=True)
        return
    if lo > start:
        base.write_zeroes(start, lo - start)
    base.discard(lo, hi - lo)
    if start + length > hi:
        base.write_zeroes(hi, start + length - hi)


def _rate_limiter(rate: int):
    if not rate:
        return None
    from qimg.convert.writer import RateLimit

    return RateLimit(rate)


def make_empty(image: Driver) -> None:
    """QEMU's bdrv_make_empty of the top after a commit: every cluster
    reads from the backing file again (qcow2: unallocated)."""
    if image.format_name != "qcow2":
        return  # QEMU's -ENOTSUP, which qemu-img commit ignores
    from qimg.formats.qcow2.empty import make_empty as qcow2_make_empty

    qcow2_make_empty(image)
