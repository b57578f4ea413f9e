"""The interface every format driver offers (raw, qcow2).

Convert, compare, map and measure are written once against it. Offsets and
lengths are in bytes of the guest (virtual) disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from qimg.errors import ImageIOError, QimgError

if TYPE_CHECKING:
    from qimg.storage import Storage

# Extent kinds, as block_status reports them.
DATA = 0  # host holds the data (host = host offset)
ZERO = 1  # reads as zeros (host = offset of a preallocated cluster, or 0)
UNALLOCATED = 2  # falls through to the backing file, or reads as zeros
COMPRESSED = 3  # one compressed cluster (host = the raw L2 entry)


class Extent(NamedTuple):
    """One run of `block_status`: guest [offset, offset+length) of one kind."""

    kind: int
    offset: int  # guest offset
    length: int
    host: int  # see the kinds above


@dataclass
class DriverInfo:
    """What a driver tells `qemu-img info` of its image: QEMU's
    BlockDriverInfo, bdrv_get_specific_info, backing file and snapshot list.
    Values are QAPI's (ImageInfo in qapi/block-core.json)."""

    virtual_size: int  # bdrv_getlength: whole 512-byte sectors
    actual_size: int  # bytes the image's storage occupies on its host
    cluster_size: int | None = None  # None: the format has no clusters
    backing_file: str | None = None  # as the image names it
    backing_format: str | None = None
    encrypted: bool = False
    dirty: bool = False
    snapshots: list[dict] = field(default_factory=list)  # SnapshotInfo values
    format_specific: dict | None = None  # ImageInfoSpecific: {"type", "data"}


