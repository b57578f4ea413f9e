"""The copy pipeline behind `qimg convert` (qemu-img convert).

    from qimg.convert import convert
    convert(["disk.raw"], "disk.qcow2", target_format="qcow2", compress=True)

One pipeline for every direction, written against the driver interface:

- a producer thread walks the sources' extents (data / zero runs through the
  whole backing chain; raw files answer with SEEK_DATA/SEEK_HOLE), reads the
  data in large coalesced requests into reused buffers (hot pages: the
  writer's copy out of them costs no page faults; mmap'd source windows
  measured 10-50% slower end to end and risked SIGBUS on a truncated
  source), and finds zero blocks of the -S granularity with numpy,
  stopping at a block's first non-zero word as qemu's buffer_is_zero does;
  where the source holds compressed clusters, READERS threads read and
  decompress chunks ahead instead (see _Job._items);
- the calling thread writes: whole runs with one `write()` each (the qcow2
  driver allocates contiguous host runs per L2 table), or, with -c, clusters
  compressed by a thread pool, written in order;
- holes are never written to a fresh target (a new raw or qcow2 image
  without a backing file reads zeros); an existing target (-n) gets its zero
  runs written as zeroes unless it is known to be zero (--target-is-zero).

Memory is bounded whatever the image size: at most QUEUE_DEPTH batches of
about CHUNK bytes sit between the threads, READ_AHEAD chunks are being read,
and the compressor keeps a bounded number of batches in flight; reads go into
READ_BUFFERS reused buffers (more are allocated only while all are in use).
The engine never prints; it reports progress through a callback.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qimg.driver import Driver
from qimg.errors import (
    BadOptionError,
    CorruptImageError,
    ImageIOError,
    ImageLockedError,
    QimgError,
    UnsupportedFeatureError,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = ["convert", "ConvertOptions", "parse_snapshot_param", "CHUNK"]

# Bytes per read request (the producer coalesces up to this): small enough
# that a chunk is still in the CPU cache when the writer copies it out
# (8 MiB measured 7-10% slower end to end on every uncompressed direction).
CHUNK = 2 << 20
COMPRESS_BATCH = 1 << 20  # guest bytes per compression task (-c)
QUEUE_DEPTH = 3  # chunks in flight between the producer and the writer
READERS = 2  # threads that read and scan data chunks ahead of the writer
READ_AHEAD = 4  # data chunks being read at once
READ_BUFFERS = 12  # reused read buffers of CHUNK bytes (_Job._buffer)
PLAN_WINDOW = 1 << 30  # guest bytes whose extents are asked for at once
MAX_PLAN_WINDOW = 1 << 50  # the same, across stretches without data (_Job._plan)
MAX_SPARSE = 16 << 20  # qemu-img's limit for -S
MAX_COROUTINES = 16  # qemu-img's limit for -m
# qemu-img convert's progress steps: a block-status request covers at most
# BDRV_REQUEST_MAX_SECTORS, and each copy request at most IO_BUF_SIZE.
QEMU_REQUEST_MAX = (2**31 - 1) // 512 * 512
QEMU_IO_BUF = 2 << 20
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")

# Run kinds of the plan.
DATA = 0  # read the source and write what it holds
ZERO = 1  # reads as zeros
SKIP = 2  # left to the target's backing file (same data there)

ProgressCallback = Callable[[int, int], None]


@dataclass
class ConvertOptions:
    """Everything qemu-img convert takes, with its defaults."""

    source_format: str | None = None
    target_format: str = "raw"
    create_options: dict[str, str] = field(default_factory=dict)
    backing_file: str | None = None
    backing_format: str | None = None
    compress: bool = False
    compression_level: str = "default"
    sparse_size: int = 4096  # -S; 0: write every byte
    coroutines: int = 8  # -m
    out_of_order: bool = False  # -W
    copy_range: bool = False  # -C: data is copied as it is, no zero detection in it
    rate_limit: int = 0  # -r: bytes of data a second, 0 for no limit
    sparse_given: bool = False  # -S was on the command line (qemu-img's explict_min_sparse)
    cache: str = "unsafe"  # -t (qemu-img convert defaults to unsafe: no fsync)
    source_cache: str = "writeback"  # -T
    force_share: bool = False  # -U
    snapshot_id: str | None = None
    snapshot_name: str | None = None
    skip_create: bool = False  # -n
    target_is_zero: bool = False
    bitmaps: bool = False
    skip_broken_bitmaps: bool = False
    salvage: bool = False

    def validate(self, nsources: int) -> None:
        """qemu-img convert's checks on the options alone, in its words."""
        if self.coroutines < 1 or self.coroutines > MAX_COROUTINES:
            raise BadOptionError(
                "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"
            )
        s = self.sparse_size
        if s < 0 or s % 512 or s > MAX_SPARSE:
            raise BadOptionError(
                "Invalid buffer size for sparse output specified. Valid sizes are multiples "
                "of 512 up to 16777216. Select 0 to disable sparse detection (fully "
                "allocates output)."
            )
        if self.copy_range:
            if self.compress:
                raise BadOptionError("Cannot enable copy offloading when -c is used")
            if self.sparse_given:
                raise BadOptionError("Cannot enable copy offloading when -S is used")
            if self.salvage:
                raise BadOptionError("Cannot use copy offloading in salvaging mode")
        for mode in (self.cache, self.source_cache):
            if mode not in CACHE_MODES:
                raise BadOptionError(f"Invalid cache option: {mode}")
        if self.target_is_zero and not self.skip_create:
            raise BadOptionError("--target-is-zero requires use of -n flag")
        if self.skip_broken_bitmaps and not self.bitmaps:
            raise BadOptionError("Use of --skip-broken-bitmaps requires --bitmaps")
        from qimg.formats.qcow2.compress import COMPRESSION_LEVELS

        if self.compression_level not in COMPRESSION_LEVELS:
            raise BadOptionError(
                f"Invalid compression level '{self.compression_level}' "
                f"(allowed: {', '.join(COMPRESSION_LEVELS)})"
            )
        if nsources < 1:
            raise BadOptionError("Expecting image file name")
        if nsources > 1 and (self.backing_file or self.create_options.get("backing_file")):
            raise BadOptionError(
                "Having a backing file for the target makes no sense when concatenating "
                "multiple input images"
            )


