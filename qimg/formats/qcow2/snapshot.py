"""The snapshot table (spec: "Snapshots"): parse, bounded by QEMU's limits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qimg.errors import CorruptImageError, ImageIOError, InvalidImageError
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
    disk_size: int | None = None
    icount: int | None = None
    extra_data: bytes = b""


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
    id_str = _c_string(read(pos, id_len)) if id_len else ""
    pos += id_len
    name = _c_string(read(pos, name_len)) if name_len else ""
    pos += name_len
    snap = Snapshot(
        l1_off, l1_size, id_str, name, date_sec, date_nsec, vm_clock, vm_state, extra_data=extra
    )
    vm_large, disk_size, icount = L.SNAPSHOT_EXTRA_V3.unpack_from(
        extra[: L.SNAPSHOT_EXTRA_V3.size].ljust(L.SNAPSHOT_EXTRA_V3.size, b"\0")
    )
    if len(extra) >= 16:
        snap.vm_state_size = vm_large
        snap.disk_size = disk_size
    if len(extra) >= 24:
        snap.icount = icount
    return snap, extra_len, pos


def _c_string(data: bytes) -> str:
    return bytes(data).split(b"\0", 1)[0].decode("utf-8", "replace")


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
    """A read-only driver over an internal snapshot of `image`: the image's
    files and backing chain, mapped through the snapshot's L1 table.

    The view shares `image`'s storage and caches except the L2 cache;
    closing it does nothing (close `image` instead).
    """
    from qimg.formats.qcow2.cluster import ClusterMap
    from qimg.formats.qcow2.image import Qcow2Image

    snap = find_snapshot(image, snapshot_id, name)
    geo = image.geo
    if snap.l1_size * L.L1_ENTRY_SIZE > L.QCOW_MAX_L1_SIZE:
        raise InvalidImageError("Snapshot L1 table too large")
    # qcow2_validate_table: no bound by the file's size; past its end the
    # table reads as zeros.
    l1_bytes = snap.l1_size * L.L1_ENTRY_SIZE
    if snap.l1_table_offset % geo.cluster_size or snap.l1_table_offset + l1_bytes > (1 << 63) - 1:
        raise CorruptImageError("Snapshot L1 table offset invalid", snap.l1_table_offset)
    try:
        check_request(snap.l1_table_offset, l1_bytes)
    except ImageIOError:
        raise ImageIOError("Failed to read l1 table for snapshot") from None

    class SnapshotView(Qcow2Image):
        def close(self) -> None:
            # The files belong to `image`; only the view's own pool goes.
            pool = self.__dict__.get("_decompressor")
            if pool is not None and pool is not image.__dict__.get("_decompressor"):
                pool.close()
            self._decompressor = None

    view = SnapshotView.__new__(SnapshotView)
    view.__dict__.update(image.__dict__)
    view.writable = False
    view.size = snap.disk_size if snap.disk_size is not None else image.size
    view.clusters = ClusterMap(
        image, geo, snap.l1_table_offset, snap.l1_size, image.header.has_data_file
    )
    return view
