"""Floor rows of the copy benchmarks (bench_reflink, bench_convert
--floor, bench_chain --floor): the least a Python process must do for a
copy, timed as a whole process.

    python copy_floor.py STEPS SOURCE TARGET RUNS [MODULES BLOCK]

STEPS is '+'-joined: `imports` (every module the qimg command of the
bench row imported, listed one a line in MODULES, in the order it
imported them: common.list_modules), `scan` (the zero scan of each run:
its BLOCK-byte blocks' first and last words read through a mapping of
the source, a whole block only where both are zero, as qimg's convert
scans data it shares), `clones` (one FICLONERANGE per run), `writes`
(the target's write stream alone: each run's length written at its
target offset from one reused buffer, on one thread; every step writes
in system calls of at most WRITE bytes, as qimg does; the kernel
serialises a file's buffered writes, so no number of threads writes one
target faster), `copy` (each run read into one reused buffer and
written, on one thread), `copy2` (each run read by one thread and
written by another, through BUFFERS buffers), `zstd2` (a zstd qcow2
source to raw: two threads read and decompress, through the system's
libzstd, a MiB of output at a time, each cluster's stream read with its
neighbours in one request, and the main thread writes; a run whose
length is negative is one compressed cluster, its stream in -length
bytes, BLOCK bytes once decompressed). RUNS holds the runs as (source
offset, length, target offset) triples of native 64-bit integers,
computed before the clock starts. This module imports nothing
beyond what the steps need, so that the process costs what its steps
cost.
"""

from __future__ import annotations

import os
import sys

FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
WINDOW = 32 << 20  # bytes of the source mapped at once (qimg's sharing.MAP_WINDOW)
BUFFERS = 4  # copy2: buffers between the reading and the writing thread
WRITE = 512 << 10  # bytes a write system call takes at most, as qimg's storage.WRITE_MAX


def _pwrite(fd: int, view: memoryview, offset: int) -> None:
    """`view` written at `offset` in calls of at most WRITE bytes (the
    page cache's folio size follows the call's: see storage.WRITE_MAX)."""
    for at in range(0, len(view), WRITE):
        os.pwrite(fd, view[at : at + WRITE], offset + at)


def _imports(modules_file: str) -> None:
    """Every module listed, in order (what is imported already is skipped).
    numpy is told to start no BLAS threads, as qimg's CLI tells it."""
    import importlib

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    with open(modules_file) as f:
        names = f.read().split()
    for name in names:
        if name in sys.modules or name.endswith("__main__"):
            continue
        try:
            importlib.import_module(name)
        except Exception:
            pass  # a module made under another name (six.moves and the like)


