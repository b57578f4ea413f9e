"""QEMU-compatible image locking, as QEMU's block/file-posix.c does it.

QEMU (qemu-img, qemu-io, qemu-nbd, qemu-system) advertises the permissions an
opener holds, and those it refuses to share with others, as shared (F_RDLCK)
one-byte open-file-description locks on the image file itself:

    byte RAW_LOCK_PERM_BASE + i     locked  <=>  the opener holds permission 1 << i
    byte RAW_LOCK_SHARED_BASE + i   locked  <=>  the opener does NOT share 1 << i

An opener may proceed only if, for every permission it wants, nobody has
locked the matching "not shared" byte, and for every permission it does not
share, nobody has locked the matching "held" byte.  Testing is done with
F_OFD_GETLK for an exclusive lock, which reports any other open file
description's shared lock on the byte and ignores the caller's own.

Ported from (names kept so the two can be read side by side):
    raw_apply_lock_bytes, raw_check_lock_bytes, raw_handle_perm_lock
        block/file-posix.c
    qemu_lock_fd, qemu_unlock_fd, qemu_lock_fd_test     util/osdep.c
    BLK_PERM_*                                          include/block/block-common.h

Invariant kept by `ImageLock`: an opener locks its own bytes *before* it tests
the other side's, so of two racing openers with conflicting claims at least
one sees the other and fails; both may fail, never both succeed.  On failure
every byte this opener locked is unlocked again before the error is raised.

What qemu-img 7.2 ends up holding on the file node (checked with /proc/locks
and strace against qemu-img/qemu-io 7.2):

    format   open                  perm bytes      not-shared bytes
    qcow2    read-write            100 101 103     201 203
    qcow2    read-only             100             201 203
    qcow2    read-only, -U         100             -
    raw      read-write            100 101         -     (resize: + 103)
    raw      read-only (-U or not) 100             -
    (create) raw_co_create         101 103         203

A format with metadata (qcow2) never shares write or resize of its file,
because its metadata is cached in memory (bdrv_default_perms_for_storage).
The raw format passes its user's permissions through and qemu-img shares
everything, so QEMU tools never exclude each other on a raw image; only a
guest device (which does not share write) does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from qimg.errors import BadOptionError, ImageIOError, ImageLockedError

__all__ = [
    "BLK_PERM_ALL",
    "BLK_PERM_CONSISTENT_READ",
    "BLK_PERM_RESIZE",
    "BLK_PERM_WRITE",
    "BLK_PERM_WRITE_UNCHANGED",
    "RAW_LOCK_PERM_BASE",
    "RAW_LOCK_SHARED_BASE",
    "ImageLock",
    "bdrv_perm_names",
    "create_perms",
    "image_perms",
]

# include/block/block-common.h (QEMU 7.2).  Bit 0x10 (the removed
# BLK_PERM_GRAPH_MOD) is outside BLK_PERM_ALL, so bytes 104/204 are never
# touched; QEMU <= 6.1 may still lock them, which 7.2 ignores too.
BLK_PERM_CONSISTENT_READ = 0x01
BLK_PERM_WRITE = 0x02
BLK_PERM_WRITE_UNCHANGED = 0x04
BLK_PERM_RESIZE = 0x08
BLK_PERM_ALL = 0x0F

# block/file-posix.c
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200

# bdrv_perm_names() in block.c, in bit order.
_PERM_NAMES = (
    (BLK_PERM_CONSISTENT_READ, "consistent read"),
    (BLK_PERM_WRITE, "write"),
    (BLK_PERM_WRITE_UNCHANGED, "write unchanged"),
    (BLK_PERM_RESIZE, "resize"),
)

# The permission bits in QEMU's PERM_FOREACH order (lowest first); the order
# decides which conflict is reported when several exist.
_PERM_BITS = tuple(bit for bit, _ in _PERM_NAMES)

# struct flock as the kernel takes it for F_OFD_*: short l_type, short
# l_whence, off_t l_start, off_t l_len, pid_t l_pid, padded to off_t alignment
# (32 bytes on x86-64 and arm64).  Python is built with a 64-bit off_t.
_FLOCK = struct.Struct("hhqqi0q")

# errno values meaning "this kernel or filesystem has no OFD locks here"; the
# open then proceeds without locking (see ImageLock).
_NO_LOCK_SUPPORT = frozenset(
    {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK, errno.ENOSYS}
)


def bdrv_perm_names(perm: int) -> str:
    """Readable names of the bits in `perm`, as QEMU's bdrv_perm_names()."""
    return ", ".join(name for bit, name in _PERM_NAMES if perm & bit)


