"""qemu-img compare: whether two images read the same, and where they first
differ.

Written against the driver interface in three parts:
- `ChainStatus`: an image's block status as QEMU's bdrv_block_status_above
  answers it (its BDRV_BLOCK_* flags and where each answer ends), built
  from each layer's `block_status` extents;
- `walk`: qemu-img's img_compare loop over both images' answers: the same
  chunks (at most IO_BUF_SIZE where data is read), the same strict-mode
  checks and messages at the same offsets, the same progress steps;
- `Comparer`: the chunks that need reading are read and compared on worker
  threads ahead of the walk (reading, decompression and the comparison
  release the GIL), their outcomes taken in order: the first difference
  reported is the one qemu-img reports.

qemu-img reports a difference at the first 512-byte sector that differs,
counted from the start of the chunk it lies in; so does `compare`.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

from qimg.chain import read_host, read_padded
from qimg.driver import COMPRESSED, DATA, ZERO, Driver
from qimg.errors import BadOptionError, QimgError
from qimg.storage import aligned_buffer

# QEMU's BDRV_BLOCK_* status flags (include/block/block-common.h).
BLOCK_DATA = 0x01
BLOCK_ZERO = 0x02
BLOCK_OFFSET_VALID = 0x04
BLOCK_ALLOCATED = 0x10
BLOCK_EOF = 0x20
_DIRECT = BLOCK_DATA | BLOCK_OFFSET_VALID  # data readable at its host offset

SECTOR = 512
IO_BUF_SIZE = 2 << 20  # qemu-img's largest read in compare
STATUS_WINDOW = 1 << 30  # guest bytes whose extents are asked for at once
# The first window is smaller (growing fourfold up to STATUS_WINDOW): the
# workers start on the first chunks without waiting for a whole window.
FIRST_STATUS_WINDOW = 32 << 20
JOB_BYTES = 16 << 20  # bytes read and compared by one job (and one chunk more)
JOB_CHUNKS = 4096  # chunks at most in one job
SEGMENT = IO_BUF_SIZE  # bytes read and compared at once
AHEAD = 2  # jobs in flight beyond the one being taken
MAX_AHEAD = 64  # steps and jobs waiting behind the one being taken
WORKERS = 2

# Outcome codes (qemu-img compare's exit codes).
IDENTICAL = 0
DIFFERENT = 1
OPEN_FAILED = 2
STATUS_FAILED = 3
READ_FAILED = 4

ProgressCallback = Callable[[int, int], None]  # (chunk bytes done, progress base)


class CompareError(QimgError):
    """Raised when: an image cannot be opened (exit 2), its block status
    cannot be had (3) or it cannot be read (4): qemu-img compare's codes."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
        self.offset: int | None = None  # a read failure's chunk


class Comparison(NamedTuple):
    """The outcome: exit code 0 (identical) or 1 (different) and the line
    qemu-img prints for it."""

    code: int
    message: str


