"""Starting the write-back of a file's dirty pages without waiting for it
(Linux sync_file_range with SYNC_FILE_RANGE_WRITE, through qimg.libc: the
os module has no binding). A copy that writes much and then flushes calls
it as it goes, so the disk writes while the copy runs and the flush waits
only for the tail. Never a durability guarantee: only a flush is one.
"""

from __future__ import annotations

import ctypes
import sys

from qimg import libc

SYNC_FILE_RANGE_WRITE = 2


def start(fd: int) -> None:
    """Queue every dirty page of `fd` for writing; errors are ignored (the
    flush that follows reports what matters)."""
    if not sys.platform.startswith("linux"):
        return
    fn = libc.function(
        "sync_file_range", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
    )
    if fn is not None:
        fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
