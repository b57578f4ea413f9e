"""Damage qcow2 images at computed offsets, for the check/repair tests.

Every location is computed from the image's own metadata (header, L1, L2,
refcount table and blocks), never typed by hand, so the same damage works
for any cluster size and refcount width.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.header import Header
from qimg.formats.qcow2.snapshot import parse_entry


def struct_fields(layout: struct.Struct, names: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    """{name: (offset in the structure, struct format)} of each field of
    `layout`, named in its order (one format code per field, no padding)."""
    byte_order, codes = layout.format[0], layout.format[1:]
    assert byte_order in "<>!=" and codes.isalpha() and len(codes) == len(names), layout.format
    return {
        name: (struct.calcsize(byte_order + codes[:k]), byte_order + code)
        for k, (name, code) in enumerate(zip(names, codes))
    }


# Snapshot table entry fields (spec: "Snapshots"), laid out by
# layout.SNAPSHOT_HEADER: (offset in the entry, struct format).
SNAPSHOT_FIELDS = struct_fields(
    L.SNAPSHOT_HEADER,
    (
        "l1_table_offset",
        "l1_size",
        "id_str_size",
        "name_size",
        "date_sec",
        "date_nsec",
        "vm_clock_nsec",
        "vm_state_size",
        "extra_data_size",
    ),
)


def read_u64(path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8).ljust(8, b"\0"))[0]


def write_u64(path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value & 0xFFFFFFFFFFFFFFFF))


@dataclass
class Layout:
    """Where an image's metadata lies, read from the file itself."""

    path: str
    header: Header
    file_size: int

    @classmethod
    def read(cls, path) -> Layout:
        with open(path, "rb") as f:
            data = f.read(1 << L.MAX_CLUSTER_BITS)
            f.seek(0, 2)
            size = f.tell()
        return cls(str(path), Header.parse(data, size), size)

    @property
    def cluster_size(self) -> int:
        return 1 << self.header.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    # --- L1 / L2 -----------------------------------------------------------

    def l1_entry_offset(self, guest: int, l1_table_offset: int | None = None) -> int:
        l1 = self.header.l1_table_offset if l1_table_offset is None else l1_table_offset
        return l1 + (guest // (self.cluster_size * self.l2_entries)) * 8

    def l2_table(self, guest: int, l1_table_offset: int | None = None) -> int:
        """Host offset of the L2 table mapping `guest` (0 if none)."""
        return read_u64(self.path, self.l1_entry_offset(guest, l1_table_offset)) & L.L1E_OFFSET_MASK

    def l2_entry_offset(self, guest: int, l1_table_offset: int | None = None) -> int:
        l2 = self.l2_table(guest, l1_table_offset)
        assert l2, f"guest offset {guest:#x} has no L2 table"
        return l2 + ((guest // self.cluster_size) % self.l2_entries) * 8

    def l2_entry(self, guest: int, l1_table_offset: int | None = None) -> int:
        return read_u64(self.path, self.l2_entry_offset(guest, l1_table_offset))

    def data_cluster(self, guest: int) -> int:
        """Host cluster index holding guest offset `guest`."""
        host = self.l2_entry(guest) & L.L2E_OFFSET_MASK
        assert host, f"guest offset {guest:#x} is not allocated"
        return host // self.cluster_size

    def set_l2_entry(self, guest: int, value: int, l1_table_offset: int | None = None) -> None:
        write_u64(self.path, self.l2_entry_offset(guest, l1_table_offset), value)

    def set_l1_entry(self, guest: int, value: int) -> None:
        write_u64(self.path, self.l1_entry_offset(guest), value)

    # --- refcounts ---------------------------------------------------------

    @property
    def refcount_bits(self) -> int:
        return 1 << self.header.refcount_order

    @property
    def refblock_entries(self) -> int:
        return self.cluster_size * 8 // self.refcount_bits

    def reftable_entry_offset(self, block_index: int) -> int:
        return self.header.refcount_table_offset + block_index * 8

    def refblock(self, block_index: int) -> int:
        return read_u64(self.path, self.reftable_entry_offset(block_index)) & L.REFT_OFFSET_MASK

    def set_reftable_entry(self, block_index: int, value: int) -> None:
        write_u64(self.path, self.reftable_entry_offset(block_index), value)

    def _refcount_place(self, cluster: int) -> tuple[int, int, int]:
        """(byte offset, bit shift, width) of cluster's refcount entry."""
        block = self.refblock(cluster // self.refblock_entries)
        assert block, f"cluster {cluster} has no refcount block"
        index = cluster % self.refblock_entries
        bits = self.refcount_bits
        if bits >= 8:
            return block + index * bits // 8, 0, bits
        return block + index * bits // 8, (index * bits) % 8, bits

    def refcount(self, cluster: int) -> int:
        offset, shift, bits = self._refcount_place(cluster)
        with open(self.path, "rb") as f:
            f.seek(offset)
            raw = f.read(max(1, bits // 8))
        value = int.from_bytes(raw, "big")
        return (value >> shift) & ((1 << bits) - 1) if bits < 8 else value

    def set_refcount(self, cluster: int, value: int) -> None:
        offset, shift, bits = self._refcount_place(cluster)
        with open(self.path, "r+b") as f:
            f.seek(offset)
            if bits >= 8:
                f.write(value.to_bytes(bits // 8, "big"))
                return
            old = f.read(1)[0]
            mask = ((1 << bits) - 1) << shift
            f.seek(offset)
            f.write(bytes([(old & ~mask) | ((value << shift) & mask)]))

    # --- snapshots and bitmaps ----------------------------------------------

    def snapshot_entries(self) -> list[int]:
        """File offset of every snapshot table entry, in table order."""
        out = []
        pos = self.header.snapshots_offset
        with open(self.path, "rb") as f:

            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            for _ in range(self.header.nb_snapshots):
                out.append(pos)
                pos = (parse_entry(read, pos)[2] + 7) & ~7
        return out

    def snapshot_l1_offsets(self) -> list[int]:
        """l1_table_offset of every snapshot, in table order."""
        return [read_u64(self.path, pos) for pos in self.snapshot_entries()]

    def set_snapshot_field(self, index: int, name: str, value: int) -> None:
        """Overwrite one field of snapshot table entry `index` (big-endian)."""
        where, fmt = SNAPSHOT_FIELDS[name]
        with open(self.path, "r+b") as f:
            f.seek(self.snapshot_entries()[index] + where)
            f.write(struct.pack(fmt, value))

    def set_snapshot_table(self, nb_snapshots: int, offset: int | None = None) -> None:
        """Overwrite the header's snapshot count (and table offset)."""
        with open(self.path, "r+b") as f:
            f.seek(L.HEADER_OFF_NB_SNAPSHOTS)
            f.write(struct.pack(">I", nb_snapshots))
            if offset is not None:
                f.write(struct.pack(">Q", offset))

    def bitmap_tables(self) -> list[tuple[int, int]]:
        """(table offset, table size) of every bitmap in the directory."""
        ext = self.header.bitmaps_ext
        if ext is None:
            return []
        nb, _size, offset = ext
        out = []
        pos = offset
        with open(self.path, "rb") as f:
            for _ in range(nb):
                f.seek(pos)
                fields = L.BITMAP_DIRECTORY_ENTRY.unpack(f.read(L.BITMAP_DIRECTORY_ENTRY.size))
                out.append((fields[0], fields[1]))
                pos += L.BITMAP_DIRECTORY_ENTRY.size + fields[6] + fields[5]
                pos = (pos + 7) & ~7
        return out

    def set_dirty(self) -> None:
        """Set the dirty incompatible bit (lazy refcounts left unflushed)."""
        off = L.HEADER_OFF_INCOMPATIBLE_FEATURES
        write_u64(self.path, off, read_u64(self.path, off) | L.QCOW2_INCOMPAT_DIRTY)

    # --- truncation and far-away tables (test_truncated_qemu_parity.py) -------

    def compressed_offset(self, guest: int) -> int:
        """Host offset of the compressed data of the cluster holding `guest`."""
        entry = self.l2_entry(guest)
        assert entry & L.QCOW_OFLAG_COMPRESSED, f"guest offset {guest:#x} is not compressed"
        csize_shift = 62 - (self.header.cluster_bits - 8)
        return entry & ((1 << csize_shift) - 1)

    def snapshot_entry_size(self, index: int) -> int:
        """Bytes of snapshot table entry `index`, unpadded."""
        with open(self.path, "rb") as f:

            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            start = self.snapshot_entries()[index]
            return parse_entry(read, start)[2] - start

    def set_header_u64(self, offset: int, value: int) -> None:
        write_u64(self.path, offset, value)

    def set_header_u32(self, offset: int, value: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(">I", value))


def truncate(path, size: int) -> None:
    """Cut the file at `size` bytes."""
    with open(path, "r+b") as f:
        f.truncate(size)


# QEMU's BDRV_MAX_LENGTH: reads that end past it fail with EIO.
BDRV_MAX_LENGTH = ((1 << 63) - 1) & ~((1 << 30) - 1)

# --- header fields and extensions ---------------------------------------------

# Header fields (spec: "Header"): name -> (offset, struct format).
HEADER_FIELDS = struct_fields(
    L.HEADER_V2,
    (
        "magic",
        "version",
        "backing_file_offset",
        "backing_file_size",
        "cluster_bits",
        "size",
        "crypt_method",
        "l1_size",
        "l1_table_offset",
        "refcount_table_offset",
        "refcount_table_clusters",
        "nb_snapshots",
        "snapshots_offset",
    ),
)
HEADER_FIELDS.update(
    (name, (L.HEADER_V2_SIZE + offset, fmt))
    for name, (offset, fmt) in struct_fields(
        L.HEADER_V3_EXTRA,
        (
            "incompatible_features",
            "compatible_features",
            "autoclear_features",
            "refcount_order",
            "header_length",
        ),
    ).items()
)
HEADER_FIELDS["compression_type"] = (L.HEADER_COMPRESSION_TYPE_OFFSET, ">B")


def header_extension(ext_type: int, data: bytes, pad: bool = True) -> bytes:
    """One header extension (spec: "Header extensions"): type, length, data,
    padded to 8 bytes unless `pad` is false."""
    out = L.HEADER_EXTENSION.pack(ext_type, len(data)) + data
    return out + bytes(-len(data) % 8) if pad else out


def set_header_extensions(path, blob: bytes) -> None:
    """Write `blob` where the image's header extensions start (header_length),
    over what was there; `blob` should end with an end marker."""
    with open(path, "r+b") as f:
        head = f.read(L.HEADER_V3_MIN_SIZE)
        version = struct.unpack_from(">I", head, 4)[0]
        start = L.HEADER_V2_SIZE if version == 2 else struct.unpack_from(">I", head, 100)[0]
        f.seek(start)
        f.write(blob)


def set_header_field(path, name: str, value: int) -> None:
    """Overwrite one header field, named as in HEADER_FIELDS."""
    offset, fmt = HEADER_FIELDS[name]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def set_backing_file_name(path, name: bytes, offset: int = 0x300) -> None:
    """Put `name` (raw bytes, NULs and all) at `offset` in the first cluster
    and point the header's backing_file_offset/size at it."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(name)
        f.seek(8)
        f.write(struct.pack(">QI", offset, len(name)))