def qemu_length(image: Driver) -> int:
    """The image's length as QEMU counts it: whole sectors, rounded up."""
    return -(-image.size // SECTOR) * SECTOR


# --- block status as QEMU answers it -----------------------------------------------


class LayerStatus:
    """One image's own block status (what its backing file holds aside),
    asked at offsets that never decrease: `at(x)` is (end, flags) of the
    answer QEMU's bdrv_co_block_status gives at x.

    An answer ends where the kind or the flags change, where the host
    offsets of data stop following each other, after each compressed
    cluster, and at each L2 table's end (QEMU maps one L2 slice per call,
    a whole table by default; qcow version 1 one cluster)."""

    def __init__(self, image: Driver):
        self.image = image
        self.size = qemu_length(image)
        self.raw = image.format_name == "raw"
        self.has_backing = image.backing is not None
        cs = image.cluster_bytes
        geo = getattr(image, "geo", None)
        entry = 16 if geo is not None and geo.extended_l2 else 8
        # Where every answer ends: an L2 table's guest bytes (qcow2), a
        # cluster (qcow version 1 maps one cluster per call), nowhere (raw).
        self.span = cs * (cs // entry) if geo is not None else 0
        if image.format_name == "qcow":
            self.span = image.cluster_size
        self._runs: deque[list[int]] = deque()  # [start, end, flags, host]
        self._fetched = 0
        self._window = FIRST_STATUS_WINDOW
        # An encrypted image gives out no host offsets (QEMU's crypto
        # driver has no block status; qcow2 withholds them when encrypted).
        self.offsets = image.format_name != "luks" and not (
            geo is not None and image.header.crypt_method
        )
        # QEMU asks the data file whether data clusters read as zeros only
        # where it guesses metadata preallocation (BDRV_BLOCK_RECURSE), and
        # only of data with a host offset.
        self.recurse = geo is not None and self.offsets and metadata_preallocated(image)
        # Plain data clusters of a qcow2 image are read straight from its
        # data file at the offsets block status gave (no second mapping),
        # a raw image's data from its file (guest offset == file offset).
        self.storage = image.data_storage if geo is not None and self.offsets else None
        if self.raw:
            self.storage = image.storage

    def at(self, x: int) -> tuple[int, int]:
        while True:
            while self._runs and self._runs[0][1] <= x:
                self._runs.popleft()
            # The last run fetched may go on in the next window.
            if self._runs and (len(self._runs) > 1 or self._fetched >= self.size):
                break
            if self._fetched >= self.size:
                break
            self._fetch()
        if not self._runs:
            return self.size, 0
        run = self._runs[0]
        flags = run[2]
        if run[1] == self.size:
            flags |= BLOCK_EOF
        return run[1], flags

    def source(self, x: int, flags: int) -> tuple | None:
        """(storage, host offset) where the answer `at(x)` gave (`flags`)
        is plain data of this image's data file, its host bytes following
        each other to the answer's end; else None."""
        if self.storage is None or flags & _DIRECT != _DIRECT or not self._runs:
            return None
        start, _end, _flags, host = self._runs[0]
        return self.storage, host + x - start

    def _fetch(self) -> None:
        lo = self._fetched
        hi = min(self.size, lo + self._window)
        self._window = min(STATUS_WINDOW, self._window * 4)
        inside = min(hi, self.image.size)
        exts = self.image.block_status(lo, inside - lo) if inside > lo else []
        for ext in exts:
            if self.recurse and ext.kind == DATA:
                self._add_recursed(ext)
            else:
                self._add(ext.offset, ext.offset + ext.length, self._flags(ext), ext.kind, ext.host)
        if hi > inside:  # a raw file's last, partial sector: a trailing hole
            self._add(inside, hi, self._flags_raw(ZERO), ZERO, 0)
        self._fetched = hi

    def _add_recursed(self, ext) -> None:
        """A data extent cut where its host bytes are data or a hole in
        the data file; the holes read as zeros (BLOCK_ZERO too)."""
        flags = self._flags(ext)
        storage = self.image.data_storage
        for host, n, is_data in storage.data_extents(ext.host, ext.length):
            start = ext.offset + host - ext.host
            more = 0 if is_data else BLOCK_ZERO
            self._add(start, start + n, flags | more, DATA, host)

    def _add(self, start: int, end: int, flags: int, kind: int, host: int) -> None:
        runs = self._runs
        span = self.span
        while start < end:
            stop = min(end, (start // span + 1) * span) if span else end
            prev = runs[-1] if runs else None
            if (
                prev is not None
                and prev[1] == start
                and prev[2] == flags
                and kind != COMPRESSED
                and not (span and start % span == 0)
                and (
                    not flags & BLOCK_OFFSET_VALID or self.raw or prev[3] + start - prev[0] == host
                )
            ):
                prev[1] = stop
            else:
                runs.append([start, stop, flags, host])
            if kind != COMPRESSED and host:
                host += stop - start
            start = stop

    def _flags(self, ext) -> int:
        if self.raw:
            return self._flags_raw(ext.kind)
        offsets = BLOCK_OFFSET_VALID if self.offsets else 0
        if ext.kind == DATA:
            return BLOCK_DATA | offsets | BLOCK_ALLOCATED
        if ext.kind == COMPRESSED:
            return BLOCK_DATA | BLOCK_ALLOCATED
        if ext.kind == ZERO:
            return BLOCK_ZERO | BLOCK_ALLOCATED | (offsets if ext.host else 0)
        # Unallocated (with a host cluster: extended L2's UNALLOCATED_ALLOC):
        # the backing file answers; without one it reads zeros.
        valid = offsets if ext.host else 0
        return valid if self.has_backing else valid | BLOCK_ZERO

    @staticmethod
    def _flags_raw(kind: int) -> int:
        """A raw image answers for its file: data, or a hole that reads zeros."""
        return (BLOCK_DATA if kind == DATA else BLOCK_ZERO) | BLOCK_OFFSET_VALID | BLOCK_ALLOCATED


def metadata_preallocated(image: Driver) -> bool:
    """QEMU's qcow2_detect_metadata_preallocation: whether clusters in use
    (a refcount above 0) outnumber by a ninth (and by two) the clusters
    the image file occupies on its host."""
    storage = image.storage
    cs = image.cluster_bytes
    real_clusters = storage.allocated_size() // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = -(-storage.size() // cs)
    refcounts = image.refcounts
    count = 0
    step = 1 << 20
    for start in range(0, end_cluster, step):
        counts = refcounts.get_range(start, min(step, end_cluster - start))
        count += int((counts != 0).sum())
        if count >= threshold:
            return True
    return False


class ChainStatus:
    """An image's block status through its backing chain, as QEMU's
    bdrv_block_status_above(bs, NULL, ...) answers it, at offsets that
    never decrease: `at(x)` is (end, flags)."""

    def __init__(self, image: Driver):
        self.layers: list[LayerStatus] = []
        node: Driver | None = image
        while node is not None:
            self.layers.append(LayerStatus(node))
            node = node.backing
        self.size = self.layers[0].size
        self.guest_size = image.size
        self._answered: tuple | None = None  # (layer, x, flags) of the last answer

    def at(self, x: int) -> tuple[int, int]:
        top = self.layers[0]
        end, flags = top.at(x)
        self._answered = (top, x, flags)
        if flags & BLOCK_ALLOCATED or len(self.layers) == 1:
            return end, flags
        self._answered = None
        eof = end if end == top.size else None
        for layer in self.layers[1:]:
            if x >= layer.size:
                # Past a shorter backing file: zeros, allocated there.
                flags = BLOCK_ZERO | BLOCK_ALLOCATED
                break
            lend, lflags = layer.at(x)
            if lend > end:
                lend, lflags = end, lflags & ~BLOCK_EOF
            end, flags = lend, lflags
            if flags & BLOCK_ALLOCATED:
                flags &= ~BLOCK_EOF
                self._answered = (layer, x, lflags)
                break
        if end == eof:
            flags |= BLOCK_EOF
        return end, flags

    def source(self, x: int, length: int) -> tuple | None:
        """(storage, host offset) where guest [x, x+length), inside the
        last answer (at(x)), is plain data that one image of the chain
        holds at following host offsets, inside every image's size (read
        there, it reads as through the chain); else None."""
        if self._answered is None or self._answered[1] != x:
            return None
        layer, _x, flags = self._answered
        if x + length > min(self.guest_size, layer.image.size):
            return None
        return layer.source(x, flags)


# --- qemu-img's walk over both images ----------------------------------------------


class Chunk(NamedTuple):
    """One step of the walk: [offset, offset+length), and which images'
    data must be read there (neither: both read as zeros). An image not
    read there reads as zeros: its block status says so (BLOCK_ZERO, or
    nothing allocated through its chain), so only the other is read and
    checked for zeros."""

    offset: int
    length: int
    read1: bool
    read2: bool
    # (storage, host offset) each image's bytes may be read from directly
    # (ChainStatus.source); None: read through the image.
    source1: tuple | None = None
    source2: tuple | None = None


class Stop(NamedTuple):
    """The walk ends here: an outcome or an error, in qemu-img's words."""

    code: int
    message: str


class SizeWarning(NamedTuple):
    """The images differ in size (printed where qemu-img prints it)."""

    message: str = "Warning: Image size mismatch!"


def walk(
    s1: ChainStatus, s2: ChainStatus, names: tuple[str, str], strict: bool
) -> Iterator[Chunk | Stop | SizeWarning]:
    """qemu-img's img_compare loop: the chunks in order, then the outcome
    it reaches without reading (strict mismatches, block status failures,
    "Images are identical." when every chunk reads the same)."""
    size1, size2 = s1.size, s2.size
    total = min(size1, size2)
    if strict and size1 != size2:
        yield Stop(DIFFERENT, "Strict mode: Image size mismatch!")
        return
    offset = 0
    while offset < total:
        try:
            end1, st1 = s1.at(offset)
        except QimgError:
            yield Stop(STATUS_FAILED, f"Sector allocation test failed for {names[0]}")
            return
        try:
            end2, st2 = s2.at(offset)
        except QimgError:
            yield Stop(STATUS_FAILED, f"Sector allocation test failed for {names[1]}")
            return
        chunk = min(end1, end2) - offset
        if strict and st1 != st2:
            yield Stop(DIFFERENT, f"Strict mode: Offset {offset} block status mismatch!")
            return
        alloc1, alloc2 = bool(st1 & BLOCK_ALLOCATED), bool(st2 & BLOCK_ALLOCATED)
        if st1 & st2 & BLOCK_ZERO or not (alloc1 or alloc2):
            yield Chunk(offset, chunk, False, False)
        else:
            # qemu-img reads both where both are allocated, else the
            # allocated one (and checks it for zeros); a side whose status
            # says it reads as zeros needs no reading either way.
            chunk = min(chunk, IO_BUF_SIZE)
            read1 = alloc1 and not st1 & BLOCK_ZERO
            read2 = alloc2 and not st2 & BLOCK_ZERO
            yield Chunk(
                offset,
                chunk,
                read1,
                read2,
                s1.source(offset, chunk) if read1 else None,
                s2.source(offset, chunk) if read2 else None,
            )
        offset += chunk
    if size1 != size2:
        yield SizeWarning()
        over, name, first = (s1, names[0], True) if size1 > size2 else (s2, names[1], False)
        while offset < over.size:
            try:
                end, st = over.at(offset)
            except QimgError:
                yield Stop(STATUS_FAILED, f"Sector allocation test failed for {name}")
                return
            chunk = end - offset
            if st & BLOCK_ALLOCATED and not st & BLOCK_ZERO:
                chunk = min(chunk, IO_BUF_SIZE)
                yield Chunk(offset, chunk, first, not first)
            else:
                yield Chunk(offset, chunk, False, False)
            offset += chunk
    yield Stop(IDENTICAL, "Images are identical.")


# --- reading and comparing ---------------------------------------------------------


class Job(NamedTuple):
    """Chunks in walk order handed to a worker as one piece of work (few
    hand-offs between threads whatever the images' layout); `length`:
    the bytes of the chunks that need reading."""

    chunks: list[Chunk]
    length: int


def jobs(steps: Iterator) -> Iterator:
    """The walk's chunks grouped into Jobs of about JOB_BYTES to read
    (JOB_CHUNKS chunks at most), other steps as they are."""
    chunks: list[Chunk] = []
    size = 0
    for step in steps:
        if not isinstance(step, Chunk):
            if chunks:
                yield Job(chunks, size)
                chunks, size = [], 0
            yield step
            continue
        chunks.append(step)
        if step.read1 or step.read2:
            size += step.length
        if size >= JOB_BYTES or len(chunks) >= JOB_CHUNKS:
            yield Job(chunks, size)
            chunks, size = [], 0
    if chunks:
        yield Job(chunks, size)


def segments(chunks: list[Chunk]) -> Iterator[list[Chunk]]:
    """The chunks that need reading, in runs that follow each other in the
    guest, of SEGMENT bytes at most: each is read in one request per image
    and compared while it is still in the CPU cache."""
    run: list[Chunk] = []
    size = 0
    for chunk in chunks:
        if not (chunk.read1 or chunk.read2):
            continue
        if run and (
            size + chunk.length > SEGMENT or run[-1].offset + run[-1].length != chunk.offset
        ):
            yield run
            run, size = [], 0
        run.append(chunk)
        size += chunk.length
    if run:
        yield run


class Pending:
    """A job handed to the workers; its outcome (see Comparer._check), or
    the exception the check raised, once `done` is set."""

    __slots__ = ("job", "done", "outcome", "error")

    def __init__(self, job: Job, done):
        self.job = job
        self.done = done
        self.outcome: int | str | None = None
        self.error: BaseException | None = None

    def result(self) -> int | str | None:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.outcome


class Workers:
    """Threads that run `check` on the jobs submitted, each taking the
    next one queued (a thread pool without concurrent.futures, whose
    import, logging's with it, costs more than the pool does here)."""

    def __init__(self, check: Callable[[Job], int | str | None], count: int):
        import threading
        from queue import SimpleQueue

        self._check = check
        self._event = threading.Event
        self._queue: SimpleQueue = SimpleQueue()
        self._cancelled = False
        self._threads = [
            threading.Thread(target=self._work, name=f"qimg-compare-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> Pending:
        pending = Pending(job, self._event())
        self._queue.put(pending)
        return pending

    def close(self) -> None:
        """Jobs not started are dropped; returns once those running end."""
        self._cancelled = True
        for _thread in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while (pending := self._queue.get()) is not None:
            if not self._cancelled:
                try:
                    pending.outcome = self._check(pending.job)
                except BaseException as exc:  # handed to the one taking it
                    pending.error = exc
            pending.done.set()


class Comparer:
    """Reads and compares the walk's jobs on worker threads, taking their
    outcomes in order."""

    def __init__(self, image1: Driver, image2: Driver, names: tuple[str, str]):
        import threading

        self.images = (image1, image2)
        self.names = names
        self._local = threading.local()  # each worker's buffers (_buffers)

    def run(self, steps: Iterator, progress: ProgressCallback, warn: Callable[[str], None]):
        """The outcome (Comparison) once the walk ends; CompareError on a
        failure. `progress(chunk, base)` after each chunk found equal."""
        base = max(qemu_length(image) for image in self.images)
        progress(0, base)
        ahead: deque = deque()  # steps and Pending jobs, in order
        inflight = 0
        pool = Workers(self._check, min(WORKERS, os.cpu_count() or 1))
        try:
            for step in jobs(steps):
                if isinstance(step, Job) and step.length:
                    ahead.append(pool.submit(step))
                    inflight += 1
                else:
                    ahead.append(step)
                while ahead and (
                    not isinstance(ahead[0], Pending) or inflight > AHEAD or len(ahead) > MAX_AHEAD
                ):
                    head = ahead.popleft()
                    inflight -= isinstance(head, Pending)
                    outcome = self._take(head, progress, base, warn)
                    if outcome is not None:
                        return outcome
            while ahead:
                outcome = self._take(ahead.popleft(), progress, base, warn)
                if outcome is not None:
                    return outcome
        finally:
            pool.close()
        raise AssertionError("the walk ends with a Stop")

    def _take(self, head, progress: ProgressCallback, base: int, warn) -> Comparison | None:
        if isinstance(head, SizeWarning):
            warn(head.message)
            return None
        if isinstance(head, Stop):
            if head.code > DIFFERENT:
                raise CompareError(head.message, head.code)
            return Comparison(head.code, head.message)
        if isinstance(head, Job):  # nothing to read in it
            job, found = head, None
        else:
            job, found = head.job, head.result()
            if found == "error":
                found = self._check_in_order(job)
        for chunk in job.chunks:
            if isinstance(found, CompareError) and found.offset == chunk.offset:
                raise found
            if isinstance(found, int) and found < chunk.offset + chunk.length:
                return Comparison(DIFFERENT, f"Content mismatch at offset {found}!")
            progress(chunk.length, base)
        return None

    def _check(self, job: Job) -> int | str | None:
        """The offset qemu-img reports for the first difference in `job`,
        None if it reads the same, "error" if a read failed (then
        _check_in_order finds which, in qemu-img's order)."""
        bufs = self._buffers()
        for run in segments(job.chunks):
            n = run[-1].offset + run[-1].length - run[0].offset
            try:
                a = self._side(0, run, bufs[0][:n])
                b = self._side(1, run, bufs[1][:n])
            except QimgError:
                return "error"
            found = _first_difference(run, a, b, n)
            if found is not None:
                return found
        return None

    def _buffers(self) -> tuple[memoryview, memoryview]:
        """This worker's two read buffers, made at its first job and kept
        (fresh pages cost the kernel a fault and a zero-fill each)."""
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = (aligned_buffer(SEGMENT), aligned_buffer(SEGMENT))
        return bufs

    def _side(self, side: int, run: list[Chunk], buf: memoryview) -> memoryview | None:
        """Image `side`'s bytes of `run`: None where none of its chunks
        reads it (all zeros), its host bytes mapped where they follow each
        other in one file (compared where they lie in the host's cache,
        not copied out first), else read into `buf`."""
        if not any((chunk.read1, chunk.read2)[side] for chunk in run):
            return None
        mapped = _mapped(run, side)
        if mapped is not None:
            return mapped
        self._fill(side, run, buf)
        return buf

    def _fill(self, side: int, run: list[Chunk], view: memoryview) -> None:
        """`view` holds image `side`'s bytes of `run` where its chunks read
        it, zeros where they read as zeros there; chunks read in one go."""
        image = self.images[side]
        start = run[0].offset
        lo = None  # start of the pending read, relative to `start`
        for chunk in run:
            a, b = chunk.offset - start, chunk.offset + chunk.length - start
            source = (chunk.source1, chunk.source2)[side]
            if source is None and (chunk.read1, chunk.read2)[side]:
                lo = a if lo is None else lo
                continue
            if lo is not None:
                read_padded(image, start + lo, view[lo:a])
                lo = None
            if source is not None:
                read_host(source, view[a:b])
            else:
                view[a:b] = _zeros()[: b - a]
        if lo is not None:
            read_padded(image, start + lo, view[lo:])

    def _check_in_order(self, job: Job) -> int | CompareError | None:
        """Chunk by chunk as qemu-img reads them (first image, then the
        second): the first difference, or the failure of the first read
        that fails (its `offset` the chunk's)."""
        import numpy as np

        for chunk in job.chunks:
            if not (chunk.read1 or chunk.read2):
                continue
            bufs = [np.zeros(chunk.length, np.uint8), np.zeros(chunk.length, np.uint8)]
            for side in (0, 1):
                if (chunk.read1, chunk.read2)[side]:
                    try:
                        read_padded(self.images[side], chunk.offset, memoryview(bufs[side]))
                    except QimgError as exc:
                        failed = CompareError(
                            f"Error while reading offset {chunk.offset} of "
                            f"{self.names[side]}: {exc}",
                            READ_FAILED,
                        )
                        failed.offset = chunk.offset
                        return failed
            found = _first_difference([chunk], bufs[0], bufs[1], chunk.length)
            if found is not None:
                return found
        return None


def _mapped(run: list[Chunk], side: int) -> memoryview | None:
    """The host bytes of `run` where image `side` holds all of it as plain
    data of one file at following host offsets, mapped; None where it
    does not (or the storage cannot map them: then they are read)."""
    first = (run[0].source1, run[0].source2)[side]
    if first is None:
        return None
    storage, host = first
    end = host
    for chunk in run:
        source = (chunk.source1, chunk.source2)[side]
        if source is None or source[0] is not storage or source[1] != end:
            return None
        end += chunk.length
    return storage.mapped(host, end - host)


def _first_difference(run: list[Chunk], a, b, n: int) -> int | None:
    """Where qemu-img reports the first difference between `a` and `b`
    (`n` bytes of `run`, chunks that follow each other; None: zeros): the
    chunk's offset plus the differing 512-byte sector's, counted from the
    chunk's start; None if they are equal."""
    if _equal(a, b, n):
        return None
    import numpy as np

    zeros = np.frombuffer(_zeros(), np.uint8)
    x = zeros[:n] if a is None else np.frombuffer(a, np.uint8, n)
    y = zeros[:n] if b is None else np.frombuffer(b, np.uint8, n)
    first = int(np.flatnonzero(x != y)[0]) + run[0].offset
    for chunk in run:
        if first < chunk.offset + chunk.length:
            return chunk.offset + (first - chunk.offset) // SECTOR * SECTOR
    raise AssertionError("a difference outside the run")


def _equal(a, b, n: int) -> bool:
    """Whether the first `n` (at most SEGMENT) bytes of buffers `a` and
    `b` (None: zeros) are equal: libc's memcmp where the C library gives
    it (at memory speed, without the GIL: the workers compare at once),
    else numpy."""
    if a is None and b is None:
        return True
    if a is None:
        a, b = b, a
    if b is None:
        b = _zeros()
    import numpy as np

    x, y = np.frombuffer(a, np.uint8, n), np.frombuffer(b, np.uint8, n)
    memcmp = _memcmp()
    if memcmp is not None:
        return n == 0 or memcmp(x.ctypes.data, y.ctypes.data, n) == 0
    if n % 8 == 0:
        x, y = x.view("<u8"), y.view("<u8")
    return bool(np.array_equal(x, y))


def _memcmp() -> Callable | None:
    """memcmp on addresses, called without the GIL (qimg.libc), or None."""
    import ctypes

    from qimg import libc

    return libc.function("memcmp", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


@functools.cache
def _zeros() -> memoryview:
    """SEGMENT zero bytes, never written (their pages are the kernel's
    shared zero page)."""
    return aligned_buffer(SEGMENT)


# --- the command's library function ------------------------------------------------


def compare_images(
    image1: Driver,
    image2: Driver,
    *,
    names: tuple[str, str] | None = None,
    strict: bool = False,
    progress: ProgressCallback | None = None,
    warn: Callable[[str], None] | None = None,
) -> Comparison:
    """qemu-img compare of two opened images (their backing chains read
    through): Comparison(0, "Images are identical.") or Comparison(1,
    qemu-img's message naming the first difference). `strict` (-s) counts
    a different size or block status as a difference. `progress(chunk,
    base)` is called after each chunk as qemu-img counts them (base: the
    larger image's length); `warn(line)` with "Warning: Image size
    mismatch!" where qemu-img prints it. Raises CompareError (exit code 3
    or 4) where qemu-img fails."""
    names = names or (image1.filename, image2.filename)
    for image in (image1, image2):
        _no_split_decompression(image)
    steps = walk(ChainStatus(image1), ChainStatus(image2), names, strict)
    return Comparer(image1, image2, names).run(steps, progress or _ignore, warn or _ignore)


def compare(
    path1: str,
    path2: str,
    *,
    fmt1: str | None = None,
    fmt2: str | None = None,
    strict: bool = False,
    force_share: bool = False,
    image_opts: bool = False,
    progress: ProgressCallback | None = None,
    warn: Callable[[str], None] | None = None,
    secrets: Mapping[str, bytes] | None = None,
) -> Comparison:
    """`qemu-img compare PATH1 PATH2`: both images opened read-only as
    qemu-img opens them (a failure is CompareError with exit code 2), then
    compare_images. `secrets` (the --object secrets by id) are those the
    images and their backing files may name."""
    image1 = _open(path1, fmt1, force_share, image_opts, secrets)
    try:
        image2 = _open(path2, fmt2, force_share, image_opts, secrets)
        try:
            return compare_images(
                image1, image2, names=(path1, path2), strict=strict, progress=progress, warn=warn
            )
        finally:
            image2.close()
    finally:
        image1.close()


def _open(
    path: str,
    fmt: str | None,
    force_share: bool,
    image_opts: bool,
    secrets: Mapping[str, bytes] | None,
) -> Driver:
    try:
        return open_input(path, fmt, image_opts, force_share, secrets)
    except QimgError as exc:
        raise CompareError(str(exc), OPEN_FAILED) from None


def open_input(
    path: str,
    fmt: str | None,
    image_opts: bool,
    force_share: bool,
    secrets: Mapping[str, bytes] | None = None,
) -> Driver:
    """The image read from, opened as qemu-img's img_open opens it, with
    the --object `secrets` its options and backing chain may name."""
    from qimg.api import open_named

    if image_opts and fmt is not None:
        raise BadOptionError("--image-opts and --format are mutually exclusive")
    if not path and not image_opts:  # refused by QEMU's file driver before any open
        raise QimgError(f"Could not open '{path}': The 'file' block driver requires a file name")
    return open_named(path, fmt, image_opts=image_opts, force_share=force_share, secrets=secrets)


def _no_split_decompression(image: Driver | None) -> None:
    """The workers read in parallel already: each decompresses its own
    clusters (see the convert pipeline's readers)."""
    while image is not None:
        if hasattr(image, "split_decompression"):
            image.split_decompression = False
        image = image.backing


def _ignore(*_args) -> None:
    pass
