"""Starting the write-back of a file's dirty pages without waiting for it
(Linux sync_file_range with SYNC_FILE_RANGE_WRITE, through qimg.libc: the
os module has no binding). A copy that writes much and then flushes calls
it as it goes, so the disk writes while the copy runs and the flush waits
only for the tail. Never a durability guarantee: only a flush is one.

DropBehind goes further for a file's streamed writes (Storage.stream_writes):
what was written is dropped from the page cache once it is on the disk.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable

from qimg import libc

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
# Streamed bytes between two steps of DropBehind.
WINDOW = 32 << 20


def _sync_file_range() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    return libc.function(
        "sync_file_range", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
    )


def start(fd: int) -> None:
    """Queue every dirty page of `fd` for writing; errors are ignored (the
    flush that follows reports what matters)."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


class DropBehind:
    """A file's streamed writes, a WINDOW of bytes at a time: when a window
    is full its write-back is started, and the window before it is waited
    for and dropped from the page cache (POSIX_FADV_DONTNEED). So at most
    about two windows of streamed data stay cached, and the pages dropped
    are those the next writes fill: a copy of any size takes a few dozen
    MiB of fresh memory from the host, not one page per 4 KiB written (on
    a VM whose host takes free memory back, each fresh page is faulted in
    again at a cost). Errors are ignored: the flush that follows reports
    what matters. A window is the span its writes cover."""

    def __init__(self, fd: int, sync_file_range: Callable):
        self.fd = fd
        self._sync_file_range = sync_file_range
        self._span: tuple[int, int] | None = None  # [lo, hi) of this window
        self._bytes = 0
        self._previous: tuple[int, int] | None = None  # (offset, length)

    @classmethod
    def for_fd(cls, fd: int) -> DropBehind | None:
        """A DropBehind of `fd`; None where the host cannot."""
        fn = _sync_file_range()
        if fn is None or not hasattr(os, "posix_fadvise"):
            return None
        return cls(fd, fn)

    def wrote(self, offset: int, length: int) -> None:
        """`length` bytes were written at `offset`."""
        span = self._span
        end = offset + length
        self._span = (offset, end) if span is None else (min(span[0], offset), max(span[1], end))
        self._bytes += length
        if self._bytes < WINDOW:
            return
        lo, hi = self._span
        self._span, self._bytes = None, 0
        self._sync_file_range(self.fd, lo, hi - lo, SYNC_FILE_RANGE_WRITE)
        previous, self._previous = self._previous, (lo, hi - lo)
        if previous is not None:
            wait = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
            self._sync_file_range(self.fd, *previous, wait)
            try:
                os.posix_fadvise(self.fd, *previous, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
