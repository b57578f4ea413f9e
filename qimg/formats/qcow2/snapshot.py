"""The snapshot table (spec: "Snapshots"): its one reader and one writer.

Entries are parsed and encoded here, beside each other, as QEMU's
qcow2_read_snapshots and qcow2_write_snapshots do; unknown extra data in an
entry is kept and written back unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from qimg.errors import CorruptImageError, FileTooLargeError, ImageIOError, InvalidImageError
from qimg.formats.qcow2 import layout as L
from qimg.storage import check_request


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

    def read(pos: int, n: int) -> bytes:
        try:
            return image.storage.pread(pos, n)
        except ImageIOError as exc:
            raise ImageIOError(f"Failed to read snapshot table: {exc}") from None

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
    return TableWritten(new, len(data), freed)


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
