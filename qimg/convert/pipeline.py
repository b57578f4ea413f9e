"""The copy's threads and read buffers.

A producer thread walks the plan and reads data chunks of at most CHUNK
bytes in large coalesced requests into pooled buffers (hot pages: the
writer's copy out of them costs no page faults; mmap'd source windows
measured 10-50% slower end to end and risked SIGBUS on a truncated
source), and scans them for zeros (scan.py). Where the source holds
compressed clusters, READERS threads read and decompress chunks ahead
instead (Pipeline._pieces). The writer (the calling thread, writer.py)
takes the pieces in order from a queue and hands each piece's buffer back
once its data is written. While the target shares the source's extents
(sharing.py), data chunks are scanned where the source's storage maps
them instead: their bytes are not written, so copying them in is waste.
A copy expected to share from its start (plan.share_expected) walks the
plan in the writer's thread until the target refuses (Pipeline.pieces):
its work is the scan's page faults and the clones, under one GIL either
way, and two threads cost a GIL hand-over at nearly every system call.

An item is (offset, length, data): `data` a memoryview to write, None for
zeros, False for nothing to write (the target's backing file has it).

Memory is bounded whatever the image size: at most QUEUE_DEPTH batches of
about a chunk of data sit between the threads, READ_AHEAD chunks are being
read, and reads go into READ_BUFFERS reused buffers (more are allocated
only while all of them are held).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from qimg.chain import read_host
from qimg.convert.plan import Plan
from qimg.convert.scan import (
    SKIP,
    ZERO,
    Blocks,
    differing_blocks,
    state_runs,
    surely_data,
    zero_blocks,
)
from qimg.convert.sharing import SourceMaps, source_runs
from qimg.convert.source import Concat
from qimg.driver import Driver
from qimg.errors import ImageIOError, QimgError
from qimg.storage import aligned_buffer

if TYPE_CHECKING:
    import numpy as np

# Bytes per read request (the producer coalesces up to this): small enough
# that a chunk is still in the CPU cache when the writer copies it out
# (8 MiB measured 7-10% slower end to end on every uncompressed direction).
CHUNK = 2 << 20
QUEUE_DEPTH = 3  # batches in flight between the producer and the writer
BATCH_ITEMS = 4096  # items at most in one batch
# Bytes of chunks scanned where the source maps them (to be shared, not
# written: sharing.py) in one batch at most.
MAPPED_BATCH = 8 << 20
READERS = 2  # threads that read and scan data chunks ahead of the writer
READ_AHEAD = 4  # data chunks being read at once
AHEAD_MAX = 64  # pieces held back behind the chunks being read
# Reused read buffers of a chunk each (BufferPool): those in flight
# between the threads, and writer.WRITE_PIECES that the writer keeps.
READ_BUFFERS = 16


class BufferPool:
    """Read buffers of `size` bytes, reused.

    Ownership is explicit: acquire() hands a buffer to its caller, who owns
    it, and every view of it, until it gives it back with release(); the
    pool hands out only buffers that nobody owns. Up to `keep` buffers are
    kept (fresh memory costs the kernel a fault and a zero-fill per page,
    ~0.3 s a GiB); while all of them are owned, acquire() makes a fresh one
    that release() drops. The memory is uninitialized: readers fill every
    byte. acquire and release may be called from different threads.
    """

    def __init__(self, size: int, keep: int):
        self.size = size
        self.keep = keep
        self._kept: dict[int, np.ndarray] = {}  # id -> every kept buffer
        self._free: list[np.ndarray] = []  # kept buffers that nobody owns
        self._lock = threading.Lock()

    def acquire(self, length: int) -> np.ndarray:
        """A buffer of `length` bytes (at most `size` to be a kept one)."""
        import numpy as np

        arr = None
        if length <= self.size:
            with self._lock:
                if self._free:
                    arr = self._free.pop()  # the last released: its pages are hot
                elif len(self._kept) < self.keep:
                    # Page-aligned, so that reads and writes under O_DIRECT
                    # (cache modes none, directsync) need no bounce buffer.
                    arr = np.frombuffer(aligned_buffer(self.size), dtype=np.uint8)
                    self._kept[id(arr)] = arr
        if arr is None:
            return np.empty(length, dtype=np.uint8)
        return arr[:length]

    def owned(self) -> int:
        """How many kept buffers are owned."""
        with self._lock:
            return len(self._kept) - len(self._free)

    def release(self, buf: np.ndarray) -> None:
        """Give back a buffer that acquire() returned; its owner no longer
        uses it or any view of it."""
        base = buf if buf.base is None else buf.base
        with self._lock:
            if self._kept.get(id(base)) is not base:
                return  # made beyond `keep`: dropped
            if any(f is base for f in self._free):
                raise RuntimeError("read buffer released twice")
            self._free.append(base)


class Piece(NamedTuple):
    """Items in order, and the pool's buffer their data lies in (None when
    they hold no data, or when it maps the source's storage: the mapping
    goes with the last view of it), owned by whoever holds the piece."""

    items: list[tuple[int, int, object]]
    buffer: np.ndarray | None = None
    # (guest offset, length, storage, host): the one run of the source's
    # storage its items' data maps (no buffer), or None.
    source: tuple | None = None


class Pipeline:
    """The producer and reader threads of one copy, used as a context
    manager: `pieces()` yields the pieces to write, in order, and
    `release(piece)` gives its buffer back."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.src = plan.src
        self.chunk = max(plan.block, CHUNK // plan.block * plan.block)
        self.pool = BufferPool(self.chunk, READ_BUFFERS)
        self._compressing = list(_compressing_sources(plan.src))  # see _decompressing
        self._hosts = HostMap(plan.src)
        self._maps = SourceMaps()  # where data chunks to share are scanned (_mapped_chunk)
        self._use_readers = False
        # ThreadPoolExecutor of READERS threads, made once chunks go to them
        # (_decompressing): a plain copy never loads concurrent.futures.
        self._readers = None
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._stop = threading.Event()
        self._done = object()  # the producer's last message
        self._thread: threading.Thread | None = None
        self._batches_left = self._batches()  # walked by pieces() until the thread starts

    def __enter__(self) -> Pipeline:
        if not self.plan.share_expected:
            self._start()
        return self

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._produce, name="qimg-convert-read", daemon=True)
        self._thread.start()

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._readers is not None:
            self._readers.shutdown(wait=True, cancel_futures=True)

    # --- the writer's side ---------------------------------------------------------

    def pieces(self) -> Iterator[Piece]:
        """The pieces to write, in order (raises what the producer raised).
        Made in this thread while the copy is expected to share, by the
        producer thread from the first batch after the target refused."""
        if self._thread is None:
            for batch in self._batches_left:
                yield from batch
                if not self.plan.share:
                    break
            else:
                return
            self._start()
        while True:
            batch = self._queue.get()
            if batch is self._done:
                return
            if isinstance(batch, BaseException):
                raise batch
            yield from batch

    def release(self, piece: Piece) -> None:
        """The writer is done with `piece`'s data."""
        if piece.buffer is not None:
            self.pool.release(piece.buffer)

    # --- the producer thread -------------------------------------------------------

    def _produce(self) -> None:
        try:
            for batch in self._batches_left:
                if not self._put(batch):
                    return
            self._put(self._done)
        except BaseException as exc:  # handed to the writer's thread
            self._put(exc)

    def _put(self, message) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _batches(self) -> Iterator[list[Piece]]:
        """Pieces grouped so that each batch holds about a chunk of data at
        most: the queue between the threads is bounded in bytes."""
        batch: list[Piece] = []
        held = mapped = items = 0
        for piece in self._pieces():
            batch.append(piece)
            items += len(piece.items)
            if piece.buffer is not None:
                held += len(piece.buffer)
            elif piece.source is not None:
                mapped += piece.source[1]
            if held >= self.chunk or mapped >= MAPPED_BATCH or items >= BATCH_ITEMS:
                yield batch
                batch, held, mapped, items = [], 0, 0, 0
        if batch:
            yield batch

    def _pieces(self) -> Iterator[Piece]:
        """The pieces in order, data chunks read and scanned.

        Data chunks are read and scanned in this (the producer) thread while
        the writer writes: two threads for two copies. Once the source turns
        out to hold compressed clusters, decompression is the work, and the
        reader threads take the chunks instead, up to READ_AHEAD of them
        ahead of the one being handed on (measured on 2 cores: reader
        threads make a plain copy ~20% slower and a zstd source ~10% faster)."""
        ahead: deque = deque()  # pieces, or futures of them, in order
        reading = 0  # the futures in `ahead`
        for step in self._steps():
            if not isinstance(step, Piece):
                offset, length = step
                mapped = self._mapped_chunk(offset, length) if self._mapping() else None
                where = self._hosts.lookup(offset, length) if mapped is None else None
                if mapped is not None:
                    step = mapped
                elif self._decompressing():
                    buf = self.pool.acquire(length)
                    step = self._readers.submit(self._read_chunk, offset, buf, where)
                else:
                    step = self._read_chunk(offset, self.pool.acquire(length), where)
            if isinstance(step, Piece) and not ahead:
                yield step  # nothing read ahead of it: handed on at once
                continue
            ahead.append(step)
            reading += not isinstance(step, Piece)
            # Ready pieces (zeros between data runs) do not count: READ_AHEAD
            # chunks stay with the readers whatever lies between them.
            while reading > READ_AHEAD or len(ahead) > AHEAD_MAX:
                first = ahead.popleft()
                reading -= not isinstance(first, Piece)
                yield _resolved(first)
        while ahead:
            yield _resolved(ahead.popleft())

    def _steps(self) -> Iterator[Piece | tuple[int, int]]:
        """Ready pieces (zeros, skips), and (offset, length) data chunks to read."""
        for s, e, kind in self.plan.runs():
            if kind == SKIP:
                yield Piece([(s, e - s, False)])
            elif kind == ZERO:
                yield Piece(list(self.plan.zero_items(s, e)))
            else:
                pos = s
                while pos < e:
                    n = min(e - pos, self.chunk - pos % self.chunk)
                    yield pos, n
                    pos += n

    def _decompressing(self) -> bool:
        """Whether chunks go to the reader threads: once a source has met
        compressed clusters. From then on each reader decompresses its own
        chunk's clusters; the image does not split them over more threads."""
        if not self._use_readers and any(d.read_compressed for d in self._compressing):
            from concurrent.futures import ThreadPoolExecutor

            for image in self._compressing:
                image.split_decompression = False
            readers = min(READERS, os.cpu_count() or 1)
            self._readers = ThreadPoolExecutor(readers, thread_name_prefix="qimg-convert-read")
            self._use_readers = True
        return self._use_readers

    # --- reading and scanning a chunk (producer or reader thread) ------------------

    def _read_chunk(self, offset: int, buf: np.ndarray, where: tuple | None = None) -> Piece:
        """The piece of one chunk, read into `buf`, which it owns while
        any of its items holds data; `where` (HostMap.lookup), the storage
        and host offset holding all of it as it is."""
        self._read(offset, buf, where)
        items = self._scan(offset, buf)
        if any(isinstance(data, memoryview) for _o, _n, data in items):
            return Piece(items, buf)
        self.pool.release(buf)
        return Piece(items)

    def _mapping(self) -> bool:
        """Whether data chunks are scanned where the source's storage maps
        them: once the target has shared a run, or from the start where it
        is expected to (sharing.expected), and while it still may.
        (A mapped file that fails to read, or that another process cuts
        short, faults instead of failing a read: only a copy that shares
        takes that risk, for the copy it saves.)"""
        return self.plan.share and (self.plan.share_confirmed or self.plan.share_expected)

    def _mapped_chunk(self, offset: int, length: int) -> Piece | None:
        """The piece of a chunk whose data the writer will share
        (sharing.py), scanned where the source's storage maps it instead
        of read into a buffer: nothing is copied, and the scan reads each
        block's first and last words (all of it only where they are zero).
        None unless the chunk lies as it is in one run of one storage."""
        runs = source_runs(self.src, offset, length, 1)
        if len(runs) != 1 or runs[0][0] != offset or runs[0][1] != length:
            return None
        view = self._maps.view(runs[0][2], runs[0][3], length)
        if view is None:
            return None
        return Piece(self._scan(offset, view), None, runs[0])

    def _read(self, offset: int, buf: np.ndarray, where: tuple | None = None) -> None:
        salvage = self.plan.salvage
        try:
            if where is not None:
                read_host(where, memoryview(buf))
            else:
                self.src.readinto(offset, buf)
        except QimgError as exc:
            if not salvage and getattr(exc, "guest_offset", None) is not None:
                # qemu-img asks for block status before any read, even
                # with -S 0: a mapping that fails, fails there.
                raise ImageIOError(
                    f"error while reading block status at offset {exc.guest_offset}: {exc}"
                ) from None
            if not salvage:
                raise ImageIOError(f"error while reading at byte {offset}: {exc}") from None
            self._salvage(offset, buf)

    def _salvage(self, offset: int, buf: np.ndarray) -> None:
        """--salvage: read what can be read, 512 bytes at a time, zeros elsewhere."""
        view = memoryview(buf)
        step = 512
        for pos in range(0, len(buf), step):
            piece = view[pos : pos + step]
            try:
                self.src.readinto(offset + pos, piece)
            except QimgError:
                piece[:] = bytes(len(piece))

    def _scan(self, offset: int, buf) -> list[tuple[int, int, object]]:
        """The items of one chunk read from guest `offset`: runs of blocks
        to write as data, as zeros, or not at all (same as the backing)."""
        import numpy as np

        plan = self.plan
        view = memoryview(buf)
        if not plan.detect_zeros and plan.backing is None:
            return [(offset, len(buf), view)]
        words = np.frombuffer(buf, dtype=np.uint8)
        if plan.backing is None and surely_data(words, offset, plan.block):
            return [(offset, len(buf), view)]  # all data (the common case)
        blocks = Blocks.cut(offset, len(buf), plan.block)
        if plan.detect_zeros:
            zero = zero_blocks(words, blocks, plan.min_zero)
        else:
            zero = np.zeros(blocks.count, dtype=bool)
        if plan.backing is not None:  # block must be written
            keep = self._differs(offset, words, blocks)
        elif not zero.any():
            return [(offset, len(buf), view)]  # all data (the common case)
        else:
            keep = np.ones(blocks.count, dtype=bool)
        state = keep.astype(np.int8) * 2 + zero.astype(np.int8)
        return [_item(offset, lo, hi, st, view) for lo, hi, st in state_runs(blocks, state)]

    def _differs(self, offset: int, words: np.ndarray, blocks: Blocks) -> np.ndarray:
        """Blocks whose source data differs from the target's backing file."""
        import numpy as np

        backing = self.plan.backing
        length = len(words)
        other = bytearray(length)
        avail = max(0, min(length, backing.size - offset))
        if avail:
            backing.readinto(offset, memoryview(other)[:avail])
        return differing_blocks(words, np.frombuffer(other, dtype=np.uint8), blocks)


