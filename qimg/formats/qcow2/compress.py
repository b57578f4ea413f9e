"""qcow2 cluster codecs: where `compression_type` becomes an implementation.

This is the only module that maps a header's compression_type to a codec
(STYLE.md item 10). It ports the compression half of QEMU's
block/qcow2-threads.c and the decision in block/qcow2.c
(qcow2_co_pwritev_compressed_task) of whether a cluster is stored compressed.

QEMU's behaviour, which qimg keeps:

- zlib (compression_type 0): raw deflate, no zlib header, a 4 KiB window:
  ``deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY)``
  in qcow2_zlib_compress.
- zstd (compression_type 1): one zstd frame per cluster, made by a single
  ``ZSTD_compressStream2(..., ZSTD_e_end)`` call on a fresh context at the
  default level (3), no checksum. Because the whole input is given to that
  first ZSTD_e_end call, libzstd records the content size in the frame header
  (checked against qemu-img output in tests/test_compress.py).
- The compressor writes into a buffer of cluster_size - 1 bytes. When the
  result does not fit (-ENOMEM), QEMU writes the cluster uncompressed; that
  is `compress_cluster` returning None. Any other compression failure fails
  the write. For zlib "fits" means at most cluster_size - 2 bytes: see
  `max_compressed_size`.
- The compressed descriptor counts 512-byte sectors, so the bytes read back
  may run past the end of the stream. qcow2_zlib_decompress and
  qcow2_zstd_decompress must produce exactly cluster_size bytes from a prefix
  of the input and ignore the rest.

What qimg adds: a choice of speed ('fast' | 'default' | 'best') among the
installed deflate libraries and zstd levels (measured with bench/codecs.py;
the numbers are in the comments by _ZLIB_CHOICES and _ZSTD_CHOICES), and
thread pools
(`ClusterCompressor`, `ClusterDecompressor`) since zlib, zlib-ng, isal and
zstandard all release the GIL while they work.
"""

from __future__ import annotations

import importlib
import os
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Generic, TypeVar

from qimg.errors import CorruptImageError, UnsupportedFeatureError
from qimg.formats.qcow2.layout import (
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_COMPRESSION_TYPE_ZSTD,
)

if TYPE_CHECKING:
    from concurrent.futures import Future

__all__ = [
    "COMPRESSION_LEVELS",
    "ClusterCompressor",
    "ClusterDecompressor",
    "compress_cluster",
    "compressor_name",
    "decompress_cluster",
    "decompress_many",
    "deflate_backends",
    "deflate_raw",
    "inflate_raw",
    "max_compressed_size",
]

COMPRESSION_LEVELS = ("fast", "default", "best")

# --- zlib: raw deflate -------------------------------------------------------

# qcow2_zlib_compress: deflateInit2(&strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, ...)
ZLIB_WBITS = -12  # raw deflate (no header), 4 KiB window
ZLIB_MEMLEVEL = 9  # memLevel changes the output bytes, not the format

# qcow2_zlib_decompress calls inflateInit2(-12) but then inflates the whole
# cluster in one inflate(Z_FINISH) call into one cluster_size buffer. Within
# one call zlib resolves back-references against the output buffer itself,
# so QEMU reads streams whose distances exceed 4 KiB as long as they stay
# inside the cluster (checked with qemu-img 7.2: a -15 stream with 15000-byte
# distances at output offset 43000 reads back correctly). Python's
# decompressobj fills its output in blocks, so at wbits -12 it rejects such a
# stream where a match crosses a block boundary ("invalid distance too far
# back"). Inflating with a 32 KiB window (-15) accepts exactly what QEMU
# accepts: every distance deflate can encode, unless it points before the
# start of the cluster, which is an error either way.
ZLIB_INFLATE_WBITS = -15

# The deflate libraries qimg can use. The name is what compressor_name()
# reports and what deflate_raw()/inflate_raw() accept.
_DEFLATE_MODULES = {
    "zlib": "zlib",  # CPython's stdlib: the same zlib QEMU links (byte-identical output)
    "zlib-ng": "zlib_ng.zlib_ng",  # python-zlib-ng
    "isal": "isal.isal_zlib",  # python-isal (Intel ISA-L igzip), levels 0-3
}