def parse_snapshot_param(text: str) -> tuple[str | None, str | None]:
    """-l 'snapshot.id=ID,snapshot.name=NAME' or a bare NAME: (id, name)."""
    if not text.startswith("snapshot."):
        return None, text
    from qimg.options import split_options

    sid = name = None
    for key, value in split_options(text):
        if key == "snapshot.id":
            sid = value
        elif key == "snapshot.name":
            name = value
        else:
            raise BadOptionError(f"Invalid parameter '{key}'")
    return sid, name


def convert(
    sources: list[str],
    target: str,
    options: ConvertOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    **kw,
) -> None:
    """Copy the concatenation of `sources` into `target`.

    Options are those of `ConvertOptions`, given as an object or as keyword
    arguments (e.g. ``target_format="qcow2", compress=True,
    compression_level="fast"``). `progress(done, total)` is called with
    qemu-img's progress units: bytes of data to copy (the source's
    allocated data, every byte with sparse_size 0), counted a copy request
    at a time as qemu-img counts them, so that the percentages printed are
    qemu-img's. A new target is removed again when the copy fails; an
    existing one (skip_create, -n) is left as it is.
    """
    o = options or ConvertOptions()
    for key, value in kw.items():
        if not hasattr(o, key):
            raise TypeError(f"convert() got an unexpected keyword argument '{key}'")
        setattr(o, key, value)
    o.validate(len(sources))
    opened: list[Driver] = []
    src: _Concat | None = None
    try:
        for path in sources:
            opened.append(_open_source(path, o))
        src = _Concat(opened)
        if o.snapshot_id is not None or o.snapshot_name is not None:
            # qemu-img loads the snapshot in every source.
            src = _Concat([_snapshot_view(d, o.snapshot_id, o.snapshot_name) for d in opened])
        _check_target_options(o)
        created = False
        if not o.skip_create:
            _create_while_loading(target, src.size, o)
            created = True
        try:
            _copy_into(src, target, opened, o, progress)
        except BaseException:
            if created:
                _remove(target)
            raise
    finally:
        if src is not None and src.parts and src.parts[0][1] not in opened:
            for _start, view in src.parts:
                view.close()
        for img in opened:
            img.close()


# --- opening ---------------------------------------------------------------------


def _open_source(path: str, o: ConvertOptions) -> Driver:
    from qimg.api import open_image

    try:
        _need_name(path)
        return open_image(
            path, o.source_format, force_share=o.force_share, cache_unsafe=True, lock=True
        )
    except QimgError as exc:
        # qemu-img: "Could not open 'X': " before what the opener said,
        # which for a file that cannot be opened names it once more.
        exc.args = (f"Could not open '{path}': {exc}",)
        raise


def _need_name(path: str) -> None:
    """An empty file name is refused by QEMU's file driver before any open."""
    if not path:
        raise QimgError("The 'file' block driver requires a file name")


def _prefix(exc: QimgError, prefix: str) -> None:
    msg = str(exc)
    if not msg.startswith(prefix):
        exc.args = (prefix + msg,)


def _snapshot_view(image: Driver, sid: str | None, name: str | None) -> Driver:
    if image.format_name != "qcow2":
        raise UnsupportedFeatureError(
            f"Failed to load snapshot: Block format '{image.format_name}' used by device "
            "'' does not support temporarily loading internal snapshots"
        )
    from qimg.formats.qcow2.snapshot import open_snapshot_view

    try:
        return open_snapshot_view(image, sid, name)
    except QimgError as exc:
        _prefix(exc, "Failed to load snapshot: ")
        raise


