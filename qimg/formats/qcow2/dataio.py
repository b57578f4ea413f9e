"""Guest data I/O: the one path between guest clusters and host bytes.

Every read and write of guest data stored in host clusters passes here
(plain reads and writes, the COW of partly written clusters, zeros written
into allocated clusters, compressed cluster bytes), carrying the guest
offset and the host offset of the bytes. Encryption applies here and
nowhere else: a `SectorCipher` works on whole 512-byte sectors, with the IV
taken from the host sector (LUKS: QEMU's crypt_physical_offset) or from the
guest sector (legacy AES). Guest and host offsets of one byte are congruent
modulo the cluster size, so a sector of guest data is a sector of the host.

Invariants:
- with a cipher, every write is sector aligned (the cluster map rounds its
  writes out to `write_align` and fills the rounding from what the guest
  reads there); reads of any alignment are widened here; a read of whole
  sectors, MAPPED_READ bytes or more, decrypts from a mapping of the data
  file (Storage.mapped) straight into the caller's buffer;
- compressed clusters are stored as they are (QEMU never encrypts them);
- `host_holes_read_as_zeros` is False with a cipher: a hole in the host
  file holds no ciphertext, so block status may not report it as zeros.
"""

from __future__ import annotations

import threading
from typing import Protocol

SECTOR_SIZE = 512  # BDRV_SECTOR_SIZE; the sector of QEMU's qcow2 encryption


class SectorCipher(Protocol):
    """A cipher of 512-byte sectors, each with its own IV (sector number)."""

    #: True: the IV is the host sector (LUKS); False: the guest sector (AES).
    iv_from_host: bool
    #: True: decryptions in several threads at once use several cores
    #: (most of the work releases the GIL), and convert decrypts on its
    #: reader threads; False: it decrypts on one thread.
    parallel: bool

    def encrypt(self, sector: int, data, out=None):
        """Ciphertext of whole sectors `data`, the first being `sector`:
        a new buffer, or written into `out` (as long as `data`, possibly
        `data` itself) and `out` returned."""
        ...

    def decrypt(self, sector: int, data, out=None, *, split: bool = True):
        """Plaintext of whole sectors `data` (see encrypt); `split` False:
        all of it in the calling thread (passed only as False: a cipher
        that never spreads over threads may leave the keyword out)."""
        ...


class DataIO:
    """Guest data of one image, to and from its data file.

    `image` provides `check_overlap(offset, length, kind)` (the metadata
    overlap check of data writes into the image file itself) and
    `data_storage`, `storage`.
    """

    def __init__(self, image, cipher: SectorCipher | None = None):
        self.image = image
        self.cipher = cipher
        # While a write of guest bytes that a source storage also holds runs
        # (Qcow2Image.write_shared): (guest, length, source, source offset),
        # and what the data file answered (Storage.share_from; None: not
        # asked, or nothing to share); False is kept: it is not asked again.
        self.share: tuple | None = None
        self.shared: bool | None = None
        self._local = threading.local()  # per-thread ciphertext buffer

    @property
    def host_holes_read_as_zeros(self) -> bool:
        """Whether a hole in the host file may be reported as reading zeros
        without being read (QEMU's block status; off for encrypted images)."""
        return self.cipher is None

    @property
    def write_align(self) -> int:
        """The alignment every `write` must have (a sector with a cipher)."""
        return SECTOR_SIZE if self.cipher is not None else 1

    def _sector(self, guest: int, host: int) -> int:
        return (host if self.cipher.iv_from_host else guest) // SECTOR_SIZE

    def read(self, guest: int, host: int, view: memoryview) -> None:
        """Guest bytes at `guest`, stored at `host`, into `view`; bytes past
        the end of the file read as zeros (before decryption)."""
        storage = self.image.data_storage
        if self.cipher is None:
            storage.pread_padded(host, view)
            return
        head = host % SECTOR_SIZE
        if not head and not len(view) % SECTOR_SIZE:
            from qimg.crypto.sectors import ciphertext  # loaded with the cipher

            self._decrypt(self._sector(guest, host), ciphertext(storage, host, view), view)
            return
        span = -(-(head + len(view)) // SECTOR_SIZE) * SECTOR_SIZE
        raw = self._buffer(span)
        storage.pread_padded(host - head, raw)
        self._decrypt(self._sector(guest - head, host - head), raw, raw)
        view[:] = raw[head : head + len(view)]

    def _decrypt(self, sector: int, data, out) -> None:
        """Decrypt `data` into `out` (the same buffer, or another as long);
        in the calling thread where the image's split_decompression is off
        (convert's readers, compare: callers that read from several
        threads already)."""
        if getattr(self.image, "split_decompression", True):
            self.cipher.decrypt(sector, data, out=out)
        else:
            self.cipher.decrypt(sector, data, out=out, split=False)

    def write(self, guest: int, host: int, buffers: list) -> None:
        """Guest bytes (the concatenation of `buffers`) at `guest`, to their
        host clusters at `host`. Data writes into the image file pass the
        overlap check first."""
        image = self.image
        total = sum(len(b) for b in buffers)
        if not total:
            return
        if image.data_storage is image.storage:
            image.check_overlap(host, total, "data")
        if len(buffers) == 1 and self._shared(guest, host, buffers[0]):
            return
        if self.cipher is None:
            image.data_storage.pwritev(host, buffers)
            return
        if host % SECTOR_SIZE or total % SECTOR_SIZE:
            raise ValueError(f"unaligned encrypted write at host offset {host:#x}")
        # The caller's buffers stay as they are: the ciphertext goes to
        # this thread's buffer, reused from write to write, and is
        # written piece by piece while the rest is being encrypted.
        from qimg.crypto.sectors import encrypt_writing

        data = buffers[0] if len(buffers) == 1 else b"".join(buffers)
        storage = image.data_storage
        encrypt_writing(
            self.cipher,
            self._sector(guest, host),
            data,
            self._buffer(total),
            lambda at, piece: storage.pwrite(host + at, piece),
        )

    def _buffer(self, size: int) -> memoryview:
        """This thread's cipher buffer of `size` bytes (fresh memory would
        cost a page fault per 4 KiB on every call); valid until this
        thread's next read or write."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = bytearray(size)
        return memoryview(buf)[:size]

    def _shared(self, guest: int, host: int, data) -> bool:
        """Whether `data` (guest bytes at `guest`, nothing widened) went to
        `host` by sharing the extents of the source that holds them (see
        `share`). Never with a cipher: the host bytes are not the guest's,
        and `shared` says False at once (a copy then stops offering runs:
        finding them costs a SEEK_DATA scan of the source per chunk)."""
        if self.cipher is not None:
            self.shared = False
            return False
        if self.share is None or self.shared is False:
            return False
        start, length, source, source_offset = self.share
        if not start <= guest <= guest + len(data) <= start + length:
            return False
        where = source_offset + guest - start
        shared = self.image.data_storage.share_from(source, where, host, data)
        if shared is not None:
            self.shared = shared
        return bool(shared)

    def read_compressed(self, host: int, view: memoryview) -> None:
        """Compressed cluster bytes at `host` into `view` (zeros past the
        end of the file)."""
        self.image.data_storage.pread_padded(host, view)

    def write_compressed(self, host: int, data) -> None:
        """Compressed cluster bytes to `host` (overlap checked as `write`)."""
        image = self.image
        if image.data_storage is image.storage:
            image.check_overlap(host, len(data), "data")
        image.data_storage.pwrite(host, data)