class Driver:
    """Base of the format drivers; usable as a context manager."""

    format_name = ""
    filename: str
    size: int
    writable: bool
    backing: Driver | None = None
    # Opened with metadata changes pending a repair (qcow2's dirty bit with
    # lazy refcounts): a writable open repairs it first (qimg.api.open_image).
    dirty = False
    # The unit block status answers in and data is allocated in (qcow2: a
    # cluster), and the smallest unit a write allocates (a subcluster with
    # extended L2 entries). Sector-granular formats keep 512.
    cluster_bytes = 512
    grain_bytes = 512
    # Internal snapshots (QEMU's bdrv_snapshot_* callbacks).
    has_snapshots = False
    # A new image reads zeros where nothing was written (bdrv_has_zero_init;
    # not a raw LUKS volume, whose unwritten sectors decrypt to noise).
    has_zero_init = True
    # Whether each readinto maps its range anew (qcow2: L2 entries looked
    # up per request): a copy reading many chunks then does better to map
    # a large window once (host_extents) and read the storage directly.
    maps_per_read = False

    def info(self) -> DriverInfo:
        """What `qemu-img info` reports of this image (not of its backing)."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes [offset, offset+length)."""
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf) -> None:
        raise NotImplementedError

    def read_layer(self, offset: int, view: memoryview) -> list[tuple[int, memoryview]]:
        """Read what this image itself holds of guest [offset, offset+len(view))
        into `view`; return the (offset, part of view) runs it leaves to its
        backing file (read_through_chain). A driver without one reads all."""
        self.readinto(offset, view)
        return []

    def write(self, offset: int, data) -> None:
        raise NotImplementedError

    def write_runs(self, runs: list[tuple[int, object]]) -> None:
        """write() of each (offset, data) run, the runs sorted and disjoint
        (a driver may place them together: one allocation, one table
        update, gathered writes)."""
        for offset, data in runs:
            self.write(offset, data)

    def copies_from(self, source: Storage) -> bool:
        """Whether copy_runs from `source` copies host to host, the bytes
        never read into this process (Storage.can_copy_from); False: this
        default."""
        return False

    def copy_runs(self, runs: list[tuple[int, int, Storage, int]], scratch: memoryview) -> None:
        """write() of each (offset, length, source, source_offset) run (sorted,
        disjoint): the `length` bytes `source` holds at `source_offset`
        (zeros past its end). A driver may copy them host to host
        (Storage.copy_from) instead of reading them; this default reads
        each into `scratch` (as long as the longest run at least)."""
        for offset, length, source, source_offset in runs:
            view = scratch[:length]
            source.pread_padded(source_offset, view)
            self.write(offset, view)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def block_status(self, offset: int, length: int) -> list:
        """Extents (kind, offset, length, host) covering the range."""
        raise NotImplementedError

    def allocated_extents(self, offset: int, length: int) -> list[tuple[int, int, bool, bool]]:
        """(offset, length, is_data, is_zero) runs through the whole chain:
        `is_data` runs must be read, `is_zero` runs read as zeros."""
        raise NotImplementedError

    def host_extents(self, offset: int, length: int) -> list[tuple[int, int, Storage, int]]:
        """(offset, length, storage, host) runs of guest [offset,
        offset+length) whose bytes lie as they are (not compressed, not
        encrypted) at `host` in `storage`, data there (not a hole): what a
        copy may share instead of writing (write_shared). What is not
        listed must be read. Default: nothing."""
        return []

    def write_shared(self, offset: int, data, source: Storage, source_offset: int) -> bool | None:
        """write(offset, data), where `data` is what `source` holds at
        `source_offset`: the driver may share the source's host extents
        instead of writing the bytes (Storage.share_from). The data is
        written in any case; returns True when some of it was shared,
        False when the storage cannot share with `source` (asking again is
        no use: this default), None when nothing was offered to it (a
        write widened by copy-on-write, or not aligned to its blocks)."""
        self.write(offset, data)
        return False

    def write_shared_runs(self, runs: list[tuple[int, object, Storage, int]]) -> bool | None:
        """write_shared of each (offset, data, source, source_offset) run,
        in order (a driver may place them together: one allocation, one
        table update). All the data is written; the answer is write_shared's
        over the runs: False once the storage refused (the rest written
        plainly), True when some run was shared, None when none was offered."""
        result = None
        for i, (offset, data, source, source_offset) in enumerate(runs):
            shared = self.write_shared(offset, data, source, source_offset)
            if shared is False:
                for rest, rest_data, _s, _h in runs[i + 1 :]:
                    self.write(rest, rest_data)
                return False
            result = result or shared
        return result

    def flush(self) -> None:
        raise NotImplementedError

    def start_writeback(self) -> None:  # noqa: B027 (a deliberate no-op default)
        """Start writing the data written so far back to the host's disk,
        not waiting for it (Storage.start_writeback), so a later flush has
        less to wait for; nothing where the format cannot (this default)."""

    def stream_writes(self) -> None:  # noqa: B027 (a deliberate no-op default)
        """The caller now writes much guest data that it does not read
        back, and flushes at the end (Storage.stream_writes of the storage
        the data goes to); nothing where the format cannot (this default)."""

    def close(self) -> None:
        raise NotImplementedError

    def _check_range(self, offset: int, length: int) -> None:
        """Requests stay inside the virtual disk."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise QimgError(
                f"Request out of range: offset {offset}, length {length}, image size {self.size}"
            )

    def _check_writable(self) -> None:
        if not self.writable:
            raise ImageIOError(f"Image '{self.filename}' is opened read-only")

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_bytes(data) -> int:
    """The length of a run's data: its bytes, or (a run to copy from its
    source, Driver.copy_runs) the length itself."""
    return data if isinstance(data, int) else memoryview(data).nbytes


def read_through_chain(image: Driver, offset: int, view: memoryview) -> None:
    """Guest [offset, offset+len(view)) of `image` read through its backing
    chain image by image, never recursively (chains may be thousands deep):
    each image reads what it holds and hands its runs down; past the end of
    a shorter backing file, and below the last one, the runs read as zeros."""
    pending = image.read_layer(offset, view)
    node = image.backing
    while pending:
        below: list[tuple[int, memoryview]] = []
        for off, dst in pending:
            avail = 0 if node is None else max(0, min(len(dst), node.size - off))
            if avail < len(dst):
                dst[avail:] = bytes(len(dst) - avail)
            if avail:
                below += node.read_layer(off, dst[:avail])
        pending = below
        node = node.backing if node is not None else None
