"""The snapshot table (spec: "Snapshots"): its one reader and one writer.

Entries are parsed and encoded here, beside each other, as QEMU's
qcow2_read_snapshots and qcow2_write_snapshots do; unknown extra data in an
entry is kept and written back unchanged.
"""

from __future__ import annotations

import errno as _errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from qimg.errors import (
    CorruptImageError,
    FileTooLargeError,
    ImageIOError,
    InvalidImageError,
    QimgError,
)
from qimg.formats.qcow2 import layout as L
from qimg.storage import check_request

if TYPE_CHECKING:
    import numpy as np

# numpy (and entries.py, which needs it) are imported where tables are
# worked on: `info` reads the snapshot table without them.


@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None = None  # None: absent (QEMU takes the image's size)
    icount: int | None = None  # None: absent (QEMU takes -1, "no icount")
    # The extra data as read (at most SNAPSHOT_EXTRA_DATA_SIZE_MAX bytes):
    # its first SNAPSHOT_EXTRA_V3.size bytes are the fields above, the rest
    # is unknown to us and written back as it is.
    extra_data: bytes = b""
    # The id and name as stored (before decoding), so that a rewrite keeps
    # bytes that are not UTF-8; used while id_str and name are unchanged.
    raw_names: tuple[bytes, bytes] | None = field(default=None, repr=False, compare=False)


def parse_entry(
    read: Callable[[int, int], bytes], pos: int, extra_limit: int | None = None
) -> tuple[Snapshot, int, int]:
    """One snapshot table entry at `pos`: (snapshot, extra_data_size as
    stored, position just past the entry, unpadded).

    `read(offset, n)` returns the file's bytes there. At most `extra_limit`
    bytes of extra data are read and kept in `extra_data` (the rest is
    skipped); the spec's optional extra fields are taken from what is kept.
    Names are C strings to QEMU (qcow2_read_snapshots): each ends at its
    first NUL byte; they are decoded as UTF-8, undecodable bytes replaced.
    """
    (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state, extra_len) = (
        L.SNAPSHOT_HEADER.unpack(read(pos, L.SNAPSHOT_HEADER.size))
    )
    pos += L.SNAPSHOT_HEADER.size
    kept = extra_len if extra_limit is None else min(extra_len, extra_limit)
    extra = read(pos, kept) if kept else b""
    pos += extra_len
    id_raw = _c_bytes(read(pos, id_len)) if id_len else b""
    pos += id_len
    name_raw = _c_bytes(read(pos, name_len)) if name_len else b""
    pos += name_len
    id_str, name = _decode(id_raw), _decode(name_raw)
    snap = Snapshot(
        l1_off, l1_size, id_str, name, date_sec, date_nsec, vm_clock, vm_state, extra_data=extra
    )
    snap.raw_names = (id_raw, name_raw)
    vm_large, disk_size, icount = L.SNAPSHOT_EXTRA_V3.unpack_from(
        extra[: L.SNAPSHOT_EXTRA_V3.size].ljust(L.SNAPSHOT_EXTRA_V3.size, b"\0")
    )
    # Each field counts where the extra data reaches its end (QEMU's
    # endof(QCowSnapshotExtraData, field) tests).
    if len(extra) >= 8:
        snap.vm_state_size = vm_large
    if len(extra) >= 16:
        snap.disk_size = disk_size
    if len(extra) >= 24:
        snap.icount = icount
    return snap, extra_len, pos


def encode_entry(sn: Snapshot, image_size: int) -> bytes:
    """One table entry as qcow2_write_snapshots writes it (unpadded): the
    extra data is at least SNAPSHOT_EXTRA_V3.size bytes, its known fields
    from `sn` (absent ones as QEMU keeps them: the disk size `image_size`,
    icount -1), then the unknown rest of `sn.extra_data` unchanged. A VM
    state size that does not fit 32 bits is 0 in the entry header, so that
    older readers take a disk-only snapshot."""
    id_b, name_b = _names(sn)
    extra_size = max(L.SNAPSHOT_EXTRA_V3.size, len(sn.extra_data))
    vm_state32 = sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0
    head = L.SNAPSHOT_HEADER.pack(
        sn.l1_table_offset, sn.l1_size, len(id_b), len(name_b), sn.date_sec,
        sn.date_nsec, sn.vm_clock_nsec, vm_state32, extra_size,
    )  # fmt: skip
    known = L.SNAPSHOT_EXTRA_V3.pack(
        sn.vm_state_size,
        image_size if sn.disk_size is None else sn.disk_size,
        L.UINT64_MAX if sn.icount is None else sn.icount,
    )
    return head + known + sn.extra_data[L.SNAPSHOT_EXTRA_V3.size :] + id_b + name_b


def encode_table(snapshots: list[Snapshot], image_size: int) -> bytes:
    """The whole table: each entry starts 8-aligned, the last is not padded."""
    out = bytearray()
    for sn in snapshots:
        out += bytes(-len(out) % 8)
        out += encode_entry(sn, image_size)
    return bytes(out)


def _names(sn: Snapshot) -> tuple[bytes, bytes]:
    """The id and name bytes to write: as read while unchanged."""
    raw = sn.raw_names
    id_b = raw[0] if raw and _decode(raw[0]) == sn.id_str else sn.id_str.encode()
    name_b = raw[1] if raw and _decode(raw[1]) == sn.name else sn.name.encode()
    # Names are C strings to QEMU: each ends at its first NUL.
    return _c_bytes(id_b), _c_bytes(name_b)


def _c_bytes(data: bytes) -> bytes:
    return bytes(data).split(b"\0", 1)[0]


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def read_snapshots(image) -> tuple[list[Snapshot], int]:
    """All snapshots of `image` and the table's size in bytes, read as
    QEMU's qcow2_read_snapshots reads them: past the end of the file the
    table reads as zeros; a table that breaks QEMU's limits, or a read QEMU's
    block layer refuses, raises."""
    h = image.header
    if not h.nb_snapshots:
        return [], 0
    offset = h.snapshots_offset
    if offset % image.geo.cluster_size:
        raise InvalidImageError("Snapshot table offset invalid")

    read = _TableReader(image.storage, offset).read
    snapshots = []
    pos = offset
    for i in range(h.nb_snapshots):
        # Each entry starts 8-aligned; the last one is not padded (QEMU's
        # qcow2_read_snapshots), so the table may end unaligned at EOF.
        pos = (pos + 7) & ~7
        snap, extra_len, pos = parse_entry(read, pos, L.SNAPSHOT_EXTRA_DATA_SIZE_MAX)
        if extra_len > L.SNAPSHOT_EXTRA_DATA_SIZE_MAX:
            raise InvalidImageError(f"Too much extra metadata in snapshot table entry {i}")
        if pos - offset > L.QCOW_MAX_SNAPSHOTS_SIZE:
            raise InvalidImageError("Snapshot table is too big")
        snapshots.append(snap)
    return snapshots, pos - offset


class _TableReader:
    """Reads of the table at `offset` served from chunks read ahead (a
    table of 65536 entries is not 200,000 small reads). Past the end of the
    file the table reads as zeros; a read the block layer refuses raises."""

    CHUNK = 1 << 20

    def __init__(self, storage, offset: int):
        self.storage = storage
        self.start = self.end = offset
        self.buf = b""

    def read(self, pos: int, n: int) -> bytes:
        if not (self.start <= pos and pos + n <= self.end):
            self._fill(pos, n)
        return self.buf[pos - self.start : pos - self.start + n]

    def _fill(self, pos: int, n: int) -> None:
        try:
            check_request(pos, n)
            try:
                data = self.storage.pread(pos, max(n, self.CHUNK))
            except ImageIOError:  # the read-ahead reaches too far: read exactly
                data = self.storage.pread(pos, n)
        except ImageIOError as exc:
            raise ImageIOError(f"Failed to read snapshot table: {exc}") from None
        self.start, self.end, self.buf = pos, pos + len(data), data