def image_perms(
    writable: bool,
    force_share: bool = False,
    *,
    metadata: bool = True,
    resize: bool = False,
) -> tuple[int, int]:
    """The (perm, shared) masks qemu-img 7.2 ends up with on an image file.

    `metadata` is true for a format that keeps metadata in the file (qcow2):
    its driver takes write and resize whenever the image is writable and never
    shares write or resize unless force-share is on.  It is false for raw,
    whose driver passes qemu-img's own masks through: consistent read, write
    if writable, resize only if `resize` (qemu-img resize), sharing all.
    """
    if force_share and writable:
        raise BadOptionError("force-share=on can only be used with read-only images")
    perm = BLK_PERM_CONSISTENT_READ
    shared = BLK_PERM_ALL
    if metadata:
        if writable:
            perm |= BLK_PERM_WRITE | BLK_PERM_RESIZE
        if not force_share:
            shared &= ~(BLK_PERM_WRITE | BLK_PERM_RESIZE)
    else:
        if writable:
            perm |= BLK_PERM_WRITE
        if resize:
            perm |= BLK_PERM_RESIZE
    return perm, shared


def create_perms() -> tuple[int, int]:
    """The (perm, shared) masks QEMU's raw_co_create holds while it creates
    (truncates) an image file: write and resize, sharing all but resize."""
    return BLK_PERM_WRITE | BLK_PERM_RESIZE, BLK_PERM_ALL & ~BLK_PERM_RESIZE


def _flock(l_type: int, start: int) -> bytes:
    # l_pid must be 0 for F_OFD_* requests, or the kernel answers EINVAL.
    return _FLOCK.pack(l_type, os.SEEK_SET, start, 1, 0)


def qemu_lock_fd(fd: int, start: int) -> None:
    """Take a shared lock on byte `start` (raises OSError)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, start))


def qemu_unlock_fd(fd: int, start: int) -> None:
    """Drop this open file description's lock on byte `start`."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, start))


def qemu_lock_fd_test(fd: int, start: int) -> bool:
    """True if another open file description holds any lock on byte `start`
    (an exclusive lock could not be taken); this one's own locks never count."""
    reply = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, start))
    return _FLOCK.unpack(reply)[0] != fcntl.F_UNLCK


