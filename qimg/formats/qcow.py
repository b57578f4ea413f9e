"""The qcow driver: QEMU's original "qcow" format (version 1), read only.

qcow shares its magic with qcow2 but has version 1. Its layout (QEMU's
block/qcow.c): a 48-byte header, one L1 table of L2 table offsets, L2
tables of cluster offsets. There are no refcounts, snapshots or header
extensions; a backing file name is stored anywhere in the file (the header
points at it) and its format is always probed. qimg reads such images (info,
convert, as a backing file) but does not create or write them.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from qimg.driver import (
    COMPRESSED,
    DATA,
    UNALLOCATED,
    Driver,
    DriverInfo,
    Extent,
    read_through_chain,
)
from qimg.errors import (
    CorruptImageError,
    ImageIOError,
    InvalidImageError,
    UnsupportedFeatureError,
)
from qimg.storage import Storage, check_request

# --- qcow (version 1) on-disk layout (block/qcow.c) ---------------------------

QCOW_MAGIC = 0x514649FB  # "QFI\xfb", as qcow2's
QCOW_VERSION = 1
# magic, version, backing_file_offset, backing_file_size, mtime, size,
# cluster_bits, l2_bits, padding, crypt_method, l1_table_offset
QCOW_HEADER = struct.Struct(">IIQIIQBBHIQ")
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_OFLAG_COMPRESSED = 1 << 63  # L2 entry: a compressed cluster
QCOW_MIN_CLUSTER_BITS, QCOW_MAX_CLUSTER_BITS = 9, 16
QCOW_MIN_L2_BITS, QCOW_MAX_L2_BITS = 6, 13  # L2 tables of 512 bytes to 64 KiB
QCOW_MAX_BACKING_FILE_NAME = 1023
QCOW_L1_ENTRY = 8  # bytes of one L1 or L2 entry (big-endian u64)
QCOW_MAX_L1_ENTRIES = ((1 << 31) - 1) // QCOW_L1_ENTRY  # INT_MAX / sizeof(uint64_t)
# QEMU's BDRV_REQUEST_MAX_BYTES: a longer read fails with EIO.
REQUEST_MAX_BYTES = ((1 << 31) - 1) & ~511
L2_CACHE_TABLES = 16  # QEMU's L2_CACHE_SIZE
BDRV_SECTOR_SIZE = 512

_EIO = "Input/output error"


@dataclass
class QcowHeader:
    """A qcow header, validated as QEMU's qcow_open validates it, with the
    L1 table and the backing file name it points at."""

    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int  # bytes, as stored (the virtual disk is size // 512 sectors)
    cluster_bits: int
    l2_bits: int
    crypt_method: int
    l1_table_offset: int
    l1_size: int = 0  # entries
    # The part of the L1 table inside the file; entries past it are zero.
    l1: tuple[int, ...] = ()
    backing_file: str | None = None
    backing_format: str | None = None  # qcow stores none: backing files are probed

    @classmethod
    def read(cls, storage: Storage, metadata_only: bool = False) -> QcowHeader:
        """qcow_open's checks, in its order and words. `metadata_only`
        (info) opens an encrypted image without its key."""
        raw = storage.pread(0, QCOW_HEADER.size)
        fields = QCOW_HEADER.unpack(raw)
        magic, version = fields[0], fields[1]
        if magic != QCOW_MAGIC:
            raise InvalidImageError("Image not in qcow format")
        if version != QCOW_VERSION:
            hint = "\nTry the 'qcow2' driver instead." if version in (2, 3) else ""
            raise UnsupportedFeatureError(
                f"qcow (v{QCOW_VERSION}) does not support qcow version {version}{hint}"
            )
        h = cls(*fields[2:8], fields[9], fields[10])
        h._validate(metadata_only)
        h._read_l1(storage)
        h._read_backing_file_name(storage)
        return h

    def _validate(self, metadata_only: bool) -> None:
        if self.size <= 1:
            raise InvalidImageError("Image size is too small (must be at least 2 bytes)")
        if not QCOW_MIN_CLUSTER_BITS <= self.cluster_bits <= QCOW_MAX_CLUSTER_BITS:
            raise InvalidImageError("Cluster size must be between 512 and 64k")
        if not QCOW_MIN_L2_BITS <= self.l2_bits <= QCOW_MAX_L2_BITS:
            raise InvalidImageError("L2 table size must be between 512 and 64k")
        # (The key of an AES image is looked up by QcowImage, which has the
        # secrets; opened for metadata only, an image needs none.)
        if self.crypt_method > QCOW_CRYPT_AES:
            raise InvalidImageError("invalid encryption method in qcow header")
        shift = self.cluster_bits + self.l2_bits
        if self.size > (1 << 64) - 1 - (1 << shift):
            raise InvalidImageError("Image too large")
        self.l1_size = (self.size + (1 << shift) - 1) >> shift
        if self.l1_size > QCOW_MAX_L1_ENTRIES:
            raise InvalidImageError("Image too large")

    def _read_l1(self, storage: Storage) -> None:
        """Only the part of the table inside the file is read (QEMU reads
        zeros past the end): memory stays bounded by the file's size."""
        nbytes = self.l1_size * QCOW_L1_ENTRY
        offset = self.l1_table_offset
        if nbytes > REQUEST_MAX_BYTES:
            raise ImageIOError(f"Could not open '{storage.path}': {_EIO}")
        try:
            check_request(offset, nbytes)
        except ImageIOError:
            raise ImageIOError(f"Could not open '{storage.path}': {_EIO}") from None
        inside = max(0, min(nbytes, storage.size() - offset)) // QCOW_L1_ENTRY
        data = storage.pread(offset, inside * QCOW_L1_ENTRY) if inside else b""
        self.l1 = struct.unpack(f">{inside}Q", data)

    def _read_backing_file_name(self, storage: Storage) -> None:
        if not self.backing_file_offset:
            return
        if self.backing_file_size > QCOW_MAX_BACKING_FILE_NAME:
            raise InvalidImageError("Backing file name too long")
        try:
            raw = storage.pread(self.backing_file_offset, self.backing_file_size)
        except ImageIOError:
            raise ImageIOError(f"Could not open '{storage.path}': {_EIO}") from None
        # A C string: it ends at the first NUL; an empty name is no backing file.
        self.backing_file = raw.split(b"\0", 1)[0].decode("utf-8", "replace") or None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


