"""C library functions the os module has no binding for (fallocate's
hole punching, sync_file_range, memcmp on addresses, fstatfs), through ctypes.

Each is looked up once, in the process's own symbols (no ldconfig run);
a foreign function releases the GIL while it runs. None where there is
no C library to ask or no such function in it: callers then do without.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def function(name: str, restype, *argtypes) -> Callable | None:
    """The C library's `name` with its result and argument types (errno
    kept for ctypes.get_errno), or None."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, TypeError, AttributeError):
        return None
    fn.restype = restype
    fn.argtypes = argtypes
    return fn


def file_system_type(fd: int) -> int | None:
    """fstatfs's f_type (linux/magic.h) of the file system holding `fd`;
    None where it cannot be asked."""
    fstatfs = function("fstatfs", ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    if fstatfs is None:
        return None
    # struct statfs starts with its __fsword_t f_type (a long; 120 bytes
    # in all on 64-bit Linux: room for more).
    buf = ctypes.create_string_buffer(256)
    if fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF
