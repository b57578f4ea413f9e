"""The system's libzstd (the library QEMU links), through ctypes: one
zstd frame decompressed straight into a caller's buffer.

The zstandard package carries its own build of libzstd and returns each
decompressed cluster as a new bytes object, which the reader copies into
place. libzstd.so.1 writes into the place itself, and measured faster on
qemu-img's zstd clusters: 58.5 against 66.5 us a 64 KiB cluster on one
core (bench data, Debian's libzstd 1.5.4 against zstandard 0.25's 1.5.7,
2026-12). Where the library is missing, `frame_into` says so and callers
use zstandard. A foreign function releases the GIL while it runs.
"""

from __future__ import annotations

import ctypes
import functools
import threading

_SONAME = "libzstd.so.1"


class _Library:
    """libzstd's decompression functions, typed."""

    def __init__(self, lib: ctypes.CDLL, held: ctypes.PyDLL):
        size_t, void_p = ctypes.c_size_t, ctypes.c_void_p
        self.create = _typed(lib.ZSTD_createDCtx, void_p)
        self.free = _typed(lib.ZSTD_freeDCtx, size_t, void_p)
        # Called holding the GIL: it reads a few block headers (well under
        # a microsecond), less than handing the GIL over would cost.
        self.frame_size = _typed(held.ZSTD_findFrameCompressedSize, size_t, void_p, size_t)
        self.decompress = _typed(
            lib.ZSTD_decompressDCtx, size_t, void_p, void_p, size_t, void_p, size_t
        )


def _typed(fn, restype, *argtypes):
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


@functools.cache
def _library() -> _Library | None:
    try:
        return _Library(ctypes.CDLL(_SONAME), ctypes.PyDLL(_SONAME))
    except (OSError, AttributeError):
        return None


def available() -> bool:
    """Whether the system's libzstd can be used."""
    return _library() is not None


class _Context:
    """One thread's ZSTD_DCtx (a context must not be used by two threads
    at once), freed with the thread's local storage."""

    def __init__(self, library: _Library):
        self.library = library
        self.pointer = library.create()
        if not self.pointer:
            raise MemoryError("ZSTD_createDCtx failed")

    def __del__(self) -> None:
        if getattr(self, "pointer", None):
            self.library.free(self.pointer)


_local = threading.local()


def _context(library: _Library) -> _Context:
    context = getattr(_local, "context", None)
    if context is None:
        context = _local.context = _Context(library)
    return context


UNAVAILABLE = -2  # frame_into: no libzstd, or a buffer it cannot address
INVALID = -1  # frame_into: no complete frame that fits


def frame_into(src, dst: memoryview) -> int:
    """Decompress the first zstd frame at the start of `src` (bytes after it
    are not read) into writable `dst`: the number of bytes it produced;
    INVALID where the frame is incomplete, corrupt or larger than `dst`;
    UNAVAILABLE where libzstd is missing or `src` is a read-only buffer
    other than bytes."""
    library = _library()
    if library is None or not len(dst) or not len(src):
        return UNAVAILABLE
    if isinstance(src, bytes):
        source = src
    else:
        try:
            source = ctypes.addressof(ctypes.c_char.from_buffer(src))
        except TypeError:
            return UNAVAILABLE
    target = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    # An error code is a size_t above every buffer's length (ZSTD_isError:
    # above (size_t)-ZSTD_error_maxCode), so the bounds are the checks.
    size = library.frame_size(source, len(src))
    if size > len(src):
        return INVALID
    produced = library.decompress(_context(library).pointer, target, len(dst), source, size)
    return produced if produced <= len(dst) else INVALID
