"""Shared extents: the host calls that let two files share their blocks.

On file systems with copy-on-write extents (XFS with reflink, btrfs),
FICLONERANGE makes a range of one file share the blocks of a range of
another: no data is read or written, and a later write to either file
copies the block it touches first, so neither sees the other's writes.
Elsewhere (ext4, tmpfs, across file systems) the call is refused and the
caller copies the bytes instead.

`fiemap` reads a file's extent map with its flags (FIEMAP_EXTENT_SHARED:
the extent is shared with another file), for checks and benchmarks.
"""

from __future__ import annotations

import errno
import os
import struct

# linux/fs.h: struct file_clone_range {s64 src_fd; u64 src_offset, src_length,
# dest_offset}; FICLONERANGE = _IOW(0x94, 13, struct file_clone_range).
_FILE_CLONE_RANGE = struct.Struct("=qQQQ")
FICLONERANGE = 0x4020940D

# Errors that mean "these two files cannot share extents here": no
# support in the file system (EOPNOTSUPP, ENOTTY, ENOSYS), different file
# systems (EXDEV), or a range the file system will not share (EINVAL:
# unaligned, overlapping in one file, past the source's end; EBADF, EPERM,
# ETXTBSY: a file opened or flagged so that it cannot take part).
REFUSED = frozenset(
    {
        errno.EOPNOTSUPP,
        errno.ENOTSUP,
        errno.ENOTTY,
        errno.ENOSYS,
        errno.EXDEV,
        errno.EINVAL,
        errno.EBADF,
        errno.EPERM,
        errno.ETXTBSY,
    }
)


def clone_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> bool:
    """Make dst [dst_off, dst_off+length) share src [src_off, src_off+length).

    Offsets and length must be multiples of the file system's block size
    (block_size) and the source range inside the source file. Returns
    False, having changed nothing, where the file system refuses (see
    REFUSED); other failures (ENOSPC, EIO) raise OSError."""
    import fcntl

    if length <= 0:
        return True
    arg = _FILE_CLONE_RANGE.pack(src_fd, src_off, length, dst_off)
    try:
        fcntl.ioctl(dst_fd, FICLONERANGE, arg)
    except OSError as exc:
        if exc.errno in REFUSED:
            return False
        raise
    return True


def aligned_part(src_off: int, dst_off: int, length: int, src_size: int, block: int):
    """(lo, hi): the part [lo, hi) of a range of `length` bytes, copied
    from `src_off` to `dst_off`, that clone_range can share: whole blocks
    on both sides, inside the source's `src_size` bytes. (0, 0) when the
    two offsets are not congruent modulo `block`."""
    if (src_off - dst_off) % block:
        return 0, 0
    lo = (-dst_off) % block
    limit = min(length, src_size - src_off)
    if limit <= lo:
        return 0, 0
    return lo, lo + (limit - lo) // block * block


def block_size(fd: int) -> int:
    """The block size of the file system holding `fd` (what clone_range
    offsets must be multiples of)."""
    st = os.fstatvfs(fd)
    return st.f_bsize or st.f_frsize or 4096


# statfs f_type of the file systems that share extents (linux/magic.h):
# XFS (shares where made with reflink, the default since xfsprogs 5.1), btrfs.
SHARING_FILE_SYSTEMS = frozenset({0x58465342, 0x9123683E})


def may_share(fd: int) -> bool:
    """Whether the file system holding `fd` is of a kind that shares
    extents (SHARING_FILE_SYSTEMS, by fstatfs): an expectation only, for
    work that pays off where the file system shares (clone_range still
    decides). False where fstatfs cannot be called."""
    from qimg import libc

    return libc.file_system_type(fd) in SHARING_FILE_SYSTEMS


# linux/fiemap.h: struct fiemap {u64 fm_start, fm_length; u32 fm_flags,
# fm_mapped_extents, fm_extent_count, fm_reserved}; struct fiemap_extent
# {u64 fe_logical, fe_physical, fe_length, fe_reserved64[2]; u32 fe_flags,
# fe_reserved[3]}; FS_IOC_FIEMAP = _IOWR('f', 11, struct fiemap).
_FIEMAP = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP_BATCH = 256  # extents asked for per call


def fiemap(fd: int, start: int = 0, length: int | None = None) -> list[tuple[int, int, int, int]]:
    """(logical, physical, length, flags) of each extent of `fd` met by
    [start, start+length) (to the end of the file by default), after the
    file's dirty data is flushed to its extents (FIEMAP_FLAG_SYNC)."""
    import fcntl

    end = os.fstat(fd).st_size if length is None else start + length
    out: list[tuple[int, int, int, int]] = []
    pos = start
    while pos < end:
        head = _FIEMAP.pack(pos, end - pos, FIEMAP_FLAG_SYNC, 0, _FIEMAP_BATCH, 0)
        buf = bytearray(head + bytes(_FIEMAP_EXTENT.size * _FIEMAP_BATCH))
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP.unpack_from(buf)[3]
        if not mapped:
            break
        last = False
        for i in range(mapped):
            ext = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP.size + i * _FIEMAP_EXTENT.size)
            out.append(ext)
            last = bool(ext[3] & FIEMAP_EXTENT_LAST)
        pos = out[-1][0] + out[-1][2]
        if last:
            break
    return out


def shared_bytes(path: str) -> int:
    """Bytes of the file at `path` in extents flagged shared."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(n for _l, _p, n, flags in fiemap(fd) if flags & FIEMAP_EXTENT_SHARED)
    finally:
        os.close(fd)