# Every backend here honours wbits -12 for compression: zlib and zlib-ng limit
# match distances to the window as zlib always has, and python-isal maps
# wbits -12 to ISA-L's hist_bits = 12, which bounds its match distances to
# 4 KiB (tests/test_compress.py checks each backend on data that repeats every
# 4097 bytes: it must not compress). A backend that could not honour a 4 KiB
# window would not be allowed here: QEMU's own reader is lenient (see
# ZLIB_INFLATE_WBITS) but the format is specified with a 4 KiB window.

# Choices per qimg level name: (backend, level, memLevel) candidates, the
# first installed one wins. Measured with bench/codecs.py on 64 KiB clusters
# of text / random / binaries (32 / 16 / 96 MiB): CPU-time MB/s on one core,
# and stored size relative to stdlib zlib 6, memLevel 9 (qemu-img's output)
# on text / binaries (random data is stored as is by every candidate):
#
#   zlib 6 (QEMU)     50 /  70 /  42 MB/s    +0.00% / +0.00%
#   zlib 5, mem 8     68 /  73 /  60         +0.52% / +0.47%
#   zlib-ng 6        109 / 118 / 116         -0.31% / +3.01%
#   zlib-ng 9         64 / 111 /  51         -0.54% / -0.30%
#   zlib 9            33 /  70 /  23         -0.54% / -0.30%
#   zlib 1            76 /  73 /  71         +13.3% / +8.0%
#   zlib-ng 1        293 / 175 / 304         +45.1% / +32.2%
#   isal 0           534 / 425 / 566         +24.0% / +31.9%
#   isal 1           504 / 669 / 501         +10.1% / +9.4%
#   isal 2           479 / 667 / 481         +9.7% / +8.9%
#
# default: zlib-ng 9: 0.2..1.8% smaller than qemu-img's zlib 6 on every
#   corpus tried (text, binaries, /usr/share, .pyc files, dpkg metadata,
#   static libraries) and 1.2..1.6x its speed per core, so a default image
#   is never larger than qemu-img's. stdlib zlib 5 with memLevel 8 was 37%
#   faster still, but +0.5..0.8% in size (+1.01% with memLevel 9 on static
#   libraries): too close to the 1% bound. Without zlib-ng: stdlib zlib 6,
#   byte for byte what qemu-img writes.
# fast: isal 1 (ISA-L's fast level; it honours the 4 KiB window), ~10x
#   zlib 6 at +9..10% size; isal 0 gains little speed for +24..32%. Without
#   isal, zlib-ng 1, then zlib 1.
# best: the smallest: zlib-ng 9, the same sizes as stdlib zlib 9 at 2x its
#   speed; stdlib zlib 9 where zlib-ng is not installed.
_ZLIB_CHOICES: dict[str, tuple[tuple[str, int, int], ...]] = {
    "fast": (("isal", 1, 9), ("zlib-ng", 1, 9), ("zlib", 1, 9)),
    "default": (("zlib-ng", 9, 9), ("zlib", 6, 9)),
    "best": (("zlib-ng", 9, 9), ("zlib", 9, 9)),
}

# Inflate: all three accept the same streams (tests check it); prefer the
# fastest installed.
_INFLATE_ORDER = ("isal", "zlib-ng", "zlib")

# --- zstd --------------------------------------------------------------------

ZSTD_DEFAULT_LEVEL = 3  # ZSTD_CLEVEL_DEFAULT, what QEMU uses
# Measured as above: MB/s on text / binaries (random data is stored as is,
# at 2-4 GB/s) and size relative to zlib 6:
#   zstd 1   405 / 458 MB/s   -1.7% / +1.9%
#   zstd 3   323 / 342        -6.3% / -3.1%   (QEMU's level)
#   zstd 9    65 /  73        -14.8% / -10.0%
#   zstd 15   11 /  12        -18.2% / -14.6%
#   zstd 19  3.5 / 3.8        -18.8% / -16.2%
# fast: 1, 25-35% faster than 3 for 5% more; negative levels grow 15-45%.
# best: 19, the smallest; levels 20-22 only widen the window, which a
#   64 KiB..2 MiB cluster cannot use. It is slow: ~4 MB/s per core.
_ZSTD_CHOICES: dict[str, int] = {
    "fast": 1,
    "default": ZSTD_DEFAULT_LEVEL,
    "best": 19,
}