def read_snapshot_table(image) -> list[Snapshot]:
    """Every snapshot of `image`, in table order (see read_snapshots)."""
    return read_snapshots(image)[0]


class TableWritten(NamedTuple):
    offset: int  # the new table (0: no snapshots)
    size: int  # its length in bytes
    old_freed: bool  # False: the old table lay past the end of the file


def write_snapshot_table(
    image, snapshots: list[Snapshot], old: tuple[int, int] | None = None
) -> TableWritten:
    """Replace the snapshot table of `image` by `snapshots` (QEMU's
    qcow2_write_snapshots).

    `old` is the (offset, size) of the table being replaced; by default
    the one the header names. Ordering: the new table is written to newly
    allocated clusters and made durable with its refcounts; then the header
    names it (nb_snapshots and snapshots_offset in one header write,
    flushed); the old table's clusters are freed last. A crash at any point
    leaves the old or the new table named, never a partial one (at worst
    the other table's clusters leak).
    """
    data = encode_table(snapshots, image.size)
    if len(data) > L.QCOW_MAX_SNAPSHOTS_SIZE:
        raise FileTooLargeError("File too large")
    if old is None:
        h = image.header
        old = (h.snapshots_offset, snapshot_table_size(image)) if h.nb_snapshots else (0, 0)
    cs = image.geo.cluster_size
    new = 0
    if data:
        new = image.refcounts.alloc(-(-len(data) // cs))
        image.flush()
        # The new clusters are free of other metadata; the old table is
        # ignored by the overlap check (what a damaged header claims there
        # may not be a table at all).
        image.write_metadata(new, data, "snapshot-table")
    image.flush()
    h = image.header
    saved = (h.nb_snapshots, h.snapshots_offset)
    h.nb_snapshots, h.snapshots_offset = len(snapshots), new
    try:
        image.rewrite_header()
    except BaseException:
        h.nb_snapshots, h.snapshots_offset = saved
        raise
    old_offset, old_size = old
    freed = True
    if old_size:
        # QEMU's qcow2_free_clusters refuses a range past the end of file.
        freed = old_offset + old_size <= image.storage.size()
        if freed:
            image.refcounts.free(old_offset, old_size)
            discard_freed(image, _clusters_of(image, old_offset, old_size))
    return TableWritten(new, len(data), freed)


def _clusters_of(image, offset: int, length: int) -> range:
    cb = image.geo.cluster_bits
    return range(offset >> cb, (offset + length + image.geo.cluster_size - 1) >> cb)


def discard_freed(image, clusters) -> None:
    """Punch out those of `clusters` (indexes) whose refcount is now 0, as
    QEMU passes discards of clusters a snapshot operation frees
    (QCOW2_DISCARD_SNAPSHOT) down to the file. Ordering: nothing durable
    references them any more (only their refcounts may still say 1)."""
    import numpy as np

    punch = getattr(image.storage, "punch_hole", None)
    clusters = np.sort(np.asarray(clusters, dtype=np.int64))
    if punch is None or not len(clusters):
        return
    clusters = clusters[np.concatenate(([True], clusters[1:] != clusters[:-1]))]
    clusters = clusters[image.refcounts.get_many(clusters) == 0]
    cb = image.geo.cluster_bits
    cuts = np.flatnonzero(np.diff(clusters) != 1) + 1
    for run in np.split(clusters, cuts):
        if len(run):
            punch(int(run[0]) << cb, len(run) << cb)


def snapshot_table_size(image) -> int:
    try:
        return read_snapshots(image)[1]
    except (InvalidImageError, CorruptImageError, ImageIOError):
        return image.header.nb_snapshots * L.SNAPSHOT_HEADER.size


def find_snapshot(image, snapshot_id: str | None, name: str | None) -> Snapshot:
    """QEMU's bdrv_snapshot_load_tmp lookup: by id and/or name; a bare
    name also matches an id (bdrv_snapshot_load_tmp_by_id_or_name)."""
    snapshots, _size = read_snapshots(image)
    for snap in snapshots:
        if snapshot_id is not None and name is not None:
            if snap.id_str == snapshot_id and snap.name == name:
                return snap
        elif snapshot_id is not None:
            if snap.id_str == snapshot_id:
                return snap
        elif snap.name == name:
            return snap
    if snapshot_id is None and name is not None:
        for snap in snapshots:
            if snap.id_str == name:
                return snap
    raise InvalidImageError("Can't find snapshot")


def open_snapshot_view(image, snapshot_id: str | None, name: str | None):
    """A read-only driver over an internal snapshot of `image`: the same
    image mapped through the snapshot's L1 table (Qcow2Image.over_l1), as
    long as the image's current virtual size (qemu-img convert -l).

    Closing the view closes nothing of `image`'s (close `image` instead).
    """
    snap = find_snapshot(image, snapshot_id, name)
    validate_l1(image, snap, "Failed to read l1 table for snapshot")
    return image.over_l1(snap.l1_table_offset, snap.l1_size)


def validate_l1(image, snap: Snapshot, read_error: str) -> None:
    """QEMU's qcow2_validate_table on a snapshot's L1 table: no bound by
    the file's size (past its end the table reads as zeros)."""
    if snap.l1_size * L.L1_ENTRY_SIZE > L.QCOW_MAX_L1_SIZE:
        raise InvalidImageError("Snapshot L1 table too large")
    l1_bytes = snap.l1_size * L.L1_ENTRY_SIZE
    offset = snap.l1_table_offset
    if offset % image.geo.cluster_size or offset + l1_bytes > L.INT64_MAX:
        raise CorruptImageError("Snapshot L1 table offset invalid", offset)
    try:
        check_request(offset, l1_bytes)
    except ImageIOError:
        raise ImageIOError(read_error) from None


# --- create, apply, delete (block/qcow2-snapshot.c) ------------------------------


class SnapshotError(QimgError):
    """Raised when: a snapshot cannot be created, applied or deleted.

    `errno` is the error number QEMU fails with there (qemu-img prints it
    for `snapshot -c`).
    """

    def __init__(self, message: str, errno: int = _errno.EIO):
        super().__init__(message)
        self.errno = errno


def _errno_error(errno: int) -> SnapshotError:
    return SnapshotError(os.strerror(errno), errno)


def find_new_snapshot_id(snapshots: list[Snapshot]) -> str:
    """QEMU's find_new_snapshot_id: one more than the largest id read as
    strtoul reads it (a leading number; none reads as 0)."""
    top = 0
    for sn in snapshots:
        top = max(top, _strtoul(sn.id_str))
    return str((top + 1) % (1 << 64))


def _strtoul(text: str) -> int:
    m = re.match(r"\s*([+-]?)(\d*)", text)
    if not m or not m.group(2):
        return 0
    value = min(int(m.group(2)), L.UINT64_MAX)
    return (-value) % (1 << 64) if m.group(1) == "-" else value


def find_by_id_or_name(snapshots: list[Snapshot], id_or_name: str) -> int:
    """QEMU's find_snapshot_by_id_or_name (snapshot -a): an id first, then
    a name; the index, or -1."""
    for key in ("id_str", "name"):
        for i, sn in enumerate(snapshots):
            if getattr(sn, key) == id_or_name:
                return i
    return -1


def find_by_name_or_id(snapshots: list[Snapshot], name: str) -> int:
    """QEMU's bdrv_snapshot_find (snapshot -d): a name first, then an id."""
    for key in ("name", "id_str"):
        for i, sn in enumerate(snapshots):
            if getattr(sn, key) == name:
                return i
    return -1


def _writable_qcow2(image) -> None:
    if not image.writable:
        raise SnapshotError("Permission denied", _errno.EACCES)


def create_snapshot(image, name: str, date_sec: int, date_nsec: int) -> Snapshot:
    """Take an internal snapshot of the active layer (QEMU's
    qcow2_snapshot_create, as qemu-img calls it: no VM state, VM clock 0,
    icount 0).

    Ordering: the L1 copy is written to new clusters; the refcount of every
    cluster the active L1 references is raised, and OFLAG_COPIED cleared
    where a cluster becomes shared, made durable; only then does the table
    name the snapshot. A crash before that leaks the copy and leaves raised
    refcounts (leaks), never a snapshot that shares clusters it does not
    count.
    """
    _writable_qcow2(image)
    snapshots = read_snapshot_table(image)
    if len(snapshots) >= L.QCOW_MAX_SNAPSHOTS:
        raise _errno_error(_errno.EFBIG)
    if image.header.has_data_file:
        raise _errno_error(_errno.ENOTSUP)
    clusters = image.clusters
    sn = Snapshot(
        l1_table_offset=0,
        l1_size=clusters.l1_size,
        id_str=find_new_snapshot_id(snapshots),
        # QEMUSnapshotInfo.name is char[256]: qemu-img keeps 255 bytes.
        name="",
        date_sec=date_sec,
        date_nsec=date_nsec,
        vm_clock_nsec=0,
        vm_state_size=0,
        disk_size=image.size,
        icount=0,
    )
    raw_name = _c_bytes(name.encode("utf-8", "surrogateescape"))[:255]
    sn.name = _decode(raw_name)
    sn.raw_names = (sn.id_str.encode(), raw_name)
    active = clusters.l1.copy()
    l1_bytes = len(active) * L.L1_ENTRY_SIZE
    try:
        if l1_bytes:
            cs = image.geo.cluster_size
            sn.l1_table_offset = image.refcounts.alloc(-(-l1_bytes // cs))
            # The copy keeps the flags the entries have now (as QEMU's).
            image.write_metadata(sn.l1_table_offset, _l1_bytes(active), "inactive-l1")
        _set_active_l1(image, update_snapshot_refcount(image, active, 1))
        write_snapshot_table(image, [*snapshots, sn])
    except QimgError as exc:
        raise _as_snapshot_error(exc) from None
    return sn


def apply_snapshot(image, id_or_name: str) -> Snapshot:
    """Make snapshot `id_or_name` the active layer (QEMU's
    qcow2_snapshot_goto): the virtual size becomes the snapshot's.

    Ordering: the refcounts of everything the snapshot references are
    raised and made durable before the active L1 table is overwritten with
    the snapshot's; the references of the old active layer are dropped only
    after that write (a crash in between leaks them). OFLAG_COPIED is then
    made right in the new active tables.
    """
    import numpy as np

    _writable_qcow2(image)
    snapshots = read_snapshot_table(image)
    if image.header.bitmaps_ext is not None and image.header.bitmaps_ext[0]:
        raise SnapshotError("Device has active dirty bitmaps", _errno.EBUSY)
    i = find_by_id_or_name(snapshots, id_or_name)
    if i < 0:
        raise SnapshotError(f"Failed to load snapshot: {os.strerror(_errno.ENOENT)}", _errno.ENOENT)
    sn = snapshots[i]
    validate_l1(image, sn, "Failed to read l1 table for snapshot")
    try:
        if sn.disk_size is not None and sn.disk_size != image.size:
            _set_virtual_size(image, sn.disk_size)
        if sn.l1_size > image.clusters.l1_size:
            _grow_l1(image, sn.l1_size)
        clusters = image.clusters
        raw = image.read_metadata(sn.l1_table_offset, sn.l1_size * L.L1_ENTRY_SIZE)
        sn_l1 = np.zeros(clusters.l1_size, dtype=np.uint64)
        sn_l1[: sn.l1_size] = np.frombuffer(raw, dtype=">u8")
        updated = update_snapshot_refcount(image, sn_l1[: sn.l1_size].copy(), 1)
        if not np.array_equal(updated, sn_l1[: sn.l1_size]):
            _write_l1(image, sn.l1_table_offset, updated, "inactive-l1")
        old = clusters.l1.copy()
        _write_l1(image, clusters.l1_offset, sn_l1, "l1")
        clusters.l1 = sn_l1
        freed: list = []
        update_snapshot_refcount(image, old, -1, freed)
        _set_active_l1(image, update_snapshot_refcount(image, sn_l1, 0))
        image.flush()
        discard_freed(image, np.concatenate(freed) if freed else [])
    except QimgError as exc:
        raise _as_snapshot_error(exc) from None
    return sn


def delete_snapshot(image, name: str) -> Snapshot:
    """Delete snapshot `name` (a name, else an id, as qemu-img's
    bdrv_snapshot_find; then QEMU's qcow2_snapshot_delete).

    Ordering: the table stops naming the snapshot first (durably); then
    the refcounts of what it referenced are lowered, its L1 table freed,
    and OFLAG_COPIED set in the active tables where a cluster is no longer
    shared. A crash after the table write only leaks clusters.
    """
    import numpy as np

    _writable_qcow2(image)
    snapshots = read_snapshot_table(image)
    i = find_by_name_or_id(snapshots, name)
    if i < 0:
        raise SnapshotError("snapshot not found", _errno.ENOENT)
    sn = snapshots[i]
    validate_l1(image, sn, "Failed to read l1 table for snapshot")
    try:
        write_snapshot_table(image, snapshots[:i] + snapshots[i + 1 :])
    except QimgError as exc:
        raise SnapshotError(
            f"Failed to remove snapshot from snapshot list: {_as_snapshot_error(exc)}"
        ) from None
    try:
        raw = image.read_metadata(sn.l1_table_offset, sn.l1_size * L.L1_ENTRY_SIZE)
        freed: list = []
        sn_l1 = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        update_snapshot_refcount(image, sn_l1, -1, freed)
        if sn.l1_size:
            l1_bytes = sn.l1_size * L.L1_ENTRY_SIZE
            image.refcounts.free(sn.l1_table_offset, l1_bytes)
            freed.append(np.asarray(_clusters_of(image, sn.l1_table_offset, l1_bytes)))
    except QimgError as exc:
        raise SnapshotError(
            f"Failed to free the cluster and L1 table: {_as_snapshot_error(exc)}"
        ) from None
    try:
        _set_active_l1(image, update_snapshot_refcount(image, image.clusters.l1.copy(), 0))
        image.flush()
        discard_freed(image, np.concatenate(freed) if freed else [])
    except QimgError as exc:
        raise SnapshotError(
            f"Failed to update snapshot status in disk: {_as_snapshot_error(exc)}"
        ) from None
    return sn


def _as_snapshot_error(exc: QimgError) -> SnapshotError:
    if isinstance(exc, SnapshotError):
        return exc
    if str(exc) == "Reference count overflow":
        return _errno_error(_errno.EINVAL)  # update_refcount: -EINVAL on overflow
    if isinstance(exc, FileTooLargeError):
        return _errno_error(_errno.EFBIG)
    return SnapshotError(str(exc), _errno.EIO)


# --- the refcounts of a whole L1 tree ---------------------------------------------


def update_snapshot_refcount(
    image, l1: np.ndarray, addend: int, freed: list | None = None
) -> np.ndarray:
    """QEMU's qcow2_update_snapshot_refcount over the tree of the L1 table
    whose entries are `l1`: add `addend` (1, -1 or 0) to the refcount of
    every cluster the tree references (L2 tables; data clusters, normal and
    allocated-zero; each host cluster a compressed descriptor touches),
    and set OFLAG_COPIED in each L2 and L1 entry exactly where the
    cluster's refcount is then 1 (never on compressed entries). Returns the
    L1 entries with their flags so set (the caller writes them); L2 tables
    whose refcount falls to 0 are dropped from the cache unwritten.

    Ordering: with addend 1, the L2 cache depends on the refcount cache
    (raised counts are durable before the cleared flags that rely on them).
    Works on batches of whole L2 tables with numpy.
    """
    import numpy as np

    u64 = np.uint64
    cs = image.geo.cluster_size
    rc = image.refcounts
    cache = image.clusters.l2_cache
    out = l1.copy()
    l2_offsets = l1 & u64(L.L1E_OFFSET_MASK)
    present = np.flatnonzero(l2_offsets)
    unaligned = present[(l2_offsets[present] % u64(cs)) != 0]
    if len(unaligned):
        i = int(unaligned[0])
        message = f"L2 table offset {int(l2_offsets[i]):#x} unaligned (L1 index: {i:#x})"
        image.signal_corruption(message)
        raise CorruptImageError("Input/output error", int(l2_offsets[i]))
    if addend > 0:
        cache.set_dependency(rc.blocks)
    batch = max(1, min(32, cache.capacity // 2))
    for a in range(0, len(present), batch):
        index = present[a : a + batch]
        offsets = [int(o) for o in l2_offsets[index]]
        tables = [cache.get(o) for o in offsets]
        flags_l1 = _update_tables(image, offsets, tables, addend, freed)
        out[index] = l2_offsets[index] | np.where(flags_l1, u64(L.QCOW_OFLAG_COPIED), u64(0))
    return out


def _update_tables(image, offsets: list[int], tables: list, addend: int, freed: list | None):
    """One batch of update_snapshot_refcount: the L2 tables at `offsets`
    (decoded `tables`). Returns, per table, whether its refcount is now 1;
    with a negative addend, appends to `freed` the clusters it may have
    freed."""
    import numpy as np

    from qimg.formats.qcow2 import entries as E
    from qimg.formats.qcow2.refcount import expand_runs

    u64 = np.uint64
    geo = image.geo
    rc = image.refcounts
    cache = image.clusters.l2_cache
    n = len(E.descriptors(tables[0]))
    desc = np.concatenate([E.descriptors(t) for t in tables])
    types = E.cluster_types(desc, geo.extended_l2, False)
    host = np.flatnonzero(E.has_host_cluster(types))
    host_off = E.host_offsets(desc[host])
    if np.any(host_off & u64(geo.cluster_size - 1)):
        _unaligned_data(image, offsets, desc.reshape(-1, n), host)
    data = (host_off >> u64(geo.cluster_bits)).view(np.int64)  # offsets < 2**56
    tables_at = np.array(offsets, dtype=np.int64) >> geo.cluster_bits
    first, count = E.compressed_clusters(desc[types == E.CLUSTER_COMPRESSED], geo)
    # Data clusters as runs (a preallocated image has long ones).
    cuts = np.flatnonzero(np.diff(data) != 1) + 1
    run_starts = data[np.concatenate(([0], cuts))] if len(data) else data
    run_counts = np.diff(np.concatenate((np.concatenate(([0], cuts)), [len(data)])))
    if addend:
        rc.change_runs(run_starts, run_counts, addend)
        if len(first):
            rc.change_runs(first, count, addend)
        rc.change_many(tables_at, addend)
    counts = rc.get_runs(run_starts, run_counts)
    table_counts = rc.get_many(tables_at)
    if addend < 0 and freed is not None:
        spans = expand_runs(first, count)
        freed += [data[counts == 0], spans[rc.get_many(spans) == 0], tables_at[table_counts == 0]]
    flag = u64(L.QCOW_OFLAG_COPIED)
    # OFLAG_COPIED exactly on entries whose cluster has refcount 1.
    new = desc & ~flag
    new[host[counts == 1]] |= flag
    changed = np.flatnonzero((new != desc).reshape(-1, n).any(axis=1))
    for t in changed.tolist():
        if table_counts[t] == 0:
            continue
        E.descriptors(tables[t])[:] = new[t * n : (t + 1) * n]
        cache.mark_dirty(offsets[t])
    for t in np.flatnonzero(table_counts == 0).tolist():
        cache.drop(offsets[t])  # freed: never written again
    return table_counts == 1


def _unaligned_data(image, offsets: list[int], desc, host) -> None:
    """QEMU's corruption report for an unaligned data cluster offset."""
    import numpy as np

    from qimg.formats.qcow2 import entries as E

    bad = np.zeros(desc.size, dtype=bool)
    bad[host] = True
    bad &= (E.host_offsets(desc) & np.uint64(image.geo.cluster_size - 1) != 0).reshape(-1)
    t, j = (int(x[0]) for x in np.nonzero(bad.reshape(desc.shape)))
    image.signal_corruption(
        f"Cluster allocation offset {int(E.host_offsets(desc[t, j])):#x} unaligned "
        f"(L2 offset: {offsets[t]:#x}, L2 index: {j:#x})"
    )
    raise CorruptImageError("Input/output error", offsets[t])


def _l1_bytes(l1: np.ndarray) -> bytes:
    return l1.astype(">u8").tobytes()


def _write_l1(image, offset: int, l1: np.ndarray, kind: str) -> None:
    """Write a whole L1 table, durably (bdrv_pwrite_sync), after every
    dirty table it may point at."""
    image.flush()
    image.write_metadata(offset, _l1_bytes(l1), kind)
    image.storage.flush()


def _set_active_l1(image, l1: np.ndarray) -> None:
    """Make `l1` the active L1's entries (same size), written when changed."""
    import numpy as np

    clusters = image.clusters
    if np.array_equal(l1, clusters.l1):
        image.flush()
        return
    _write_l1(image, clusters.l1_offset, l1, "l1")
    clusters.l1 = l1


def _set_virtual_size(image, size: int) -> None:
    """The virtual size `size` (QEMU's qcow2_co_truncate as snapshot goto
    calls it): a larger size grows the L1 table first; the header's size is
    then written. Shrinking drops nothing here: the caller replaces the
    whole active L1 table next, dropping every old reference."""
    if size > image.size:
        needed = image.geo.l1_entries_for(size)
        if needed > image.clusters.l1_size:
            _grow_l1(image, needed)
    image.header.size = size
    image.size = size // L.BDRV_SECTOR_SIZE * L.BDRV_SECTOR_SIZE
    image.rewrite_header()


def _grow_l1(image, l1_size: int) -> None:
    """QEMU's qcow2_grow_l1_table with exact_size: the active L1 table
    becomes `l1_size` entries long.

    Ordering: the new table is written to new clusters and made durable;
    the header then names it (one header write, flushed); the old table's
    clusters are freed last (a crash leaks one table, never loses one).
    """
    import numpy as np

    clusters = image.clusters
    if l1_size * L.L1_ENTRY_SIZE > L.QCOW_MAX_L1_SIZE:
        raise _errno_error(_errno.EFBIG)
    new_l1 = np.zeros(l1_size, dtype=np.uint64)
    new_l1[: clusters.l1_size] = clusters.l1
    cs = image.geo.cluster_size
    offset = image.refcounts.alloc(-(-(l1_size * L.L1_ENTRY_SIZE) // cs))
    _write_l1(image, offset, new_l1, "l1")
    h = image.header
    old_offset, old_size = clusters.l1_offset, clusters.l1_size
    saved = (h.l1_size, h.l1_table_offset)
    h.l1_size, h.l1_table_offset = l1_size, offset
    try:
        image.rewrite_header()
    except BaseException:
        h.l1_size, h.l1_table_offset = saved
        raise
    clusters.l1, clusters.l1_offset, clusters.l1_size = new_l1, offset, l1_size
    if old_size:
        image.refcounts.free(old_offset, old_size * L.L1_ENTRY_SIZE)
