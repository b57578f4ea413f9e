"""Starting the write-back of a file's dirty pages without waiting for it
(Linux sync_file_range with SYNC_FILE_RANGE_WRITE, through ctypes: the os
module has no binding). A copy that writes much and then flushes calls it
as it goes, so the disk writes while the copy runs and the flush waits
only for the tail. Never a durability guarantee: only a flush is one.
"""

from __future__ import annotations

import ctypes
import sys

SYNC_FILE_RANGE_WRITE = 2

_call = None  # sync_file_range, once looked up; False where there is none


def _lookup():
    global _call
    if _call is None:
        _call = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            except (OSError, AttributeError):
                return False
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _call = fn
    return _call


def start(fd: int) -> None:
    """Queue every dirty page of `fd` for writing; errors are ignored (the
    flush that follows reports what matters)."""
    fn = _lookup()
    if fn:
        fn(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
