"""The storage layer: one host file, read and written by offset.

Every format driver reaches its bytes through a `Storage`; a network export
or a crash-injecting wrapper can stand in for `FileStorage` by offering the
same methods.
"""

from __future__ import annotations

import errno
import functools
import os

from qimg.errors import ImageIOError

# QEMU's BDRV_MAX_LENGTH (INT64_MAX aligned down to BDRV_MAX_ALIGNMENT, 1 GiB):
# the block layer fails any request that ends past it with EIO, before the
# file is touched; a read below it but past the end of the file returns
# zeros. Offsets read from an image (a refcount table entry may hold any
# 64-bit value) therefore never reach os.pread unchecked.
MAX_REQUEST_END = ((1 << 63) - 1) & ~((1 << 30) - 1)


def check_request(offset: int, length: int) -> None:
    """QEMU's bdrv_check_request: raise ImageIOError("Input/output error")
    for a request QEMU's block layer refuses."""
    if offset < 0 or length < 0 or offset + length > MAX_REQUEST_END:
        raise ImageIOError("Input/output error")


class Storage:
    """The interface every storage backend offers."""

    path: str
    writable: bool

    def pread(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def truncate(self, size: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def sector_length(storage: Storage) -> int:
    """QEMU's bdrv_getlength of a file: its size rounded up to whole
    512-byte sectors (the length QEMU's checks compare offsets with)."""
    return -(-storage.size() // 512) * 512


def _os_error(path: str, action: str, exc: OSError) -> ImageIOError:
    reason = exc.strerror or str(exc)
    return ImageIOError(f"Could not {action} '{path}': {reason}")


class FileStorage(Storage):
    """A regular file (or block device) opened by path.

    `perm` and `shared` are QEMU permission masks (see `qimg.locking`); when
    `lock` is true they are taken as byte-range locks the way QEMU's
    file-posix driver takes them, so QEMU and qimg refuse each other's
    conflicting access.
    """

    def __init__(
        self,
        path: str,
        writable: bool = False,
        *,
        create: bool = False,
        lock: bool = True,
        force_share: bool = False,
        perm: int | None = None,
        shared: int | None = None,
    ):
        self.path = path
        self.writable = writable or create
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT
        try:
            self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            if exc.errno == errno.EISDIR or os.path.isdir(path):
                raise ImageIOError(f"Could not open '{path}': Is a directory") from None
            raise _os_error(path, "create" if create else "open", exc) from None
        self._closed = False
        self._locker = None
        try:
            if create:
                # Ordering: the create lock is held before the file is emptied,
                # so an image in use elsewhere is never truncated.
                if lock:
                    self._lock(False, force_share, *create_masks(), prefix=f"{path}: ")
                os.ftruncate(self.fd, 0)
                if self._locker is not None:
                    self._locker.release()
                    self._locker = None
            if lock:
                self._lock(self.writable, force_share, perm, shared)
        except OSError as exc:
            self.close()
            raise _os_error(path, "create", exc) from None
        except BaseException:
            self.close()
            raise

    def _lock(self, writable, force_share, perm, shared, prefix=None) -> None:
        from qimg.locking import ImageLock

        self._locker = ImageLock(
            self.fd, self.path, writable, force_share, perm=perm, shared=shared, prefix=prefix
        )

    def pread(self, offset: int, length: int) -> bytes:
        """Read `length` bytes; bytes past the end of file are zero (a
        request QEMU refuses raises ImageIOError, see check_request)."""
        check_request(offset, length)
        parts = []
        got = 0
        try:
            # Short reads happen at EOF for regular files; loop otherwise.
            while got < length:
                more = os.pread(self.fd, length - got, offset + got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
        except OSError as exc:
            raise _os_error(self.path, "read", exc) from None
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if got < length:
            data += bytes(length - got)
        return data

    def preadv(self, offset: int, buffer: memoryview) -> int:
        """Read into `buffer`; returns bytes read (the rest, past the end of
        file, is left alone). A request QEMU refuses raises ImageIOError."""
        total = 0
        n = len(buffer)
        check_request(offset, n)
        try:
            while total < n:
                got = os.preadv(self.fd, [buffer[total:]], offset + total)
                if got == 0:
                    break
                total += got
        except OSError as exc:
            raise _os_error(self.path, "read", exc) from None
        return total

    def pwrite(self, offset: int, data) -> None:
        view = memoryview(data)
        try:
            while len(view):
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise _os_error(self.path, "write", exc) from None

    def size(self) -> int:
        try:
            st = os.fstat(self.fd)
            if st.st_size == 0 and not _is_regular(st.st_mode):
                return os.lseek(self.fd, 0, os.SEEK_END)
            return st.st_size
        except OSError as exc:
            raise _os_error(self.path, "stat", exc) from None

    def allocated_size(self) -> int:
        """Bytes the host file occupies on disk (st_blocks * 512)."""
        return os.fstat(self.fd).st_blocks * 512

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _os_error(self.path, "resize", exc) from None

    def fallocate(self, offset: int, length: int) -> None:
        """Reserve host blocks for [offset, offset+length) (may grow the file)."""
        if length <= 0:
            return
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                size = self.size()
                if offset + length > size:
                    self.truncate(offset + length)
                return
            raise _os_error(self.path, "allocate", exc) from None

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length) so it reads as zeros; best effort."""
        if length <= 0:
            return
        try:
            import fcntl  # noqa: F401  (Linux only: fallocate flags)

            _punch_hole(self.fd, offset, length)
        except (OSError, AttributeError):
            self.pwrite(offset, bytes(length))

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Split [offset, offset+length) into (start, length, is_data) runs
        using SEEK_DATA / SEEK_HOLE; one data run where they are unsupported."""
        end = offset + length
        runs: list[tuple[int, int, bool]] = []
        pos = offset
        try:
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole up to EOF
                        runs.append((pos, end - pos, False))
                        break
                    raise
                if data > pos:
                    hole_end = min(data, end)
                    runs.append((pos, hole_end - pos, False))
                    pos = hole_end
                    if pos >= end:
                        break
                hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
                runs.append((pos, hole - pos, True))
                pos = hole
        except (OSError, AttributeError):
            return [(offset, length, True)]
        return runs

    def flush(self) -> None:
        if self.writable:
            try:
                os.fsync(self.fd)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EROFS):
                    raise _os_error(self.path, "flush", exc) from None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._locker is not None:
                self._locker.release()
            os.close(self.fd)


def create_masks() -> tuple[int, int]:
    from qimg.locking import create_perms

    return create_perms()


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


@functools.cache
def _libc():
    """The C library, looked up once (find_library runs ldconfig)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes

    libc = _libc()
    falloc_fl_keep_size, falloc_fl_punch_hole = 0x01, 0x02
    ret = libc.fallocate(
        ctypes.c_int(fd),
        ctypes.c_int(falloc_fl_keep_size | falloc_fl_punch_hole),
        ctypes.c_longlong(offset),
        ctypes.c_longlong(length),
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