def _check_target_options(o: ConvertOptions) -> None:
    """The checks qemu-img makes before creating the target."""
    from qimg.api import FORMATS

    if o.target_format not in FORMATS:
        raise BadOptionError(f"Unknown file format '{o.target_format}'")
    if o.target_format == "qcow":  # qimg reads qcow (version 1) images only
        verb = "written" if o.skip_create else "created"
        raise BadOptionError(f"qcow images can be read but not {verb} by qimg")
    if o.skip_create:
        return
    # Unknown or malformed -o options fail before anything is created
    # (qemu_opts_do_parse), unwrapped; validation failures come later.
    from qimg.create import _typed, option_list

    descs = {d.name: d for d in option_list(o.target_format)}
    for key, text in o.create_options.items():
        if key not in descs:
            raise BadOptionError(f"Invalid parameter '{key}'")
        _typed(descs[key], text)
    if o.backing_file and o.target_format != "qcow2":
        raise BadOptionError(f"Backing file not supported for file format '{o.target_format}'")
    # -B and -F are -o backing_file and backing_fmt under other names.
    backing = o.backing_file or o.create_options.get("backing_file")
    if backing and not (o.backing_format or o.create_options.get("backing_fmt")):
        raise BadOptionError("Use of backing file requires explicit backing format")
    if o.compress and o.target_format != "qcow2":
        raise BadOptionError("Compression not supported for this file format")
    if o.compress and o.create_options.get("preallocation", "off") != "off":
        raise BadOptionError("Compression and preallocation not supported at the same time")
    if o.bitmaps and o.target_format != "qcow2":
        raise BadOptionError(f"Format driver '{o.target_format}' does not support bitmaps")


def _create_target(target: str, size: int, o: ConvertOptions) -> None:
    from qimg.api import create_image
    from qimg.filenames import create_path

    create_path(target)  # an unknown protocol fails before creation, unprefixed
    opts = dict(o.create_options)
    opts.pop("size", None)  # qemu-img convert sizes the target after its sources
    if o.backing_format and not o.backing_file:
        opts["backing_fmt"] = o.backing_format  # create rejects it with qemu's words
    try:
        create_image(
            target,
            o.target_format,
            size,
            opts,
            backing_file=o.backing_file,
            backing_fmt=o.backing_format if o.backing_file else None,
            # As qemu-img: the backing file is first opened with the new
            # target ("Could not open 'T': Could not open backing file: ..."),
            # which is then removed again.
            check_backing=False,
        )
    except QimgError as exc:
        # Never remove anything here: a target that could not be created may
        # be someone else's file (e.g. one of the sources, locked by us).
        err: QimgError = exc
        if not os.path.isdir(os.path.dirname(os.path.abspath(target))):
            err = ImageIOError(f"Could not create '{target}': No such file or directory")
        msg = str(err).removeprefix(f"{target}: ")
        err.args = (f"{target}: error while converting {o.target_format}: {msg}",)
        raise err from None


def _create_while_loading(target: str, size: int, o: ConvertOptions) -> None:
    """_create_target in a thread while this one loads what the copy needs.

    Replacing an existing target frees its pages first (~0.13 s a GiB on
    tmpfs, all in the kernel); numpy and the pipeline's modules (~50 ms)
    load meanwhile. Nothing is loaded before every check that qemu-img
    makes ahead of creating the target has passed, so a failure still
    leaves the file system as it was."""
    failure: list[BaseException] = []

    def create() -> None:
        try:
            _create_target(target, size, o)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=create, name="qimg-convert-create")
    thread.start()
    try:
        _load_pipeline()
    except BaseException:
        thread.join()
        if not failure:
            _remove(target)  # made here, and no copy will follow
        raise
    thread.join()
    if failure:
        raise failure[0]


def _load_pipeline() -> None:
    import concurrent.futures  # noqa: F401

    import numpy  # noqa: F401

    import qimg.formats.qcow2.cluster  # noqa: F401
    import qimg.formats.qcow2.refcount  # noqa: F401


def _remove(path: str) -> None:
    from qimg.filenames import create_path

    try:
        os.unlink(create_path(path))
    except (OSError, QimgError):
        pass


def _open_target(target: str, o: ConvertOptions) -> Driver:
    from qimg.api import open_image

    fmt = o.target_format
    try:
        _need_name(target)
        return open_image(target, fmt, writable=True, cache_unsafe=o.cache == "unsafe")
    except ImageLockedError:
        raise  # already in the words qemu-img prints ("Could not open 'T': ...")
    except QimgError as exc:
        # qemu-img names the target before what the opener said, which for
        # a file that cannot be opened names it once more.
        exc.args = (f"Could not open '{target}': {exc}",)
        raise


# --- the copy ---------------------------------------------------------------------


def _copy_into(
    src: Driver,
    target_path: str,
    opened: list[Driver],
    o: ConvertOptions,
    progress: ProgressCallback | None,
) -> None:
    tgt = _open_target(target_path, o)
    try:
        bitmaps = _check_bitmaps(opened, tgt, o) if o.bitmaps else None
        if o.skip_create and tgt.size < src.size:
            raise QimgError("output file is smaller than input file")
        if o.compress and tgt.format_name != "qcow2":
            raise BadOptionError("Compression not supported for this file format")
        job = _Job(src, tgt, o, progress)
        job.run()
        if bitmaps is not None:
            from qimg.formats.qcow2.bitmap import copy_bitmaps

            copy_bitmaps(tgt, bitmaps)  # stored when the target is closed
        if o.cache != "unsafe":
            tgt.flush()
    finally:
        tgt.close()