class HostMap:
    """Where the sources hold guest data as it is (sharing.source_runs:
    plain clusters, raw data, looked up a window at a time there), so
    that a data chunk is read from its storage directly instead of mapped
    again by the source's readinto. Only where some source maps per read
    (Driver.maps_per_read); a lookup that fails is left to readinto,
    which fails as it does."""

    def __init__(self, src: Concat):
        self.src = src
        self.enabled = any(_maps_per_read(d) for _start, d in src.parts)

    def lookup(self, offset: int, length: int) -> tuple | None:
        """(storage, host) holding guest [offset, offset+length) as it is,
        or None where no one run holds all of it."""
        if not self.enabled:
            return None
        try:
            runs = source_runs(self.src, offset, length, 1)
        except QimgError:
            return None  # readinto meets the failure, in its words
        if len(runs) != 1 or runs[0][:2] != (offset, length):
            return None
        return runs[0][2:]


def _maps_per_read(image: Driver) -> bool:
    """Whether `image`, or an image in its backing chain, maps per read."""
    while image is not None:
        if image.maps_per_read:
            return True
        image = getattr(image, "backing", None)
    return False


def _item(offset: int, lo: int, hi: int, state: int, view: memoryview) -> tuple:
    """The item of bytes [lo, hi) of a chunk at `offset`; `state` is
    2 * (differs from the backing file) + (reads as zeros)."""
    if not state & 2:
        return offset + lo, hi - lo, False
    if state & 1:
        return offset + lo, hi - lo, None
    return offset + lo, hi - lo, view[lo:hi]


def _resolved(step) -> Piece:
    """A piece, or the piece a reader's future holds."""
    return step if isinstance(step, Piece) else step.result()


def _compressing_sources(src: Concat) -> Iterator[Driver]:
    """Every image the sources read from that may hold compressed clusters
    (qcow2: `read_compressed`), backing files included."""
    for _start, image in src.parts:
        while image is not None:
            if hasattr(image, "read_compressed"):
                yield image
            image = getattr(image, "backing", None)