# --- backend loading (lazy, named when missing) --------------------------------

_modules: dict[str, ModuleType | None] = {}
_modules_lock = threading.Lock()


def _load(module_name: str) -> ModuleType | None:
    """Import `module_name` once; None when it is not installed."""
    try:
        return _modules[module_name]
    except KeyError:
        pass
    with _modules_lock:
        if module_name not in _modules:
            try:
                _modules[module_name] = importlib.import_module(module_name)
            except ImportError:
                _modules[module_name] = None
        return _modules[module_name]


def _deflate_module(backend: str) -> ModuleType | None:
    if backend == "zlib":
        return zlib
    try:
        return _load(_DEFLATE_MODULES[backend])
    except KeyError:
        raise ValueError(f"unknown deflate backend {backend!r}") from None


def deflate_backends() -> tuple[str, ...]:
    """Names of the deflate libraries installed, stdlib zlib always among them."""
    return tuple(name for name in _DEFLATE_MODULES if _deflate_module(name) is not None)


def _zstandard() -> ModuleType:
    module = _load("zstandard")
    if module is None:
        raise UnsupportedFeatureError(
            "zstd compressed clusters need the Python package 'zstandard' (pip install zstandard)"
        )
    return module


def _check_level(level: str) -> None:
    if level not in COMPRESSION_LEVELS:
        raise ValueError(f"compression level must be one of {COMPRESSION_LEVELS}, not {level!r}")


def _unsupported_type(compression_type: int) -> UnsupportedFeatureError:
    return UnsupportedFeatureError(f"unsupported qcow2 compression type {compression_type}")


def _zlib_choice(level: str) -> tuple[str, int, int]:
    """(backend, level, memLevel) that compresses zlib clusters at `level`."""
    _check_level(level)
    for choice in _ZLIB_CHOICES[level]:
        if _deflate_module(choice[0]) is not None:
            return choice
    raise AssertionError("stdlib zlib is always available")  # pragma: no cover


def _zstd_level(level: str) -> int:
    _check_level(level)
    return _ZSTD_CHOICES[level]


def compressor_name(compression_type: int, level: str = "default") -> str:
    """Which implementation compresses clusters of this type at this level,
    e.g. ``"zlib level 5, memLevel 8 (raw deflate, 4 KiB window)"``; for reports."""
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        backend, backend_level, mem_level = _zlib_choice(level)
        return f"{backend} level {backend_level}, memLevel {mem_level} (raw deflate, 4 KiB window)"
    if compression_type == QCOW2_COMPRESSION_TYPE_ZSTD:
        return f"zstd level {_zstd_level(level)}"
    raise _unsupported_type(compression_type)


# --- one cluster ---------------------------------------------------------------


def deflate_raw(
    data: bytes | memoryview,
    backend: str = "zlib",
    level: int = 6,
    mem_level: int = ZLIB_MEMLEVEL,
) -> bytes:
    """Raw deflate of `data` with a 4 KiB window, as qcow2_zlib_compress makes it.

    With backend "zlib" at level 6 and mem_level 9 the output is
    byte-identical to QEMU's (same library, same parameters).
    """
    module = _deflate_module(backend)
    if module is None:
        raise UnsupportedFeatureError(f"deflate backend {backend!r} is not installed")
    compressor = module.compressobj(level, module.DEFLATED, ZLIB_WBITS, mem_level)
    return compressor.compress(data) + compressor.flush()


def _inflate_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [zlib.error]
    for backend in _INFLATE_ORDER:
        module = _deflate_module(backend)
        if module is not None:
            errors.append(module.error)
    return tuple(errors)