def _check_bitmaps(opened: list[Driver], tgt: Driver, o: ConvertOptions) -> list:
    """qemu-img's convert_check_bitmaps and the target's support: the source's
    persistent bitmaps (bitmap.Bitmap), loaded before anything is copied."""
    from qimg.formats.qcow2.bitmap import bitmaps_to_copy, supports_bitmaps

    bitmaps = bitmaps_to_copy(opened, o.skip_broken_bitmaps)
    if not supports_bitmaps(tgt):
        raise BadOptionError(f"Format driver '{tgt.format_name}' does not support bitmaps")
    return bitmaps


class _Concat(Driver):
    """Several sources end to end, each rounded up to 512 bytes as qemu-img
    counts them (blk_nb_sectors); the padding reads as zeros."""

    format_name = "concat"

    def __init__(self, parts: list[Driver]):
        self.parts = []
        pos = 0
        for d in parts:
            self.parts.append((pos, d))
            pos += -(-d.size // 512) * 512
        self.size = pos
        self.filename = parts[0].filename if parts else ""
        self.writable = False

    def _pieces(self, offset: int, length: int):
        """(driver, local offset, length inside the driver, pad) per part."""
        end = offset + length
        for i, (start, d) in enumerate(self.parts):
            stop = self.parts[i + 1][0] if i + 1 < len(self.parts) else self.size
            lo, hi = max(offset, start), min(end, stop)
            if lo >= hi:
                continue
            inside = max(0, min(hi, start + d.size) - lo)
            yield d, lo - start, inside, hi - lo - inside, lo

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        for d, local, inside, pad, lo in self._pieces(offset, len(view)):
            dst = view[lo - offset : lo - offset + inside + pad]
            if inside:
                d.readinto(local, dst[:inside])
            if pad:
                dst[inside:] = bytes(pad)

    def allocated_extents(self, offset: int, length: int) -> list[tuple[int, int, bool, bool]]:
        out = []
        for d, local, inside, pad, lo in self._pieces(offset, length):
            if inside:
                for s, n, is_data, is_zero in d.allocated_extents(local, inside):
                    out.append((s - local + lo, n, is_data, is_zero))
            if pad:
                out.append((lo + inside, pad, False, True))
        return out

    def top_extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(offset, length, kind) of the top image only: UNALLOCATED is SKIP."""
        from qimg.formats.qcow2.cluster import COMPRESSED, UNALLOCATED
        from qimg.formats.qcow2.cluster import DATA as X_DATA

        out = []
        for d, local, inside, pad, lo in self._pieces(offset, length):
            if inside:
                for e in d.block_status(local, inside):
                    kind = (
                        DATA
                        if e.kind in (X_DATA, COMPRESSED)
                        else SKIP
                        if e.kind == UNALLOCATED
                        else ZERO
                    )
                    out.append((e.offset - local + lo, e.length, kind))
            if pad:
                out.append((lo + inside, pad, ZERO))
        return out

    def close(self) -> None:
        pass


def _block_status(
    src, offset: int, length: int, salvage: bool
) -> list[tuple[int, int, bool, bool]]:
    """src.allocated_extents; a mapping that fails as QEMU's block status
    fails (EIO at a guest offset) is reported in qemu-img convert's words,
    or with --salvage, the range is read (what fails to read is zeros)."""
    try:
        return src.allocated_extents(offset, length)
    except CorruptImageError as exc:
        if exc.guest_offset is None:
            raise
        if salvage:
            return [(offset, length, True, False)]
        raise ImageIOError(
            f"error while reading block status at offset {exc.guest_offset}: {exc}"
        ) from None


def _merge(runs) -> list[list[int]]:
    """Merge adjacent (offset, length, kind) runs of one kind: [[start, end, kind]]."""
    out: list[list[int]] = []
    for s, n, kind in runs:
        if n <= 0:
            continue
        if out and out[-1][2] == kind and out[-1][1] == s:
            out[-1][1] = s + n
        else:
            out.append([s, s + n, kind])
    return out


def _clip(runs: list[list[int]], lo: int, hi: int) -> list[list[int]]:
    """The parts of [start, end, kind] runs inside [lo, hi)."""
    return [[max(s, lo), min(e, hi), k] for s, e, k in runs if s < hi and e > lo]


def _align_data(runs: list[list[int]], align: int, lo: int, hi: int) -> list[list[int]]:
    """Grow DATA runs outwards to `align` (clipped to [lo, hi)); what they
    swallow is read too (it reads as what the source holds there)."""
    if align <= 1:
        return runs
    out: list[list[int]] = []
    for s, e, kind in runs:
        if kind == DATA:
            s = max(lo, s // align * align)
            e = min(hi, -(-e // align) * align)
        if out and s < out[-1][1]:
            prev = out[-1]
            if kind == DATA:
                if prev[2] == DATA:
                    prev[1] = max(prev[1], e)
                    continue
                prev[1] = s  # a data run takes over the tail of a zero run
                if prev[1] <= prev[0]:
                    out.pop()
            else:
                s = out[-1][1]  # the previous data run took our head
                if s >= e:
                    continue
        if out and out[-1][2] == kind and out[-1][1] == s:
            out[-1][1] = e
        else:
            out.append([s, e, kind])
    return out


def _in_sectors(runs) -> list[tuple[int, int, int]]:
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


class _StatusSource:
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


class _Job:
    """One conversion: plan, produce (thread), write (this thread)."""

    def __init__(self, src: _Concat, tgt: Driver, o: ConvertOptions, progress):
        self.src = src
        self.tgt = tgt
        self.o = o
        self.progress = progress
        self.total = src.size
        self.marks: deque[tuple[int, int]] = deque()  # see _progress_plan
        self.counted = 0
        self.qcow2 = tgt.format_name == "qcow2"
        self.cluster_size = tgt.geo.cluster_size if self.qcow2 else 512
        self.sparse = o.sparse_size > 0
        # -C copies data as it is (qemu-img's copy_range): zero blocks in
        # data are written, only holes are skipped.
        self.detect_zeros = self.sparse and not o.copy_range
        self.compress = o.compress
        # grain: what the target allocates at once; data runs are read and
        # written in whole grains (a partial cluster would be COWed anyway).
        # block: zero-detection granularity, qemu-img's alignment: -S rounded
        # down to a power of two, at least a grain. Like qemu-img, a data
        # run is rounded out to grains but never to blocks beyond what the
        # source holds, and a zero gap after data shorter than -S is written
        # as data (min_zero, qemu-img's is_allocated_sectors_min).
        if not self.qcow2:
            self.grain = 512
        elif self.compress:
            self.grain = self.cluster_size
        elif o.skip_create or o.create_options.get("preallocation", "off") != "off":
            # Clusters may exist already (-n) or do (preallocation): written
            # in place, at qemu-img's alignment (the target's request
            # alignment), so what lies past -S's data in a cluster is kept.
            self.grain = 512
        else:
            self.grain = tgt.geo.subcluster_size if tgt.geo.extended_l2 else self.cluster_size
        s = o.sparse_size or 512
        self.min_zero = s
        self.block = max(self.grain, 1 << (s.bit_length() - 1))
        if self.compress:
            self.block = self.cluster_size
        # Zero runs: a fresh target (no backing file) already reads zeros.
        self.backing = None
        self.skip_same_backing = False
        if self.qcow2 and tgt.backing is not None:
            self._setup_backing()
        self.zero_init = (not o.skip_create or o.target_is_zero) and self.backing is None
        self.chunk = max(self.block, CHUNK // self.block * self.block)
        self.pool: list[np.ndarray] = []  # see _buffer
        self.readers = None  # ThreadPoolExecutor of READERS threads, while running
        self.compressing_sources: list[Driver] = []  # see _decompressing
        self.use_readers = False  # chunks are read by the reader threads (_decompressing)
        self.limit = _RateLimit(o.rate_limit)

    def _setup_backing(self) -> None:
        """-B: only what differs from the target's backing file is written."""
        from qimg.api import open_image

        b = self.tgt.backing
        self.backing = open_image(b.filename, b.format_name, force_share=True)
        parts = self.src.parts
        if len(parts) == 1 and not (self.o.snapshot_id or self.o.snapshot_name):
            top = parts[0][1]
            tb = getattr(top, "backing", None)
            same = tb is not None and os.path.realpath(tb.filename) == os.path.realpath(b.filename)
            self.skip_same_backing = same and tb.size == b.size

    # --- planning (producer thread) ----------------------------------------------

    def _plan(self) -> Iterator[list[int]]:
        """[start, end, kind] runs covering the source, window by window.

        A window that holds no data makes the next one twice as large (up
        to MAX_PLAN_WINDOW), so a sparse image of petabytes takes a few
        dozen calls, not one per GiB; data is planned in PLAN_WINDOW
        windows, which bounds the runs held at once."""
        src = self.src
        align = self.grain
        lo, window = 0, PLAN_WINDOW
        while lo < self.total:
            hi = min(self.total, lo + window)
            if not self.sparse and self.backing is None:
                yield [lo, hi, DATA]
                lo = hi
                continue
            if self.skip_same_backing:
                runs = _merge(src.top_extents(lo, hi - lo))
            else:
                runs = _merge(
                    (s, n, DATA if is_data else ZERO)
                    for s, n, is_data, _z in _block_status(src, lo, hi - lo, self.o.salvage)
                )
            if not self.sparse:
                runs = [[s, e, DATA if k == ZERO else k] for s, e, k in runs]
            first_data = next((r[0] for r in runs if r[2] == DATA), None)
            if first_data is not None and window > PLAN_WINDOW:
                # Only the data-free head of a large window is kept; the
                # data is planned again in small windows.
                cut = max(lo, first_data // PLAN_WINDOW * PLAN_WINDOW)
                yield from _clip(runs, lo, cut)
                lo, window = cut, PLAN_WINDOW
                continue
            yield from _align_data(runs, align, lo, hi)
            lo = hi
            window = PLAN_WINDOW if first_data is not None else min(2 * window, MAX_PLAN_WINDOW)

    def _items(self) -> Iterator[tuple[int, int, memoryview | None]]:
        """(offset, length, data or None for zeros) to write, in order;
        SKIP runs become (offset, length, False) progress-only items.

        Data chunks are read and scanned in this (the producer) thread while
        the writer writes: two threads for two copies. Once the source turns
        out to hold compressed clusters, decompression is the work, and the
        reader threads take the chunks instead, up to READ_AHEAD of them
        ahead of the one being handed on (measured on 2 cores: reader
        threads make a plain copy ~20% slower and a zstd source ~10% faster)."""
        ahead: deque = deque()  # lists of items, or futures of them, in order
        for piece in self._pieces():
            if isinstance(piece, tuple):
                offset, length = piece
                buf = self._buffer(length)
                if self._decompressing():
                    piece = self.readers.submit(self._data_items, offset, buf)
                else:
                    piece = self._data_items(offset, buf)
            ahead.append(piece)
            if len(ahead) > READ_AHEAD:
                yield from _resolved(ahead.popleft())
        while ahead:
            yield from _resolved(ahead.popleft())

    def _decompressing(self) -> bool:
        """Whether chunks go to the reader threads: once a source has met
        compressed clusters. From then on each reader decompresses its own
        chunk's clusters; the image does not split them over more threads."""
        if self.use_readers:
            return True
        if any(image.read_compressed for image in self.compressing_sources):
            for image in self.compressing_sources:
                image.split_decompression = False
            self.use_readers = True
        return self.use_readers

    def _pieces(self) -> Iterator[list | tuple[int, int]]:
        """Ready lists of items, and (offset, length) data chunks to read."""
        for s, e, kind in self._plan():
            if kind == SKIP:
                yield [(s, e - s, False)]
            elif kind == ZERO:
                yield list(self._zero_run(s, e))
            else:
                pos = s
                while pos < e:
                    n = min(e - pos, self.chunk - pos % self.chunk)
                    yield pos, n
                    pos += n

    def _zero_run(self, s: int, e: int):
        if self.backing is None:
            yield s, e - s, None
            return
        # Zeros hide backing data only where the backing has some.
        bsize = self.backing.size
        pos = s
        if s < bsize:
            for bs, bn, is_data, _z in self.backing.allocated_extents(s, min(e, bsize) - s):
                yield bs, bn, None if is_data else False
            pos = min(e, bsize)
        if pos < e:
            yield pos, e - pos, False

    def _read(self, offset: int, buf: np.ndarray) -> None:
        try:
            self.src.readinto(offset, buf)
        except QimgError as exc:
            if not self.o.salvage and getattr(exc, "guest_offset", None) is not None:
                # qemu-img asks for block status before any read, even
                # with -S 0: a mapping that fails, fails there.
                raise ImageIOError(
                    f"error while reading block status at offset {exc.guest_offset}: {exc}"
                ) from None
            if not self.o.salvage:
                raise ImageIOError(f"error while reading at byte {offset}: {exc}") from None
            self._salvage(offset, buf)

    def _buffer(self, length: int) -> np.ndarray:
        """A read buffer, reused once nothing refers to it any more.

        Uninitialized memory: readinto fills every byte. Fresh memory costs
        the kernel a fault and a zero-fill per page (~0.3 s a GiB), so up to
        READ_BUFFERS chunk buffers are kept. Invariant: a pooled array is
        handed out again only when its sole references are the pool's own
        (every view, slice or memoryview of it holds one more), and only the
        producer thread takes slices of pooled arrays (reader threads and
        writes use the slice they are handed, which holds its reference), so
        no reader or pending write still uses it.
        """
        import numpy as np

        if length <= self.chunk:
            for arr in self.pool:
                if sys.getrefcount(arr) <= 3:  # the list, `arr`, the argument
                    return arr[:length]
            if len(self.pool) < READ_BUFFERS:
                arr = np.empty(self.chunk, dtype=np.uint8)
                self.pool.append(arr)
                return arr[:length]
        return np.empty(length, dtype=np.uint8)

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

    def _data_items(self, offset: int, buf: np.ndarray) -> list:
        """The items of one data chunk, read into `buf` (a reader thread)."""
        self._read(offset, buf)
        return list(self._data_chunk(offset, buf))

    def _data_chunk(self, offset: int, buf: np.ndarray):
        import numpy as np

        length = len(buf)
        view = memoryview(buf)
        if not self.detect_zeros and self.backing is None:
            yield offset, length, view
            return
        B = self.block
        # Blocks lie on multiples of B in the guest; a chunk that starts or
        # ends inside one (at a data run's edge) has a part-block there.
        head = min(length, (-offset) % B)
        full = (length - head) // B
        tail = length - head - full * B
        sizes = ([head] if head else []) + [B] * full + ([tail] if tail else [])
        bounds = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))).tolist()
        nblocks = len(sizes)
        first = 1 if head else 0  # index of the first whole block
        words = np.frombuffer(buf, dtype=np.uint8)
        zero = np.zeros(nblocks, dtype=bool)  # block reads as zeros
        if self.detect_zeros:
            part0, w, part1 = _cut(words, head, full, B)
            if full:
                # Like qemu's buffer_is_zero, stop at the first non-zero word:
                # a block whose first or last word is non-zero is data (one
                # cache line read per block); only the others are scanned in full.
                cand = np.flatnonzero((w[:, 0] | w[:, -1]) == 0)
                if len(cand):
                    zero[first + cand] = w[cand].max(axis=1) == 0
            if head:
                zero[0] = not part0.any()
            if tail:
                zero[-1] = not part1.any()
            if self.min_zero > B:
                _absorb_short_gaps(zero, bounds, self.min_zero)
        if self.backing is not None:  # block must be written
            keep = self._differs(offset, words, bounds, head, full, tail)
        else:
            keep = np.ones(nblocks, dtype=bool)
        # Runs of (keep, zero) states become one item each.
        state = keep.astype(np.int8) * 2 + zero.astype(np.int8)
        edges = np.flatnonzero(state[1:] != state[:-1]) + 1
        starts = [0, *edges.tolist()]
        stops = [*edges.tolist(), nblocks]
        for a, b in zip(starts, stops):
            lo, hi = bounds[a], bounds[b]
            st = int(state[a])
            if not st & 2:
                yield offset + lo, hi - lo, False  # same as the backing file
            elif st & 1:
                yield offset + lo, hi - lo, None
            else:
                yield offset + lo, hi - lo, view[lo:hi]

    def _differs(self, offset, words, bounds, head, full, tail) -> np.ndarray:
        """Blocks (as _data_chunk cuts them) whose source data differs from
        the target's backing file."""
        import numpy as np

        B = self.block
        length = len(words)
        other = bytearray(length)
        avail = max(0, min(length, self.backing.size - offset))
        if avail:
            self.backing.readinto(offset, memoryview(other)[:avail])
        mine = _cut(words, head, full, B)
        theirs = _cut(np.frombuffer(other, dtype=np.uint8), head, full, B)
        out = np.empty(len(bounds) - 1, dtype=bool)
        first = 1 if head else 0
        if full:
            out[first : first + full] = (mine[1] != theirs[1]).any(axis=1)
        if head:
            out[0] = bool((mine[0] != theirs[0]).any())
        if tail:
            out[-1] = bool((mine[2] != theirs[2]).any())
        return out

    # --- the producer thread ----------------------------------------------------

    def _batches(self) -> Iterator[list]:
        """Items grouped so that each batch holds at most about CHUNK bytes of
        data: the queue between the threads is bounded in bytes, not items."""
        batch: list = []
        held = 0
        for item in self._items():
            batch.append(item)
            data = item[2]
            if data is not None and data is not False:
                held += item[1]
            if held >= self.chunk or len(batch) >= 4096:
                yield batch
                batch, held = [], 0
        if batch:
            yield batch

    def _start_producer(self) -> tuple[queue.Queue, threading.Event, threading.Thread]:
        q: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self._batches():
                    if not put(batch):
                        return
                put(done)
            except BaseException as exc:  # handed to the writer thread
                put(exc)

        thread = threading.Thread(target=produce, name="qimg-convert-read", daemon=True)
        thread.start()
        self._done_marker = done
        return q, stop, thread

    def _consume(self, q: queue.Queue) -> Iterator[tuple[int, int, object]]:
        while True:
            batch = q.get()
            if batch is self._done_marker:
                return
            if isinstance(batch, BaseException):
                raise batch
            yield from batch

    # --- the writer (calling thread) ---------------------------------------------

    def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self.progress is not None:
            self.marks, self.counted = self._progress_plan()
        self.compressing_sources = list(_chain(self.src))
        readers = min(READERS, os.cpu_count() or 1)
        self.readers = ThreadPoolExecutor(readers, thread_name_prefix="qimg-convert-read")
        q, stop, thread = self._start_producer()
        try:
            items = self._consume(q)
            if self.compress:
                self._write_compressed(items)
            else:
                for offset, length, data in items:
                    self._write(offset, length, data)
        finally:
            stop.set()
            thread.join()
            self.readers.shutdown(wait=True, cancel_futures=True)
            if self.backing is not None:
                self.backing.close()
        self._report(self.total)

    def _report(self, pos: int) -> None:
        """The copy has reached guest offset `pos`: report each of qemu-img's
        copy requests that starts before it (qemu-img counts a request as
        it starts it)."""
        marks = self.marks
        while marks and marks[0][0] < pos:
            self.progress(marks.popleft()[1], self.counted)

    def _progress_plan(self) -> tuple[deque[tuple[int, int]], int]:
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
        cs = self.cluster_size
        io_buf = cs if self.compress else QEMU_IO_BUF
        extents = self._extents()
        pos = next_status = 0
        kind = ZERO
        while pos < self.total:
            if next_status <= pos:
                kind, next_status = extents.status(pos)
            n = next_status - pos
            if kind == DATA or (kind == ZERO and not self.sparse):
                n = min(n, io_buf)
            if self.compress:
                if n < cs:
                    n, kind = min(cs, self.total - pos), DATA
                else:
                    n = n // cs * cs
            if kind == DATA or (kind == ZERO and not self.sparse):
                done += n
                marks.append((pos, done))
            pos += n
        return marks, done

    def _extents(self) -> _StatusSource:
        """qemu-img's block status answers over the sources."""
        parts = []
        for i, (start, d) in enumerate(self.src.parts):
            end = self.src.parts[i + 1][0] if i + 1 < len(self.src.parts) else self.total
            align = d.geo.cluster_size if d.format_name == "qcow2" else 512
            if self.backing is not None or self.skip_same_backing:
                runs = self.src.top_extents(start, end - start)
            else:
                runs = (
                    (s, n, DATA if is_data else ZERO)
                    for s, n, is_data, _z in _block_status(
                        self.src, start, end - start, self.o.salvage
                    )
                )
            parts.append((start, end, align, _in_sectors(runs)))
        return _StatusSource(parts)

    def _write(self, offset: int, length: int, data) -> None:
        if data is None:
            if not self.zero_init:
                self._write_zeroes(offset, length)
        elif data is not False:
            try:
                self.tgt.write(offset, data)
            except QimgError as exc:
                raise ImageIOError(f"error while writing at byte {offset}: {exc}") from None
            self.limit.account(length)
        self._report(offset + length)

    def _write_zeroes(self, offset: int, length: int) -> None:
        # qemu-img: BDRV_REQ_MAY_UNMAP unless the target has a backing file.
        self.tgt.write_zeroes(offset, length, unmap=self.backing is None)

    def _write_compressed(self, items) -> None:
        """-c: whole clusters through the compressor pool, a batch of
        consecutive clusters per task, written in order: each run of
        compressed clusters with one write_compressed_many, each run of
        clusters stored as they are with one write."""
        from qimg.formats.qcow2.compress import ClusterCompressor

        tgt = self.tgt
        cs = self.cluster_size
        workers = min(self.o.coroutines, os.cpu_count() or 1)
        per_task = max(1, COMPRESS_BATCH // cs) * cs
        pending: deque[tuple[int, int, memoryview]] = deque()

        def batches():
            for offset, length, data in items:
                if data is None or data is False:
                    if data is None and not self.zero_init:
                        self._write_zeroes(offset, length)
                    if not pending:
                        self._report(offset + length)
                    continue
                for pos in range(0, length, per_task):
                    piece = data[pos : pos + per_task]
                    n = len(piece)
                    clusters = [piece[i : i + cs] for i in range(0, n, cs)]
                    if n % cs:  # the image's last cluster, zero-padded as QEMU does
                        clusters[-1] = bytes(clusters[-1]) + bytes(cs - n % cs)
                    pending.append((offset + pos, n, piece))
                    yield clusters

        with ClusterCompressor(
            tgt.header.compression_type, self.o.compression_level, workers
        ) as pool:
            for results in pool.map_batches(batches()):
                offset, n, piece = pending.popleft()
                self._store_batch(offset, n, piece, results)
                self.limit.account(n)
                self._report(offset + n)

    def _store_batch(self, offset: int, n: int, piece: memoryview, results: list) -> None:
        """Write one batch: `results[i]` is cluster i compressed, or None to
        store it as it is (the first n bytes of `piece` are the data)."""
        cs = self.cluster_size
        tgt = self.tgt
        a = 0
        count = len(results)
        for b in range(1, count + 1):
            if b < count and (results[b] is None) == (results[a] is None):
                continue
            if results[a] is None:
                tgt.write(offset + a * cs, piece[a * cs : min(n, b * cs)])
            else:
                tgt.write_compressed_many(offset + a * cs, results[a:b])
            a = b


class _RateLimit:
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


def _cut(words: np.ndarray, head: int, full: int, block: int) -> tuple:
    """A chunk's bytes as (the part-block before the first block boundary,
    the `full` whole blocks as rows of 64-bit words, the part-block after)."""
    end = head + full * block
    rows = words[head:end].view("<u8").reshape(full, block // 8)
    return words[:head], rows, words[end:]


def _absorb_short_gaps(zero: np.ndarray, bounds: list[int], min_zero: int) -> None:
    """Runs of zero blocks that follow data and hold fewer than `min_zero`
    bytes become data (zero[i] covers bytes bounds[i]:bounds[i+1])."""
    import numpy as np

    edges = np.diff(np.concatenate(([0], zero.astype(np.int8), [0])))
    for a, b in zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()):
        if a > 0 and bounds[b] - bounds[a] < min_zero:
            zero[a:b] = False


def _resolved(piece) -> list:
    """A list of items, or the list a reader's future holds."""
    return piece if isinstance(piece, list) else piece.result()


def _chain(src: _Concat) -> Iterator[Driver]:
    """Every image the sources read from that may hold compressed clusters
    (qcow2: `read_compressed`), backing files included."""
    for _start, image in src.parts:
        while image is not None:
            if hasattr(image, "read_compressed"):
                yield image
            image = getattr(image, "backing", None)
