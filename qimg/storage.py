"""The storage layer: one host file, read and written by offset.

Every format driver reaches its bytes through a `Storage`; a network export
or a crash-injecting wrapper can stand in for `FileStorage` by offering the
same methods.
"""

from __future__ import annotations

import abc
import errno
import os
import threading

from qimg.cachemode import WRITEBACK, CacheMode
from qimg.errors import FileTooLargeError, ImageIOError

# QEMU's BDRV_MAX_LENGTH (INT64_MAX aligned down to BDRV_MAX_ALIGNMENT, 1 GiB):
# the block layer fails any request that ends past it with EIO, before the
# file is touched; a read below it but past the end of the file returns
# zeros. Offsets read from an image (a refcount table entry may hold any
# 64-bit value) therefore never reach os.pread unchecked.
MAX_REQUEST_END = ((1 << 63) - 1) & ~((1 << 30) - 1)
# Buffers one pwritev may take (Linux UIO_MAXIOV).
_IOV_MAX = 1024
# Bytes one buffered write system call takes at most. The page cache takes
# a write in folios as large as the write (up to 2 MiB), and a large folio
# is a block of free memory that a VM reporting free memory to its host
# (virtio-balloon free page reporting) may have handed back: the host
# faults it in again. 1 GiB written into a fresh ext4 file, 3 runs each:
# 0.21-0.25 s in 1 MiB writes, 0.44-0.49 s in 2 MiB writes, 9-42 s in 4 MiB
# writes; a LUKS qcow2 -> raw convert (2 MiB writes) once took 11 s instead
# of 1.4. 1 MiB writes were slow too whenever the free memory lay in
# smaller blocks (after qemu-img's 64 KiB writes): 10 rounds of 1 GiB
# written in 64 KiB / 128 KiB / 256 KiB / 1 MiB writes, taking turns:
# medians 0.301 / 0.275 / 0.259 / 0.533 s, the 1 MiB ones all slow
# (0.46-1.03 s). Convert on ext4, 8 rounds alternating with qemu-img,
# 512 KiB against 1 MiB: zstd qcow2->raw 0.915 against 1.300 s, zlib
# qcow2->raw 0.800 against 1.165 s, qcow2->raw 0.370 against 0.510 s,
# raw->qcow2 0.380 against 0.365 s (256 KiB: zstd 0.930, qcow2->qcow2 6%
# slower than 512 KiB).
WRITE_MAX = 512 << 10


def _leading(views: list[memoryview], limit: int) -> list[memoryview]:
    """The first buffers of `views`, at most _IOV_MAX of them and `limit`
    bytes (the last one cut short), for one pwritev."""
    out, size = [], 0
    for view in views[:_IOV_MAX]:
        out.append(view[: limit - size])
        size += len(out[-1])
        if size >= limit:
            break
    return out


def check_request(offset: int, length: int) -> None:
    """QEMU's bdrv_check_request: raise ImageIOError("Input/output error")
    for a request QEMU's block layer refuses."""
    if offset < 0 or length < 0 or offset + length > MAX_REQUEST_END:
        raise ImageIOError("Input/output error")