def inflate_raw(data: bytes | memoryview, cluster_size: int, backend: str | None = None) -> bytes:
    """Inflate one zlib cluster as qcow2_zlib_decompress does.

    Exactly `cluster_size` bytes must come out of a prefix of `data`; bytes
    after the end of the stream are ignored, and so is the rest of a stream
    that would produce more than `cluster_size` bytes (QEMU stops when its
    buffer is full and accepts Z_BUF_ERROR). Output never exceeds
    `cluster_size`. `backend` None picks the fastest installed.
    """
    if backend is None:
        backend = _inflate_backend()
    module = _deflate_module(backend)
    if module is None:
        raise UnsupportedFeatureError(f"deflate backend {backend!r} is not installed")
    try:
        out = module.decompressobj(ZLIB_INFLATE_WBITS).decompress(data, cluster_size)
    except _inflate_errors() as e:
        raise CorruptImageError(f"invalid zlib compressed cluster: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImageError(
            f"zlib compressed cluster is truncated: {len(out)} of {cluster_size} bytes"
        )
    return out


def _inflate_backend() -> str:
    return next(b for b in _INFLATE_ORDER if _deflate_module(b) is not None)


# zstandard's ZstdCompressor/ZstdDecompressor must not be shared between
# threads at the same time: keep one of each per thread (per level).
_zstd_local = threading.local()


def _zstd_compressor(level: int):
    cache = getattr(_zstd_local, "compressors", None)
    if cache is None:
        cache = _zstd_local.compressors = {}
    compressor = cache.get(level)
    if compressor is None:
        # write_content_size and no checksum: the frame QEMU writes.
        compressor = cache[level] = _zstandard().ZstdCompressor(
            level=level, write_checksum=False, write_content_size=True
        )
    return compressor


def _zstd_decompressor():
    dctx = getattr(_zstd_local, "decompressor", None)
    if dctx is None:
        dctx = _zstd_local.decompressor = _zstandard().ZstdDecompressor()
    return dctx


def zstd_compress(data: bytes | memoryview, level: int = ZSTD_DEFAULT_LEVEL) -> bytes:
    """One zstd frame holding `data`, as qcow2_zstd_compress makes it."""
    return _zstd_compressor(level).compress(data)


def zstd_decompress(data: bytes | memoryview, cluster_size: int) -> bytes:
    """Decompress one zstd cluster as qcow2_zstd_decompress does.

    Exactly `cluster_size` bytes, from a prefix of `data`; the frame that
    fills the cluster must end there. Output never exceeds `cluster_size`,
    whatever the frame header claims.
    """
    zstandard = _zstandard()
    try:
        content_size = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as e:
        raise CorruptImageError(f"invalid zstd compressed cluster: {e}") from None
    if content_size == cluster_size:
        # What QEMU writes: one frame that records its size. The one-shot
        # decompress allocates content_size bytes (checked above), fails
        # unless the frame is complete and exactly that long, and ignores
        # trailing bytes.
        try:
            out = _zstd_decompressor().decompress(data)
        except zstandard.ZstdError:
            out = b""
        if len(out) == cluster_size:
            return out
    return _zstd_decompress_frames(data, cluster_size)


# No writer makes more than one frame per cluster; finding where a frame ends
# copies the rest of the input (zstandard's unused_data), so bound the count
# to keep hostile input from costing quadratic time.
_ZSTD_MAX_FRAMES = 256