class ImageLock:
    """QEMU's lock bytes for one open file description, held until release().

    Taking the lock follows raw_handle_perm_lock(RAW_PL_PREPARE) for a fresh
    node (no previous permissions): lock the "held" bytes of `perm` and the
    "not shared" bytes of ~`shared` (raw_apply_lock_bytes), then test the
    other side's bytes (raw_check_lock_bytes); on any failure unlock what was
    taken and raise, so a failed open leaves no lock behind.

    `perm`/`shared` default to `image_perms(writable, force_share)`, the
    masks of a qcow2 image.  Where the kernel or filesystem refuses OFD locks
    (EINVAL, ENOTSUP, ENOLCK) on the first byte, the image is used unlocked
    and `self.enabled` is false.  QEMU's locking=auto skips locking only when
    the kernel lacks OFD locks (EINVAL); on a filesystem answering ENOLCK
    (NFS without lockd) it fails with "Failed to lock byte 100: No locks
    available".  qimg is deliberately more lenient there.

    Error messages are what qemu-img prints after "qemu-img: ", so the CLI
    can print "qimg: " + str(exc); `prefix` replaces the default
    "Could not open 'PATH': " (qemu-img create uses "PATH: ").
    """

    def __init__(
        self,
        fd: int,
        path: str,
        writable: bool,
        force_share: bool,
        *,
        perm: int | None = None,
        shared: int | None = None,
        prefix: str | None = None,
    ):
        self.fd = fd
        self.path = path
        # What qemu-img puts before the lock error: "Could not open 'PATH': "
        # when opening an image, "PATH: " when creating one (qemu-img create).
        self.prefix = f"Could not open '{path}': " if prefix is None else prefix
        if force_share and writable:
            raise BadOptionError(
                f"{self.prefix}force-share=on can only be used with read-only images"
            )
        default_perm, default_shared = image_perms(writable, force_share)
        self.perm = default_perm if perm is None else perm & BLK_PERM_ALL
        self.shared = default_shared if shared is None else shared & BLK_PERM_ALL
        # Byte offsets this object has locked and not yet unlocked.  Empty
        # after release(), after a failed __init__, and when locking is
        # unsupported here.
        self._locked: list[int] = []
        self.enabled = True
        try:
            self._apply_lock_bytes()
            if self.enabled:
                self._check_lock_bytes()
        except BaseException:
            self.release()
            raise

    def _apply_lock_bytes(self) -> None:
        """raw_apply_lock_bytes(): held bytes first, then not-shared bytes."""
        offsets = [RAW_LOCK_PERM_BASE + i for i, bit in enumerate(_PERM_BITS) if self.perm & bit]
        offsets += [
            RAW_LOCK_SHARED_BASE + i for i, bit in enumerate(_PERM_BITS) if not self.shared & bit
        ]
        for off in offsets:
            try:
                qemu_lock_fd(self.fd, off)
            except OSError as exc:
                if not self._locked and exc.errno in _NO_LOCK_SUPPORT:
                    # Nothing taken yet and the filesystem has no OFD locks.
                    self.enabled = False
                    return
                raise self._error(exc, f"Failed to lock byte {off}") from None
            self._locked.append(off)

    def _check_lock_bytes(self) -> None:
        """raw_check_lock_bytes(): nobody refuses to share what we hold, and
        nobody holds what we refuse to share."""
        for i, bit in enumerate(_PERM_BITS):
            if self.perm & bit:
                self._test(RAW_LOCK_SHARED_BASE + i, f'Failed to get "{bdrv_perm_names(bit)}" lock')
        for i, bit in enumerate(_PERM_BITS):
            if not self.shared & bit:
                self._test(
                    RAW_LOCK_PERM_BASE + i, f'Failed to get shared "{bdrv_perm_names(bit)}" lock'
                )

    def _test(self, off: int, what: str) -> None:
        # raw_handle_perm_lock appends the hint only to check failures, not to
        # failures to take our own bytes.
        hint = f"\nIs another process using the image [{self.path}]?"
        try:
            busy = qemu_lock_fd_test(self.fd, off)
        except OSError as exc:
            err = self._error(exc, what)
            raise type(err)(f"{err}{hint}") from None
        if busy:
            raise ImageLockedError(f"{self.prefix}{what}{hint}")

    def _error(self, exc: OSError, what: str) -> ImageLockedError | ImageIOError:
        """raw_lock_error_setg_errno(): EAGAIN/EACCES mean a conflicting lock
        and get no errno text; anything else is an OS failure, with it."""
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return ImageLockedError(self.prefix + what)
        return ImageIOError(f"{self.prefix}{what}: {os.strerror(exc.errno or 0)}")

    @property
    def locked_bytes(self) -> tuple[int, ...]:
        """The byte offsets currently locked through this object."""
        return tuple(self._locked)

    def release(self) -> None:
        """Unlock every byte taken; idempotent.  Closing the last descriptor
        of the open file description drops the locks as well."""
        while self._locked:
            off = self._locked.pop()
            try:
                qemu_unlock_fd(self.fd, off)
            except OSError:
                # Unlocking cannot conflict; if the fd is already gone the
                # kernel dropped the lock with it.  QEMU only warns here.
                pass