class Storage(abc.ABC):
    """The interface every storage backend offers: the only way the engine
    reaches bytes. Nothing outside this module sees a file descriptor or a
    host path operation, so a network block device can stand in for a file.

    `path` names the storage in messages; `writable` is how it was opened.
    """

    path: str
    writable: bool

    @abc.abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; bytes past the end read as zeros."""

    @abc.abstractmethod
    def preadv(self, offset: int, buffer: memoryview) -> int:
        """Read into `buffer`; returns the bytes read (fewer past the end)."""

    def pread_padded(self, offset: int, buffer: memoryview) -> None:
        """Fill `buffer` from `offset`; bytes past the end read as zeros
        (as QEMU's file driver reads them)."""
        got = self.preadv(offset, buffer)
        if got < len(buffer):
            buffer[got:] = bytes(len(buffer) - got)

    @abc.abstractmethod
    def pwrite(self, offset: int, data) -> None:
        """Write all of `data` at `offset` (the storage grows as needed)."""

    def pwritev(self, offset: int, buffers: list) -> None:
        """Write the concatenation of `buffers` at `offset` (this default:
        one pwrite per buffer)."""
        for data in buffers:
            n = memoryview(data).nbytes
            self.pwrite(offset, data)
            offset += n

    @abc.abstractmethod
    def size(self) -> int:
        """The length in bytes."""

    @abc.abstractmethod
    def allocated_size(self) -> int:
        """Bytes the storage occupies on its host (qemu-img's actual-size)."""

    @abc.abstractmethod
    def truncate(self, size: int) -> None:
        """Set the length to `size` (new bytes read as zeros)."""

    @abc.abstractmethod
    def fallocate(self, offset: int, length: int) -> None:
        """Reserve [offset, offset+length) on the host (may grow the storage)."""

    @abc.abstractmethod
    def punch_hole(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros, freeing it where the
        host can; the length does not change."""

    @abc.abstractmethod
    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """[offset, offset+length) as (start, length, is_data) runs; a hole
        (is_data false) reads as zeros."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the storage and its locks; idempotent."""

    def available_space(self) -> int | None:
        """Bytes the host can still take (for a quick refusal of a
        preallocation that cannot fit); None where unknown (this default)."""
        return None

    def share_from(self, source: Storage, source_offset: int, offset: int, data) -> bool | None:
        """Put `data`, which is what `source` holds at `source_offset`, at
        `offset`, sharing the source's host extents (copy-on-write: a later
        write to either side leaves the other as it was) and writing what
        the host cannot share of it. An optional capability of a pair of
        storages: True when done; False, nothing written, where this one
        cannot share with `source` (this default); None, nothing written,
        where the range holds nothing the two could share (not aligned to
        the host's blocks)."""
        return False

    def clone_from(
        self, source: Storage, source_offset: int, offset: int, length: int
    ) -> bool | None:
        """share_from of a range that is whole host blocks on both sides,
        without its data: True when shared; False, nothing done, where
        this storage cannot share with `source` (this default); None,
        nothing done, where the range is not whole blocks inside the
        source (the caller writes the bytes)."""
        return False

    def may_share_with(self, source: Storage) -> bool:
        """Whether share_from and clone_from of `source`'s ranges are
        expected to share: an expectation (the host may still refuse), no
        promise. False here."""
        return False

    def can_copy_from(self, source: Storage) -> bool:
        """Whether copy_from(source, ...) copies without the bytes passing
        through this process (the host copies them); False: this default."""
        return False

    def copy_from(self, source: Storage, source_offset: int, offset: int, length: int) -> None:
        """Put the `length` bytes `source` holds at `source_offset` (zeros
        past its end) at `offset`. This default: read and written through
        one reused buffer, a piece at a time."""
        buf = _copy_buffer()
        while length:
            view = buf[: min(length, len(buf))]
            source.pread_padded(source_offset, view)
            self.pwrite(offset, view)
            n = len(view)
            source_offset += n
            offset += n
            length -= n

    def mapped(self, offset: int, length: int) -> memoryview | None:
        """[offset, offset+length) as a read-only view of the host's own
        copy (mapped, not read), alive while the view is; None where the
        storage cannot map it (this default) or it passes the end."""
        return None

    def mapping(self, offset: int, length: int) -> Mapping | None:
        """[offset, offset+length) mapped, for views of ranges inside it
        (Mapping.view: each as mapped() gives it); None where the storage
        cannot map it (this default) or it passes the end."""
        return None

    def start_writeback(self) -> None:  # noqa: B027 (a deliberate no-op default)
        """Start writing what was written so far back to the host's disk,
        without waiting for it: a later flush then has less to wait for.
        Nothing where the storage cannot (this default)."""

    def stream_writes(self) -> None:  # noqa: B027 (a deliberate no-op default)
        """The caller now writes much data that it does not read back, and
        flushes at the end: the storage may keep large writes out of its
        host's cache once they are on the disk, where that keeps every
        guarantee of its cache mode. Nothing where it cannot (this
        default)."""

    def lock(  # noqa: B027 (a deliberate no-op default)
        self,
        writable: bool,
        force_share: bool = False,
        perm: int | None = None,
        shared: int | None = None,
        prefix: str | None = None,
    ) -> None:
        """Take QEMU's permission locks (see qimg.locking) for this opener,
        replacing any held; raises ImageLockedError on a conflict. A storage
        whose host arbitrates access itself takes none (this default)."""

    def unlock(self) -> None:  # noqa: B027
        """Drop the locks `lock` took."""


# copy_file_range's refusals (another file system, a kind of file or a
# kernel that cannot): the bytes are copied through a buffer instead.
_COPY_REFUSED = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
)
# Storage.copy_from's buffer (per thread, reused: fresh memory costs a page
# fault per page).
_COPY_PIECE = 1 << 20
_copy_local = threading.local()


def _copy_buffer() -> memoryview:
    buf = getattr(_copy_local, "buf", None)
    if buf is None:
        buf = _copy_local.buf = memoryview(bytearray(_COPY_PIECE))
    return buf


def sector_length(storage: Storage) -> int:
    """QEMU's bdrv_getlength of a file: its size rounded up to whole
    512-byte sectors (the length QEMU's checks compare offsets with)."""
    return -(-storage.size() // 512) * 512


class Mapping:
    """A read-only mmap of a storage's bytes from host offset `start`:
    views of ranges inside it. The mapping goes with the last reference
    to it or to a view of it.

    A view's range is read ahead when it is taken (MADV_WILLNEED): pages
    not in the page cache were otherwise read a fault at a time (a 1 GiB
    scan of uncached data measured 3-5x the wall time of pread's, with it
    equal); cached, the mapping costs half the CPU of a pread copy. Only
    the views' ranges are advised: read ahead over a hole, a file system
    fills page cache with zeros."""

    def __init__(self, m, start: int):
        self._map = m
        self.start = start
        self.end = start + len(m)

    def view(self, offset: int, length: int) -> memoryview | None:
        """[offset, offset+length) of the host, or None where it is not
        inside the mapping."""
        import mmap

        lo = offset - self.start
        if lo < 0 or length <= 0 or offset + length > self.end:
            return None
        page = lo - lo % mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_WILLNEED, page, lo + length - page)
        except (AttributeError, OSError):
            pass  # advice only
        return memoryview(self._map)[lo : lo + length]


def _os_error(path: str, action: str, exc: OSError) -> ImageIOError:
    reason = exc.strerror or str(exc)
    return ImageIOError(f"Could not {action} '{path}': {reason}")


class FileStorage(Storage):
    """A regular file (or block device) opened by path.

    `perm` and `shared` are QEMU permission masks (see `qimg.locking`); when
    `lock` is true they are taken as byte-range locks the way QEMU's
    file-posix driver takes them, so QEMU and qimg refuse each other's
    conflicting access. With `create`, the file is created or emptied under
    QEMU's create lock (raw_co_create) first.

    `cache` (qimg.cachemode; writeback when None) sets the open flags
    (O_DIRECT, O_DSYNC) and whether flush() does anything. Under O_DIRECT
    every request reaches the file aligned to DIRECT_ALIGNMENT in offset,
    length and memory: an unaligned one goes through an aligned bounce
    buffer (a write's partial first and last blocks read, modified and
    written back, the file's length kept).
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
        cache: CacheMode | None = None,
    ):
        self.path = path
        self.writable = writable or create
        self.cache = cache or WRITEBACK
        flags = os.O_RDWR if self.writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT
        if self.cache.writethrough and self.writable:
            flags |= os.O_DSYNC
        self._direct = _DirectIO(self) if self.cache.direct else None
        self._fd = _open(path, flags, self.cache.direct, create)
        self._closed = False
        # Whether anything was written since the last flush: as QEMU's
        # write_gen, a flush with nothing new to make durable is skipped.
        self._unflushed = create
        self._locker = None
        self._share_refused = False  # see share_from
        self._copy_refused = False  # see copy_from
        self._fs: tuple[int, bool] | None = None  # see _file_system
        self._block: int | None = None
        self._behind = None  # see stream_writes
        # share_from's last source and its size then: a range inside that
        # size needs no fstat (a source cut short since makes the clone fail
        # with EINVAL, a refusal: the bytes are written instead).
        self._source_size: tuple[FileStorage, int] | None = None
        try:
            _check_file_type(self._fd, path)
            if create:
                # Ordering: the create lock is held before the file is emptied,
                # so an image in use elsewhere is never truncated.
                if lock:
                    self.lock(False, force_share, *create_masks(), prefix=f"{path}: ")
                os.ftruncate(self._fd, 0)
                self.unlock()
            if lock:
                self.lock(self.writable, force_share, perm, shared)
        except OSError as exc:
            self.close()
            raise _os_error(path, "create", exc) from None
        except BaseException:
            self.close()
            raise

    def lock(self, writable, force_share=False, perm=None, shared=None, prefix=None) -> None:
        from qimg.locking import ImageLock

        self.unlock()
        self._locker = ImageLock(
            self._fd, self.path, writable, force_share, perm=perm, shared=shared, prefix=prefix
        )

    def unlock(self) -> None:  # noqa: B027
        if self._locker is not None:
            self._locker.release()
            self._locker = None

    def pread(self, offset: int, length: int) -> bytes:
        """Read `length` bytes; bytes past the end of file are zero (a
        request QEMU refuses raises ImageIOError, see check_request)."""
        check_request(offset, length)
        if self._direct is not None:
            buf = bytearray(length)
            self._direct.readinto(offset, memoryview(buf))
            return bytes(buf)
        parts = []
        got = 0
        try:
            # Short reads happen at EOF for regular files; loop otherwise.
            while got < length:
                more = os.pread(self._fd, length - got, offset + got)
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
        if self._direct is not None:
            return self._direct.readinto(offset, memoryview(buffer).cast("B"))
        try:
            while total < n:
                got = os.preadv(self._fd, [buffer[total:]], offset + total)
                if got == 0:
                    break
                total += got
        except OSError as exc:
            raise _os_error(self.path, "read", exc) from None
        return total

    def pwrite(self, offset: int, data) -> None:
        view = memoryview(data)
        try:
            if self._direct is not None:
                self._direct.write(offset, view.cast("B"))
                return
            start, length = offset, view.nbytes
            while len(view):
                n = os.pwrite(self._fd, view[:WRITE_MAX], offset)
                view = view[n:]
                offset += n
            if self._behind is not None and length >= STREAM_MIN:
                self._behind.wrote(start, length)
        except OSError as exc:
            raise _os_error(self.path, "write", exc) from None
        finally:
            # Set once the write is done: a flush that clears the flag
            # after this point makes the write durable.
            self._unflushed = True

    def pwritev(self, offset: int, buffers: list) -> None:
        """Storage.pwritev: one system call for up to IOV_MAX buffers (the
        gathered bytes are never joined into a copy)."""
        if self._direct is not None:
            super().pwritev(offset, buffers)
            return
        views = [memoryview(b).cast("B") for b in buffers]
        try:
            # Counted only where stream_writes asked: this is convert's write path.
            start = offset
            length = sum(len(v) for v in views) if self._behind is not None else 0
            while views:
                n = os.pwritev(self._fd, _leading(views, WRITE_MAX), offset)
                offset += n
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
            if length >= STREAM_MIN:
                self._behind.wrote(start, length)
        except OSError as exc:
            raise _os_error(self.path, "write", exc) from None
        finally:
            self._unflushed = True  # as pwrite

    def stream_writes(self) -> None:
        """Storage.stream_writes: under writeback, whose final flush waits
        for every write anyway, the writes of STREAM_MIN bytes or more are
        dropped from the page cache behind the copy once they are on the
        disk (qimg.writeback.DropBehind): a copy of any size then takes a
        few dozen MiB of fresh page cache. Nothing under the other modes
        (unsafe never waits for the disk; O_DIRECT and O_DSYNC have their
        own ways), nor on tmpfs (its page cache is the file)."""
        if self._behind is not None or not self.writable or self._direct is not None:
            return
        if self.cache.no_flush or self.cache.writethrough:
            return
        from qimg import libc, writeback

        if libc.file_system_type(self._fd) in _MEMORY_FILE_SYSTEMS:
            return
        self._behind = writeback.DropBehind.for_fd(self._fd)

    def size(self) -> int:
        try:
            st = os.fstat(self._fd)
            if st.st_size == 0 and not _is_regular(st.st_mode):
                return os.lseek(self._fd, 0, os.SEEK_END)
            return st.st_size
        except OSError as exc:
            raise _os_error(self.path, "stat", exc) from None

    def allocated_size(self) -> int:
        """Bytes the host file occupies on disk (st_blocks * 512)."""
        try:
            return os.fstat(self._fd).st_blocks * 512
        except OSError as exc:
            raise _os_error(self.path, "stat", exc) from None

    def available_space(self) -> int | None:
        try:
            st = os.fstatvfs(self._fd)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def share_from(self, source: Storage, source_offset: int, offset: int, data) -> bool | None:
        """FICLONERANGE (qimg.reflink) of the part of the range aligned to
        the file system's blocks, written around it; False once the file
        system has refused (it is asked once per storage)."""
        view = memoryview(data).cast("B")
        part = self._clonable(source, source_offset, offset, len(view))
        if part is None or part is False:
            return part
        lo, hi = part
        shared = self._clone(source, source_offset + lo, offset + lo, hi - lo)
        if shared and lo:
            self.pwrite(offset, view[:lo])
        if shared and hi < len(view):
            self.pwrite(offset + hi, view[hi:])
        return shared

    def clone_from(
        self, source: Storage, source_offset: int, offset: int, length: int
    ) -> bool | None:
        part = self._clonable(source, source_offset, offset, length)
        if part is None or part is False:
            return part
        if part != (0, length):
            return None
        return self._clone(source, source_offset, offset, length)

    def _clonable(
        self, source: Storage, source_offset: int, offset: int, length: int
    ) -> tuple[int, int] | bool | None:
        """(lo, hi): the part of the range that FICLONERANGE can share;
        False where this file cannot share with `source`, None where no
        whole block of the range can be shared."""
        if self._share_refused or not isinstance(source, FileStorage):
            return False
        from qimg import reflink

        if self._block is None:
            self._block = reflink.block_size(self._fd)
        known = self._source_size
        if known is None or known[0] is not source or source_offset + length > known[1]:
            known = self._source_size = (source, source.size())
        lo, hi = reflink.aligned_part(source_offset, offset, length, known[1], self._block)
        return None if hi <= lo else (lo, hi)

    def _clone(self, source: FileStorage, source_offset: int, offset: int, length: int) -> bool:
        """FICLONERANGE of whole blocks; False (and never asked again) where
        the file system refuses."""
        from qimg import reflink

        try:
            shared = reflink.clone_range(source._fd, source_offset, self._fd, offset, length)
        except OSError as exc:
            raise _os_error(self.path, "write", exc) from None
        if not shared:
            self._share_refused = True
        return shared

    def may_share_with(self, source: Storage) -> bool:
        """Both files on one file system of a kind that shares extents
        (qimg.reflink.may_share), and this one has not refused."""
        if self._share_refused or not isinstance(source, FileStorage):
            return False
        mine, theirs = self._file_system(), source._file_system()
        return mine is not None and theirs is not None and mine[0] == theirs[0] and mine[1]

    def _file_system(self) -> tuple[int, bool] | None:
        """(st_dev, whether it shares extents) of the file system holding
        this file, looked up once: an open file stays on its file system
        (commit asks for every data piece). None where fstat fails."""
        if self._fs is None:
            from qimg import reflink

            try:
                dev = os.fstat(self._fd).st_dev
            except OSError:
                return None
            self._fs = (dev, reflink.may_share(self._fd))
        return self._fs

    def can_copy_from(self, source: Storage) -> bool:
        """Between two files opened without O_DIRECT and O_DSYNC on a file
        system that shares extents (may_share_with: the kernel's copy is
        then a clone), until the kernel has refused a copy (copy_from).
        Elsewhere the kernel copies through its page cache on one thread,
        and a commit of 1 GiB measured slower that way than read ahead on
        one thread and written on another (tmpfs, 7 alternating runs:
        0.87-7.1 s, median 4.9, against 0.63-2.6 s, median 1.1)."""
        if self._copy_refused or not isinstance(source, FileStorage):
            return False
        if self._direct is not None or source._direct is not None or self.cache.writethrough:
            return False
        return self.may_share_with(source)

    def copy_from(self, source: Storage, source_offset: int, offset: int, length: int) -> None:
        """Storage.copy_from by copy_file_range where can_copy_from (one
        copy in the kernel, or a clone where the file system shares
        extents); the buffered copy of the rest where the kernel refuses
        (it is not asked again) or the source ends."""
        if self.can_copy_from(source):
            try:
                while length:
                    n = os.copy_file_range(source._fd, self._fd, length, source_offset, offset)
                    if not n:
                        break  # the source's end: zeros for the rest
                    source_offset += n
                    offset += n
                    length -= n
            except OSError as exc:
                if exc.errno not in _COPY_REFUSED:
                    raise _os_error(self.path, "write", exc) from None
                self._copy_refused = True
            finally:
                self._unflushed = True  # as pwrite
        if length:
            super().copy_from(source, source_offset, offset, length)

    def mapped(self, offset: int, length: int) -> memoryview | None:
        """An mmap of the range (a Mapping of it, see there)."""
        mapping = self.mapping(offset, length)
        return None if mapping is None else mapping.view(offset, length)

    def mapping(self, offset: int, length: int) -> Mapping | None:
        """An mmap of the range. A file cut short under the mapping by
        another process (one that ignores the locks) would fault on access;
        the range is checked against the file's size when it is mapped."""
        import mmap

        if length <= 0 or offset < 0 or offset + length > self.size():
            return None
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            m = mmap.mmap(self._fd, offset + length - start, access=mmap.ACCESS_READ, offset=start)
        except (OSError, ValueError, OverflowError):
            return None
        return Mapping(m, start)

    def truncate(self, size: int) -> None:
        """file-posix's truncate, in its words ("Could not resize file");
        EFBIG (past the file system's limit) is a FileTooLargeError."""
        try:
            os.ftruncate(self._fd, size)
            self._unflushed = True
        except OSError as exc:
            error = FileTooLargeError if exc.errno == errno.EFBIG else ImageIOError
            raise error(f"Could not resize file: {exc.strerror or exc}") from None

    def fallocate(self, offset: int, length: int) -> None:
        """Reserve host blocks for [offset, offset+length) (may grow the file)."""
        if length <= 0:
            return
        try:
            os.posix_fallocate(self._fd, offset, length)
            self._unflushed = True
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
            _punch_hole(self._fd, offset, length)
            self._unflushed = True
        except OSError:
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
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
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
                hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
                runs.append((pos, hole - pos, True))
                pos = hole
        except (OSError, AttributeError):
            return [(offset, length, True)]
        return runs

    def flush(self) -> None:
        """fdatasync, as QEMU's file driver flushes; nothing under unsafe,
        nor when nothing was written since the last flush."""
        if self.writable and self._unflushed and not self.cache.no_flush:
            self._unflushed = False
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EROFS):
                    raise _os_error(self.path, "flush", exc) from None

    def start_writeback(self) -> None:
        """sync_file_range(SYNC_FILE_RANGE_WRITE) of the whole file: its
        dirty pages are queued for writing, not waited for. Nothing under
        unsafe (nothing is ever flushed), O_DIRECT (nothing is cached), or
        where the host has no such call."""
        if not self._unflushed or self.cache.no_flush or self._direct is not None:
            return
        from qimg import writeback

        writeback.start(self._fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.unlock()
            os.close(self._fd)


def open_storage(
    path: str,
    writable: bool = False,
    *,
    lock: bool = True,
    force_share: bool = False,
    perm: int | None = None,
    shared: int | None = None,
    cache: CacheMode | None = None,
) -> Storage:
    """The storage a host name opens (a file today; the one place where a
    network export would be told apart). `perm`/`shared` are the QEMU
    permission masks to lock (qimg.locking.image_perms; default: qcow2's);
    `cache` the cache mode (qimg.cachemode; default writeback)."""
    return FileStorage(
        path, writable, lock=lock, force_share=force_share, perm=perm, shared=shared, cache=cache
    )


def create_storage(path: str, *, lock: bool = True) -> Storage:
    """A new, empty, writable storage at `path`, as QEMU's raw_co_create
    makes one: an existing file is emptied, under the create lock."""
    return FileStorage(path, create=True, lock=lock)


def storage_exists(path: str) -> bool:
    """Whether `path` names something (a dangling symbolic link counts)."""
    return os.path.lexists(path)


def delete_storage(path: str) -> None:
    """Remove what a failed create made (QEMU's bdrv_co_delete_file);
    best effort."""
    try:
        os.unlink(path)
    except OSError:
        pass


def create_masks() -> tuple[int, int]:
    from qimg.locking import create_perms

    return create_perms()


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def _check_file_type(fd: int, path: str) -> None:
    """file-posix's raw_open_common: a directory (or socket, fifo) opened
    read-only is refused; block and character devices are QEMU's
    host_device driver's and accepted."""
    import stat

    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
        raise ImageIOError(f"'file' driver requires '{path}' to be a regular file")


def _fallocate():
    """fallocate(2) (qimg.libc), or None (the caller then writes zeros)."""
    import ctypes

    from qimg import libc

    return libc.function(
        "fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong
    )


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate = _fallocate()
    if fallocate is None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    if fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# O_DIRECT's alignment of offsets, lengths and buffers: the largest that
# QEMU's file driver probes (512 to 4096), so that it holds on every
# device the kernels here drive.
DIRECT_ALIGNMENT = 4096
# Writes that stream_writes drops behind the copy: this long at least (the
# tables' and other small writes stay cached).
STREAM_MIN = 256 << 10
# File systems whose page cache is the file itself (tmpfs): nothing can be
# dropped from it.
_MEMORY_FILE_SYSTEMS = frozenset({0x01021994})
# The largest bounce buffer (a thread's, reused): unaligned requests go
# through it this many bytes at a time.
_BOUNCE_SIZE = 4 << 20


def _open(path: str, flags: int, direct: bool, create: bool) -> int:
    """os.open in file-posix's words; O_DIRECT refused by the file system
    (EINVAL where the same open without it works) fails as QEMU's
    qemu_open fails: "filesystem does not support O_DIRECT"."""
    action = "create" if create else "open"
    flags |= getattr(os, "O_CLOEXEC", 0)
    if direct:
        flags |= os.O_DIRECT
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:
            try:
                os.close(os.open(path, flags & ~os.O_DIRECT, 0o644))
            except OSError:
                pass
            else:
                raise ImageIOError(
                    f"Could not {action} '{path}': filesystem does not support O_DIRECT"
                ) from None
        raise _os_error(path, action, exc) from None


def aligned_buffer(size: int) -> memoryview:
    """`size` bytes of fresh anonymous memory, page-aligned (so aligned
    for O_DIRECT); zero-filled. Private (a shared mapping faults each
    4 KiB page in through shmem), in small pages: a huge page is a 2 MiB
    block of free memory, which a VM that reports free memory to its host
    (virtio-balloon free page reporting) has handed back, and the host
    faults it in again on first touch. 16 buffers of 2 MiB measured
    16 ms first touch in small pages, and 5-270 ms in huge pages; convert
    of 1 GiB raw->qcow2 on ext4, 6 alternating runs: 0.47-0.81 s wall ->
    0.46-0.64 s. Only the pages a reader touches are faulted in."""
    import mmap

    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    m = mmap.mmap(-1, max(size, 1), flags=flags) if flags else mmap.mmap(-1, max(size, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # where THP is "always"
        try:
            m.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:
            pass  # advice only
    return memoryview(m)[:size]


def _address(view: memoryview) -> int:
    """The address of a contiguous buffer's first byte."""
    import numpy as np

    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


class _DirectIO:
    """A FileStorage's reads and writes under O_DIRECT: aligned requests go
    straight to the file, the others through a bounce buffer."""

    def __init__(self, storage: FileStorage):
        self.storage = storage
        self._local = threading.local()  # each thread's bounce buffer
        self._rmw = threading.Lock()  # one read-modify-write of blocks at a time

    @staticmethod
    def aligned(offset: int, view: memoryview) -> bool:
        a = DIRECT_ALIGNMENT
        return offset % a == 0 and len(view) % a == 0 and _address(view) % a == 0

    def _bounce(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = aligned_buffer(_BOUNCE_SIZE)
        return buf

    def _raw_read(self, offset: int, view: memoryview) -> int:
        """Aligned read into aligned `view`; bytes read (fewer at the end)."""
        fd, total, n = self.storage._fd, 0, len(view)
        try:
            while total < n:
                got = os.preadv(fd, [view[total:]], offset + total)
                total += got
                if got == 0 or total % DIRECT_ALIGNMENT:
                    break  # the end of the file
        except OSError as exc:
            raise _os_error(self.storage.path, "read", exc) from None
        return total

    def _raw_write(self, offset: int, view: memoryview) -> None:
        fd = self.storage._fd
        try:
            while len(view):
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise _os_error(self.storage.path, "write", exc) from None

    def readinto(self, offset: int, view: memoryview) -> int:
        """Read into `view`; the bytes read before the end of the file."""
        if self.aligned(offset, view):
            return self._raw_read(offset, view)
        a, bounce = DIRECT_ALIGNMENT, self._bounce()
        total, n = 0, len(view)
        while total < n:
            pos = offset + total
            lo = pos - pos % a
            want = min(n - total, _BOUNCE_SIZE - (pos - lo))
            hi = -(-(pos + want) // a) * a
            got = self._raw_read(lo, bounce[: hi - lo])
            take = max(0, min(want, got - (pos - lo)))
            view[total : total + take] = bounce[pos - lo : pos - lo + take]
            total += take
            if take < want:
                break
        return total

    def write(self, offset: int, view: memoryview) -> None:
        """Write all of `view` at `offset`. Unaligned: each bounce window's
        partial first and last blocks are read first (zeros past the end);
        a file that grew to a block boundary is cut back to its length."""
        if self.aligned(offset, view):
            self._raw_write(offset, view)
            return
        a, bounce = DIRECT_ALIGNMENT, self._bounce()
        with self._rmw:
            length = self.storage.size()
            end = offset + len(view)
            total, n, hi = 0, len(view), 0
            while total < n:
                pos = offset + total
                lo = pos - pos % a
                take = min(n - total, _BOUNCE_SIZE - (pos - lo))
                hi = -(-(pos + take) // a) * a
                if pos > lo:
                    self._read_block(lo, bounce[:a])
                if (pos + take) % a and (hi - a > lo or pos == lo):
                    self._read_block(hi - a, bounce[hi - a - lo : hi - lo])
                bounce[pos - lo : pos - lo + take] = view[total : total + take]
                self._raw_write(lo, bounce[: hi - lo])
                total += take
            if hi > max(length, end):
                self.storage.truncate(max(length, end))

    def _read_block(self, offset: int, view: memoryview) -> None:
        got = self._raw_read(offset, view)
        if got < len(view):
            view[got:] = bytes(len(view) - got)