def _zstd_decompress_frames(data: bytes | memoryview, cluster_size: int) -> bytes:
    """The general case of qcow2_zstd_decompress, in bounded memory.

    QEMU calls ZSTD_decompressStream until its cluster_size buffer is full,
    which carries on into a following frame when one frame is short, then
    requires the last frame to be complete. Frames without a content size,
    skippable frames and such concatenations are legal input; no known
    writer makes them, so this path favours bounded memory over speed. A
    size-limited reader first shows the next frame fits in the room left,
    then a decompressobj, now known to produce no more than that, decodes it
    and says where it ends.
    Deviation: more than _ZSTD_MAX_FRAMES frames in one cluster is rejected.
    """
    zstandard = _zstandard()
    dctx = _zstd_decompressor()
    out = bytearray()
    rest = memoryview(data)
    bounded = False  # whether the frame at `rest` is known to fit
    try:
        for _ in range(_ZSTD_MAX_FRAMES):
            room = cluster_size - len(out)
            if not bounded:
                # The reader decodes up to the end of the first frame with
                # content (empty and skippable frames before it included).
                with dctx.stream_reader(rest, read_size=len(rest)) as reader:
                    if len(reader.read(room + 1)) > room:
                        raise CorruptImageError("zstd compressed cluster is larger than a cluster")
                bounded = True
            dobj = dctx.decompressobj()
            frame = dobj.decompress(rest)
            if not dobj.eof:
                raise CorruptImageError("zstd compressed cluster is truncated")
            out += frame
            if len(out) == cluster_size:
                return bytes(out)
            if frame:
                bounded = False
            consumed = len(rest) - len(dobj.unused_data)
            if len(out) > cluster_size or consumed <= 0 or consumed >= len(rest):
                raise CorruptImageError(
                    f"zstd compressed cluster is truncated: {len(out)} of {cluster_size} bytes"
                )
            rest = rest[consumed:]
    except zstandard.ZstdError as e:
        raise CorruptImageError(f"invalid zstd compressed cluster: {e}") from None
    raise CorruptImageError(f"zstd compressed cluster has more than {_ZSTD_MAX_FRAMES} frames")


def _compress_function(compression_type: int, level: str) -> Callable[[bytes | memoryview], bytes]:
    """The one place a compression_type (and level) becomes a compressor."""
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        backend, backend_level, mem_level = _zlib_choice(level)
        module = _deflate_module(backend)
        deflated = module.DEFLATED

        def compress(data: bytes | memoryview) -> bytes:
            compressor = module.compressobj(backend_level, deflated, ZLIB_WBITS, mem_level)
            return compressor.compress(data) + compressor.flush()

        return compress
    if compression_type == QCOW2_COMPRESSION_TYPE_ZSTD:
        _zstandard()  # name a missing package now, not in a worker thread
        zstd_level = _zstd_level(level)
        return lambda data: _zstd_compressor(zstd_level).compress(data)
    raise _unsupported_type(compression_type)


def _decompress_function(compression_type: int) -> Callable[[bytes | memoryview, int], bytes]:
    """The one place a compression_type becomes a decompressor."""
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        backend = _inflate_backend()
        return lambda data, cluster_size: inflate_raw(data, cluster_size, backend)
    if compression_type == QCOW2_COMPRESSION_TYPE_ZSTD:
        _zstandard()
        return zstd_decompress
    raise _unsupported_type(compression_type)


def max_compressed_size(compression_type: int, cluster_size: int) -> int:
    """The longest compressed cluster QEMU stores compressed; a longer one
    it writes uncompressed (qcow2_co_pwritev_compressed_task).

    QEMU hands the compressor a buffer of cluster_size - 1 bytes. zstd
    (ZSTD_compressStream2 returning 0) may fill it exactly. zlib may not:
    when deflate(Z_FINISH) fills the output buffer exactly it returns Z_OK,
    not Z_STREAM_END (it cannot tell it has finished until called again), and
    qcow2_zlib_compress takes Z_OK as -ENOMEM. qemu-img 7.2 stores a cluster
    whose zlib stream is cluster_size - 2 bytes compressed and one whose
    stream is cluster_size - 1 bytes uncompressed (tests/test_compress.py).
    """
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        return cluster_size - 2
    return cluster_size - 1


def _stored_form(
    compression_type: int, data: bytes | memoryview, compressed: bytes
) -> bytes | None:
    if len(compressed) <= max_compressed_size(compression_type, len(data)):
        return compressed
    return None


def compress_cluster(
    data: bytes | memoryview, compression_type: int, level: str = "default"
) -> bytes | None:
    """Compressed form of one cluster, or None where storing it compressed
    would not save space: QEMU's rule, see `max_compressed_size`.

    `data` is one whole cluster; like QEMU, a caller zero-pads the last
    cluster of an image whose size is not a multiple of the cluster size.
    """
    compressed = _compress_function(compression_type, level)(data)
    return _stored_form(compression_type, data, compressed)


