"""The snapshot table (spec: "Snapshots"): parse, bounded by QEMU's limits."""

from __future__ import annotations

from dataclasses import dataclass

from qimg.errors import CorruptImageError, InvalidImageError
from qimg.formats.qcow2 import layout as L


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


def read_snapshots(image) -> tuple[list[Snapshot], int]:
    """All snapshots of `image` and the table's size in bytes."""
    h = image.header
    if not h.nb_snapshots:
        return [], 0
    file_size = image.storage.size()
    offset = h.snapshots_offset
    if offset % image.geo.cluster_size or offset >= file_size:
        raise InvalidImageError("Snapshot table offset invalid")
    snapshots = []
    pos = offset
    for _ in range(h.nb_snapshots):
        head = image.storage.pread(pos, L.SNAPSHOT_HEADER.size)
        (l1_off, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state, extra_len) = (
            L.SNAPSHOT_HEADER.unpack(head)
        )
        if extra_len > L.SNAPSHOT_EXTRA_DATA_SIZE_MAX:
            raise InvalidImageError("Too much extra metadata in snapshot table entry")
        pos += L.SNAPSHOT_HEADER.size
        extra = image.storage.pread(pos, extra_len)
        pos += extra_len
        id_str = image.storage.pread(pos, id_len).decode("utf-8", "replace")
        pos += id_len
        name = image.storage.pread(pos, name_len).decode("utf-8", "replace")
        pos += name_len
        pos = (pos + 7) & ~7
        if pos - offset > L.QCOW_MAX_SNAPSHOTS_SIZE:
            raise InvalidImageError("Snapshot table is too big")
        if pos > file_size:
            raise CorruptImageError("Snapshot table lies past the end of the file", offset)
        snap = Snapshot(
            l1_off, l1_size, id_str, name, date_sec, date_nsec, vm_clock, vm_state, extra_data=extra
        )
        if extra_len >= 16:
            vm_large, disk_size = L.SNAPSHOT_EXTRA_V3.unpack_from(extra.ljust(24, b"\0"))[:2]
            snap.vm_state_size = vm_large
            snap.disk_size = disk_size
        if extra_len >= 24:
            snap.icount = L.SNAPSHOT_EXTRA_V3.unpack_from(extra)[2]
        snapshots.append(snap)
    return snapshots, pos - offset


def snapshot_table_size(image) -> int:
    try:
        return read_snapshots(image)[1]
    except (InvalidImageError, CorruptImageError):
        return image.header.nb_snapshots * L.SNAPSHOT_HEADER.size