def _scan(fd: int, runs: list[tuple[int, int, int]], block: int) -> None:
    """The zero scan of each run, through one mapping of WINDOW bytes of
    the source at a time, each run read ahead first (raises where a block
    reads as zeros: the benchmark's runs are data throughout)."""
    import mmap

    import numpy as np

    size = os.fstat(fd).st_size
    window = None
    for offset, length, _dest in runs:
        if window is None or not window[0] <= offset <= offset + length <= window[1]:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            end = min(size, max(offset + length, start + WINDOW))
            m = mmap.mmap(fd, end - start, access=mmap.ACCESS_READ, offset=start)
            window = (start, end, m, np.frombuffer(m, dtype=np.uint8))
        start, _end, m, words = window
        lo = offset - start
        page = lo - lo % mmap.PAGESIZE
        m.madvise(mmap.MADV_WILLNEED, page, lo + length - page)
        rows = words[lo : lo + length].view("<u8").reshape(-1, block // 8)
        ends = (rows[:, 0] | rows[:, -1]) == 0
        if ends.any() and (rows[ends].max(axis=1) == 0).any():
            raise SystemExit(f"a zero block in the run at {offset}")


def _write(src: int, dst: int, runs: list[tuple[int, int, int]], read: bool) -> None:
    """Each run written at its target offset from one buffer, which stays
    in the CPU's cache; `read`: read from the source into it first."""
    buf = bytearray(max(length for _o, length, _d in runs))
    if not read:
        buf[:] = os.urandom(len(buf))
    view = memoryview(buf)
    for offset, length, dest in runs:
        piece = view[:length]
        if read:
            os.preadv(src, [piece], offset)
        _pwrite(dst, piece, dest)


def _copy_two_threads(src: int, dst: int, runs: list[tuple[int, int, int]]) -> None:
    """Each run read by one thread and written by another: the least a
    copy does that overlaps its reads with its writes. BUFFERS buffers go
    round between the two threads."""
    import queue
    import threading

    size = max(length for _o, length, _d in runs)
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(BUFFERS):
        free.put(memoryview(bytearray(size)))

    def read() -> None:
        for offset, length, dest in runs:
            buf = free.get()
            os.preadv(src, [buf[:length]], offset)
            full.put((buf, length, dest))
        full.put(None)

    reader = threading.Thread(target=read)
    reader.start()
    while (item := full.get()) is not None:
        buf, length, dest = item
        _pwrite(dst, buf[:length], dest)
        free.put(buf)
    reader.join()


def _zstd_batches(runs: list[tuple[int, int, int]], cluster: int) -> list[list]:
    """`runs` cut into batches of about a MiB of output."""
    batches, batch, out = [], [], 0
    for run in runs:
        batch.append(run)
        out += cluster if run[1] < 0 else run[1]
        if out >= 1 << 20:
            batches.append(batch)
            batch, out = [], 0
    return batches + [batch] if batch else batches


def _decompress_two_threads(
    src: int, dst: int, runs: list[tuple[int, int, int]], cluster: int
) -> None:
    """zstd2: see the module's docstring."""
    import ctypes
    import queue
    import threading

    lib, held = ctypes.CDLL("libzstd.so.1"), ctypes.PyDLL("libzstd.so.1")
    size_t, void_p = ctypes.c_size_t, ctypes.c_void_p
    frame_size = held.ZSTD_findFrameCompressedSize
    frame_size.restype, frame_size.argtypes = size_t, (void_p, size_t)
    decompress = lib.ZSTD_decompressDCtx
    decompress.restype = size_t
    decompress.argtypes = (void_p, void_p, size_t, void_p, size_t)
    lib.ZSTD_createDCtx.restype = void_p
    todo: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()
    free: queue.Queue = queue.Queue()
    for batch in _zstd_batches(runs, cluster):
        todo.put(batch)
    for _ in range(2 * BUFFERS):
        free.put(bytearray((1 << 20) + cluster))

    def read() -> None:
        dctx = lib.ZSTD_createDCtx()
        streams_buf = bytearray(0)  # reused: fresh memory costs a fault per page
        while True:
            try:
                batch = todo.get_nowait()
            except queue.Empty:
                done.put(None)
                return
            out = free.get()
            base = ctypes.addressof(ctypes.c_char.from_buffer(out))
            streams = [r for r in batch if r[1] < 0]
            if streams:
                lo = streams[0][0]
                need = streams[-1][0] - streams[-1][1] - lo
                if len(streams_buf) < need:
                    streams_buf = bytearray(need)
                os.preadv(src, [memoryview(streams_buf)[:need]], lo)
                address = ctypes.addressof(ctypes.c_char.from_buffer(streams_buf))
            pos, items = 0, []
            for host, length, dest in batch:
                if length < 0:
                    at = address + host - lo
                    n = frame_size(at, -length)
                    decompress(dctx, base + pos, cluster, at, n)
                    length = cluster
                else:
                    os.preadv(src, [memoryview(out)[pos : pos + length]], host)
                items.append((pos, length, dest))
                pos += length
            done.put((out, items))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    finished = 0
    while finished < len(readers):
        item = done.get()
        if item is None:
            finished += 1
            continue
        out, items = item
        view = memoryview(out)
        for pos, length, dest in items:
            _pwrite(dst, view[pos : pos + length], dest)
        free.put(out)
    for reader in readers:
        reader.join()


def main(argv: list[str]) -> None:
    steps, source, target, runs_file = argv[:4]
    steps = set(steps.split("+"))
    if "imports" in steps:
        _imports(argv[4])
    import fcntl
    import struct

    with open(runs_file, "rb") as f:
        flat = struct.unpack(f"={os.fstat(f.fileno()).st_size // 8}q", f.read())
    runs = list(zip(flat[0::3], flat[1::3], flat[2::3]))
    src = os.open(source, os.O_RDONLY)
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    if "scan" in steps:
        _scan(src, runs, int(argv[5]))
    if "clones" in steps:
        for offset, length, dest in runs:
            fcntl.ioctl(dst, FICLONERANGE, struct.pack("=qQQQ", src, offset, length, dest))
    if "writes" in steps or "copy" in steps:
        _write(src, dst, runs, read="copy" in steps)
    if "copy2" in steps:
        _copy_two_threads(src, dst, runs)
    if "zstd2" in steps:
        _decompress_two_threads(src, dst, runs, int(argv[5]))
    os.close(dst)
    os.close(src)


if __name__ == "__main__":
    main(sys.argv[1:])