def decompress_cluster(data: bytes | memoryview, compression_type: int, cluster_size: int) -> bytes:
    """The `cluster_size` bytes of one compressed cluster.

    `data` is what the descriptor points at (it may run past the end of the
    compressed stream). Raises CorruptImageError when the stream is invalid
    or does not fill the cluster.
    """
    return _decompress_function(compression_type)(data, cluster_size)


# --- thread pools --------------------------------------------------------------

_In = TypeVar("_In")
_Out = TypeVar("_Out")


class _OrderedPool(Generic[_In, _Out]):
    """Apply a GIL-releasing function to a stream in worker threads, in order,
    with at most 4 * workers items in flight so memory stays bounded."""

    def __init__(self, function: Callable[[_In], _Out], workers: int | None):
        if workers is None:
            workers = os.cpu_count() or 1
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self._function = function
        self._max_in_flight = 4 * workers
        # Imported here: concurrent.futures (and the logging it loads) costs
        # every command that only checks a level name ~10 ms of start-up.
        from concurrent.futures import ThreadPoolExecutor

        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qimg-codec")
            if workers > 1
            else None
        )

    def map(self, items: Iterable[_In]) -> Iterator[_Out]:
        """Results in input order. Reads ahead of the consumer by at most
        4 * workers items."""
        return self._ordered(self._function, items)

    def map_batches(self, batches: Iterable[list[_In]]) -> Iterator[list[_Out]]:
        """Like `map`, one task per batch: ``[f(x) for x in batch]`` for each
        batch, in order. Fewer, larger tasks cost less scheduling per item;
        at most 4 * workers batches are in flight."""
        function = self._function

        def apply(batch: list[_In]) -> list[_Out]:
            return [function(item) for item in batch]

        return self._ordered(apply, batches)

    def _ordered(self, function: Callable, items: Iterable) -> Iterator:
        """function(item) for each item, in order, with a bounded number of
        tasks in flight; unfinished tasks are cancelled if the consumer stops."""
        if self._pool is None:
            yield from map(function, items)
            return
        submit = self._pool.submit
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(submit(function, item))
                if len(pending) >= self._max_in_flight:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ClusterCompressor(_OrderedPool["bytes | memoryview", "bytes | None"]):
    """Compress clusters in parallel, for `qimg convert -c`.

    ``map(clusters)`` yields, in order, what `compress_cluster` would return
    for each: the compressed bytes, or None for a cluster to store as is.
    """

    def __init__(self, compression_type: int, level: str = "default", workers: int | None = None):
        compress = _compress_function(compression_type, level)
        self.compression_type = compression_type
        self.level = level
        self.name = compressor_name(compression_type, level)

        def compress_one(data: bytes | memoryview) -> bytes | None:
            return _stored_form(compression_type, data, compress(data))

        super().__init__(compress_one, workers)