class QcowImage(Driver):
    """A qcow image opened read-only, reading through its backing file."""

    format_name = "qcow"

    def __init__(
        self,
        storage: Storage,
        header: QcowHeader,
        backing: Driver | None = None,
        *,
        metadata_only: bool = False,
        secrets: Mapping[str, bytes] | None = None,
        encrypt: Mapping[str, str] | None = None,
    ):
        # Legacy AES (qcow_open): its data is read through the cipher the
        # secret `encrypt.key-secret` names, the IV from the guest sector.
        self.cipher = None
        if header.crypt_method == QCOW_CRYPT_AES and not metadata_only:
            self.cipher = _aes_cipher(secrets or {}, encrypt or {})
        self.storage = storage
        self.header = header
        self.filename = storage.path
        self.writable = False
        self.backing = backing
        # QEMU's total_sectors: the stored size rounded down to whole sectors.
        self.size = header.size // BDRV_SECTOR_SIZE * BDRV_SECTOR_SIZE
        self.cluster_size = header.cluster_size
        self._l2_entries = 1 << header.l2_bits
        # Invariant: holds at most L2_CACHE_TABLES tables, keyed by L2 offset.
        # A qcow2 image above may read this one from several threads: the
        # caches are touched under the lock (the reads themselves are not).
        self._l2_cache: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self._cluster_cache: tuple[int, bytes] | None = None  # (host offset, data)

    # --- mapping --------------------------------------------------------------

    def _l2_table(self, l2_offset: int, guest: int) -> tuple[int, ...]:
        with self._lock:
            table = self._l2_cache.get(l2_offset)
            if table is not None:
                self._l2_cache.move_to_end(l2_offset)
                return table
        try:
            raw = self.storage.pread(l2_offset, self._l2_entries * QCOW_L1_ENTRY)
        except ImageIOError:
            # QEMU fails the block status (and the read) of this cluster.
            raise CorruptImageError(_EIO, l2_offset, guest_offset=guest) from None
        table = struct.unpack(f">{self._l2_entries}Q", raw)
        with self._lock:
            self._l2_cache[l2_offset] = table
            if len(self._l2_cache) > L2_CACHE_TABLES:
                self._l2_cache.popitem(last=False)
        return table

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """This image's own extents: DATA (host = file offset), COMPRESSED
        (host = the L2 entry) or UNALLOCATED, as qcow_co_block_status."""
        self._check_range(offset, length)
        out: list[Extent] = []
        end = offset + length
        cbits, shift = self.header.cluster_bits, self.header.cluster_bits + self.header.l2_bits
        pos = offset
        while pos < end:
            l1_index = pos >> shift
            l2_offset = self.header.l1[l1_index] if l1_index < len(self.header.l1) else 0
            table_end = min(end, (l1_index + 1) << shift)
            if not l2_offset:
                _append(out, Extent(UNALLOCATED, pos, table_end - pos, 0))
                pos = table_end
                continue
            table = self._l2_table(l2_offset, pos)
            while pos < table_end:
                n = min(table_end, ((pos >> cbits) + 1) << cbits) - pos
                entry = table[(pos >> cbits) & (self._l2_entries - 1)]
                _append(out, _extent(entry, pos, n, self.cluster_size))
                pos += n
        return out

    def allocated_extents(self, offset: int, length: int) -> list[tuple[int, int, bool, bool]]:
        out = []
        for ext in self.block_status(offset, length):
            if ext.kind != UNALLOCATED:
                out.append((ext.offset, ext.length, True, False))
                continue
            avail = (
                0
                if self.backing is None
                else max(0, min(ext.length, self.backing.size - ext.offset))
            )
            if avail:
                out += self.backing.allocated_extents(ext.offset, avail)
            if avail < ext.length:
                out.append((ext.offset + avail, ext.length - avail, False, True))
        return out

    # --- reading --------------------------------------------------------------

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        read_through_chain(self, offset, view)

    def read_layer(self, offset: int, view: memoryview) -> list[tuple[int, memoryview]]:
        """Read what this image holds of guest [offset, offset+len(view));
        return the (offset, part of view) runs left to its backing file."""
        pending = []
        for ext in self.block_status(offset, len(view)):
            dst = view[ext.offset - offset : ext.offset - offset + ext.length]
            if ext.kind == UNALLOCATED:
                pending.append((ext.offset, dst))
            elif ext.kind == COMPRESSED:
                cluster = self._decompress(ext.host)
                start = ext.offset & (self.cluster_size - 1)
                dst[:] = cluster[start : start + ext.length]
            else:
                # qcow_co_preadv: a cluster offset off a sector boundary is EIO.
                if (ext.host - (ext.offset & (self.cluster_size - 1))) % BDRV_SECTOR_SIZE:
                    raise ImageIOError(_EIO)
                self._read_data(ext, dst)
        return pending

    def _read_data(self, ext: Extent, dst: memoryview) -> None:
        """A data extent's bytes; past the end of the file zeros (before
        decryption, whole sectors of an encrypted image)."""
        if self.cipher is None:
            self.storage.pread_padded(ext.host, dst)
            return
        head = ext.offset % BDRV_SECTOR_SIZE  # host and guest agree modulo a sector
        span = -(-(head + ext.length) // BDRV_SECTOR_SIZE) * BDRV_SECTOR_SIZE
        raw = self.storage.pread(ext.host - head, span).ljust(span, b"\0")
        plain = self.cipher.decrypt((ext.offset - head) // BDRV_SECTOR_SIZE, raw)
        dst[:] = memoryview(plain)[head : head + ext.length]

    def _decompress(self, entry: int) -> bytes:
        """The cluster a compressed L2 entry describes (decompress_cluster):
        csize bytes at the offset, raw deflate that must fill the cluster."""
        from qimg.formats.qcow2.compress import inflate_raw

        cbits = self.header.cluster_bits
        host = entry & ((1 << (63 - cbits)) - 1)
        cached = self._cluster_cache  # one read of the attribute: (host, data)
        if cached is not None and cached[0] == host:
            return cached[1]
        csize = (entry >> (63 - cbits)) & (self.cluster_size - 1)
        try:
            data = inflate_raw(self.storage.pread(host, csize), self.cluster_size)
        except (CorruptImageError, ImageIOError):
            raise ImageIOError(_EIO) from None
        self._cluster_cache = (host, data)
        return data

    # --- writing: qimg does not write qcow images -------------------------------

    def write(self, offset: int, data) -> None:
        raise _not_written()

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        raise _not_written()

    def discard(self, offset: int, length: int) -> None:
        raise _not_written()

    def info(self) -> DriverInfo:
        """qcow has no format-specific info, no dirty bit and no backing
        format; an encrypted image is legacy AES."""
        h = self.header
        return DriverInfo(
            virtual_size=self.size,
            actual_size=self.storage.allocated_size(),
            cluster_size=self.cluster_size,
            backing_file=h.backing_file or None,
            encrypted=bool(h.crypt_method),
        )

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            if self.backing is not None:
                self.backing.close()
        finally:
            self.storage.close()


def _aes_cipher(secrets: Mapping[str, bytes], encrypt: Mapping[str, str]):
    """The open options checked as qcow_open checks them, then the cipher."""
    from qimg.formats.qcow2 import encryption

    encryption.check_open_options(QCOW_CRYPT_AES, encrypt)
    secret = encryption.lookup_secret(secrets, encrypt.get("key-secret"), encryption.KEY_SECRET)
    from qimg.crypto.sectors import qcow_aes_cipher

    return qcow_aes_cipher(encryption.utf8_secret(secret, encrypt["key-secret"]))


def _not_written() -> UnsupportedFeatureError:
    return UnsupportedFeatureError("qcow images can be read but not written by qimg")


def _extent(entry: int, offset: int, length: int, cluster_size: int) -> Extent:
    """The extent of one cluster's L2 `entry` (a part of it: [offset, +length))."""
    if not entry:
        return Extent(UNALLOCATED, offset, length, 0)
    if entry & QCOW_OFLAG_COMPRESSED:
        return Extent(COMPRESSED, offset, length, entry)
    return Extent(DATA, offset, length, entry + (offset & (cluster_size - 1)))


def _append(out: list[Extent], ext: Extent) -> None:
    """Add `ext`, merged with the last extent where it continues it (one
    compressed cluster stays one extent: its host is its L2 entry)."""
    if out:
        last = out[-1]
        joins = last.kind == ext.kind and last.offset + last.length == ext.offset
        if joins and ext.kind == UNALLOCATED:
            out[-1] = last._replace(length=last.length + ext.length)
            return
        if joins and ext.kind == DATA and last.host + last.length == ext.host:
            out[-1] = last._replace(length=last.length + ext.length)
            return
    out.append(ext)