class ClusterDecompressor(_OrderedPool["bytes | memoryview", bytes]):
    """Decompress clusters in parallel, for reading a batch of compressed
    clusters (a run found in one L2 slice).

    ``map(items)`` yields each cluster's `cluster_size` bytes in order; an
    invalid one raises CorruptImageError when its turn comes.
    """

    def __init__(self, compression_type: int, cluster_size: int, workers: int | None = None):
        decompress = _decompress_function(compression_type)
        self.compression_type = compression_type
        self.cluster_size = cluster_size
        self._into = _Into(compression_type, cluster_size)
        super().__init__(lambda data: decompress(data, cluster_size), workers)

    def decompress_many(self, items: Iterable[bytes | memoryview], batch: int = 1) -> list[bytes]:
        """All of `items` decompressed, in order; `batch` clusters per task."""
        if batch <= 1:
            return list(self.map(items))
        items = list(items)
        batches = (items[i : i + batch] for i in range(0, len(items), batch))
        return [plain for done in self.map_batches(batches) for plain in done]

    def decompress_into(
        self, jobs: list[tuple[bytes | memoryview, memoryview, int]], split: bool = True
    ) -> None:
        """Fill each `dst` with bytes [skip, skip + len(dst)) of the cluster
        its `data` holds. The calling thread takes one share of the work and
        the pool the others (all of it without `split`); returns when every
        `dst` is written (or, after every task has finished, raises the
        first error in job order)."""
        run = self._into
        total = sum(len(dst) for _data, dst, _skip in jobs)
        parts = min(self.workers, len(jobs), max(1, total // _MIN_TASK_BYTES)) if split else 1
        if parts <= 1 or self._pool is None:
            run(jobs)
            return
        first, *rest = _split(jobs, parts)
        futures = [self._pool.submit(run, part) for part in rest]
        error: BaseException | None = None
        try:
            run(first)
        except BaseException as exc:
            error = exc
        # Every task writes into the caller's buffer: wait for all of them.
        for future in futures:
            exc = future.exception()
            if error is None and exc is not None:
                error = exc
        if error is not None:
            raise error


# Output bytes below which a batch is decompressed in the calling thread
# alone: handing work to another thread costs tens of microseconds.
_MIN_TASK_BYTES = 256 << 10


class _Into:
    """Decompress (data, dst, skip) jobs: the cluster that `data` holds,
    bytes [skip, skip + len(dst)) of it, into `dst`, by the thread that
    decompressed it. A whole cluster goes through `fill`: zstd straight
    into `dst` through the system's libzstd (libzstd.py) where it is
    installed, otherwise decompressed and copied (zlib has no API that
    inflates into a caller's buffer; the copy costs ~3 us a 64 KiB
    cluster against 60-450 us to decompress it)."""

    def __init__(self, compression_type: int, cluster_size: int):
        self.decompress = _decompress_function(compression_type)
        self.cluster_size = cluster_size
        self.fill = _fill_function(compression_type, cluster_size, self.decompress)

    def __call__(self, jobs: list[tuple[bytes | memoryview, memoryview, int]]) -> None:
        fill, cs = self.fill, self.cluster_size
        for data, dst, skip in jobs:
            if skip == 0 and len(dst) == cs:
                fill(data, dst)
            else:
                dst[:] = memoryview(self.decompress(data, cs))[skip : skip + len(dst)]


def _fill_function(
    compression_type: int,
    cluster_size: int,
    decompress: Callable[[bytes | memoryview, int], bytes],
) -> Callable[[bytes | memoryview, memoryview], None]:
    """fill(data, dst): `dst`, one cluster's bytes, filled with the cluster
    that `data` holds, as `decompress` (the type's _decompress_function)
    reads it."""
    if compression_type == QCOW2_COMPRESSION_TYPE_ZSTD:
        from qimg import libzstd

        if libzstd.available():
            frame_into = libzstd.frame_into

            def fill_zstd(data: bytes | memoryview, dst: memoryview) -> None:
                # A first frame that fills the cluster exactly is what
                # qcow2_zstd_decompress accepts from a single frame; any
                # other input takes the general path, errors included.
                if frame_into(data, dst) != cluster_size:
                    dst[:] = decompress(data, cluster_size)

            return fill_zstd

    def fill(data: bytes | memoryview, dst: memoryview) -> None:
        dst[:] = decompress(data, cluster_size)

    return fill


def _split(jobs: list, parts: int) -> list[list]:
    """`jobs` cut into `parts` consecutive slices of nearly equal length."""
    n = len(jobs)
    bounds = [n * k // parts for k in range(parts + 1)]
    return [jobs[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def decompress_many(
    items: Iterable[bytes | memoryview],
    compression_type: int,
    cluster_size: int,
    workers: int | None = None,
) -> list[bytes]:
    """Decompress a batch of clusters with a short-lived thread pool. A reader
    that decompresses often should keep a `ClusterDecompressor` instead."""
    items = list(items)
    if len(items) <= 1:
        workers = 1
    with ClusterDecompressor(compression_type, cluster_size, workers) as pool:
        return pool.decompress_many(items)
