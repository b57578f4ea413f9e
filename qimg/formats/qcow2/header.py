"""The qcow2 header and its extensions: parse, validate, serialize.

`Header.parse` bounds every field before anything else uses it, so the rest
of the driver may trust the numbers it finds here (spec: "Header",
"Header extensions").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qimg.errors import InvalidImageError, UnsupportedFeatureError
from qimg.formats.qcow2 import layout as L


@dataclass
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = L.QCOW_CRYPT_NONE
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = L.HEADER_V3_SIZE
    compression_type: int = L.QCOW2_COMPRESSION_TYPE_ZLIB
    # Header extensions and the backing file name.
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    bitmaps_ext: tuple[int, int, int] | None = None  # nb_bitmaps, directory size, offset
    crypto_ext: tuple[int, int] | None = None  # offset, length
    unknown_extensions: list[tuple[int, bytes]] = field(default_factory=list)
    # Bytes between the known header fields and header_length, kept verbatim.
    extra_header: bytes = b""

    # --- derived ---------------------------------------------------------

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & L.QCOW2_INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & L.QCOW2_INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & L.QCOW2_AUTOCLEAR_DATA_FILE_RAW)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & L.QCOW2_COMPAT_LAZY_REFCOUNTS)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & L.QCOW2_INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & L.QCOW2_INCOMPAT_CORRUPT)

    def copy(self) -> Header:
        return dataclasses.replace(
            self,
            feature_names=dict(self.feature_names),
            unknown_extensions=list(self.unknown_extensions),
        )

    # --- parse -------------------------------------------------------------

    @classmethod
    def parse(cls, buf: bytes, file_size: int | None = None) -> Header:
        """Parse and validate the header found at the start of `buf`.

        `buf` holds at least the first cluster of the file, or the whole file
        where it is shorter. Raises InvalidImageError or
        UnsupportedFeatureError with QEMU's wording.
        """
        if len(buf) < L.HEADER_V3_MIN_SIZE:
            # QEMU reads past the end of a short file as zeros.
            buf = bytes(buf).ljust(L.HEADER_V3_MIN_SIZE, b"\0")
        (
            magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
        ) = L.HEADER_V2.unpack_from(buf, 0)
        if magic != L.QCOW_MAGIC:
            raise InvalidImageError("Image is not in qcow2 format")
        if version < 2 or version > 3:
            raise UnsupportedFeatureError(f"Unsupported qcow2 version {version}")
        if cluster_bits < L.MIN_CLUSTER_BITS or cluster_bits > L.MAX_CLUSTER_BITS:
            raise InvalidImageError(f"Unsupported cluster size: 2^{cluster_bits}")
        h = cls(
            version=version,
            backing_file_offset=backing_file_offset,
            backing_file_size=backing_file_size,
            cluster_bits=cluster_bits,
            size=size,
            crypt_method=crypt_method,
            l1_size=l1_size,
            l1_table_offset=l1_table_offset,
            refcount_table_offset=refcount_table_offset,
            refcount_table_clusters=refcount_table_clusters,
            nb_snapshots=nb_snapshots,
            snapshots_offset=snapshots_offset,
        )
        cluster_size = 1 << cluster_bits
        if len(buf) < cluster_size:
            buf = bytes(buf).ljust(cluster_size, b"\0")  # zeros past EOF, as QEMU reads
        if version == 2:
            h.refcount_order = 4
            h.header_length = L.HEADER_V2_SIZE
        else:
            if len(buf) < L.HEADER_V3_MIN_SIZE:
                raise InvalidImageError("Could not read qcow2 header: Input/output error")
            (
                h.incompatible_features,
                h.compatible_features,
                h.autoclear_features,
                h.refcount_order,
                h.header_length,
            ) = L.HEADER_V3_EXTRA.unpack_from(buf, L.HEADER_V2_SIZE)
            if h.header_length < L.HEADER_V3_MIN_SIZE:
                raise InvalidImageError("qcow2 header too short")
            if h.header_length > cluster_size:
                raise InvalidImageError("qcow2 header exceeds cluster size")
            if h.header_length > len(buf):
                raise InvalidImageError("Could not read qcow2 header: Input/output error")
            if h.header_length > L.HEADER_COMPRESSION_TYPE_OFFSET:
                h.compression_type = buf[L.HEADER_COMPRESSION_TYPE_OFFSET]
            known_end = min(h.header_length, L.HEADER_V3_SIZE)
            h.extra_header = bytes(buf[known_end : h.header_length])

        ext_end = cluster_size
        if h.backing_file_offset:
            if h.backing_file_offset > cluster_size:
                raise InvalidImageError("Invalid backing file offset")
            ext_end = h.backing_file_offset
        h._parse_extensions(buf, h.header_length, min(ext_end, len(buf)))
        h._check_features()
        h._validate_fields(file_size)

        if h.backing_file_offset:
            if h.backing_file_size > L.QCOW_MAX_BACKING_FILE_NAME or h.backing_file_size > (
                cluster_size - h.backing_file_offset
            ):
                raise InvalidImageError("Backing file name too long")
            end = h.backing_file_offset + h.backing_file_size
            if end > len(buf):
                raise InvalidImageError("Could not read backing file name: Input/output error")
            h.backing_file = bytes(buf[h.backing_file_offset : end]).decode("utf-8", "replace")
        return h

    def _parse_extensions(self, buf: bytes, start: int, end: int) -> None:
        offset = start
        # Extensions end at an end marker or where the room for one runs out.
        while offset + L.HEADER_EXTENSION.size <= end:
            ext_type, ext_len = L.HEADER_EXTENSION.unpack_from(buf, offset)
            offset += L.HEADER_EXTENSION.size
            if ext_type == L.QCOW2_EXT_MAGIC_END:
                return
            if ext_len > end - offset:
                raise InvalidImageError("Header extension too large")
            data = bytes(buf[offset : offset + ext_len])
            if ext_type == L.QCOW2_EXT_MAGIC_BACKING_FORMAT:
                if ext_len > 1023:
                    raise InvalidImageError(f"ERROR: ext_backing_format: len={ext_len} too large")
                self.backing_format = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif ext_type == L.QCOW2_EXT_MAGIC_FEATURE_TABLE:
                for i in range(ext_len // L.FEATURE_TABLE_ENTRY.size):
                    ftype, bit, name = L.FEATURE_TABLE_ENTRY.unpack_from(
                        data, i * L.FEATURE_TABLE_ENTRY.size
                    )
                    self.feature_names[(ftype, bit)] = name.split(b"\0", 1)[0].decode(
                        "utf-8", "replace"
                    )
            elif ext_type == L.QCOW2_EXT_MAGIC_BITMAPS:
                if ext_len != L.BITMAPS_EXTENSION.size:
                    raise InvalidImageError("bitmaps_ext: Invalid extension length")
                nb, _reserved, dir_size, dir_offset = L.BITMAPS_EXTENSION.unpack(data)
                self.bitmaps_ext = (nb, dir_size, dir_offset)
            elif ext_type == L.QCOW2_EXT_MAGIC_CRYPTO_HEADER:
                if ext_len != L.CRYPTO_HEADER_EXTENSION.size:
                    raise InvalidImageError("Invalid encryption header extension length")
                self.crypto_ext = L.CRYPTO_HEADER_EXTENSION.unpack(data)
            elif ext_type == L.QCOW2_EXT_MAGIC_DATA_FILE:
                self.data_file = data.decode("utf-8", "replace")
            else:
                self.unknown_extensions.append((ext_type, data))
            offset += (ext_len + 7) & ~7

    def _check_features(self) -> None:
        unknown = self.incompatible_features & ~L.QCOW2_INCOMPAT_MASK
        if unknown:
            names = []
            for bit in range(64):
                if unknown & (1 << bit):
                    name = self.feature_names.get((L.QCOW2_FEATURE_TYPE_INCOMPATIBLE, bit))
                    names.append(name or f"Unknown incompatible feature: {1 << bit:x}")
            raise UnsupportedFeatureError("Unsupported qcow2 feature(s): " + ", ".join(names))

    def _validate_fields(self, file_size: int | None) -> None:
        cs = self.cluster_size
        if self.refcount_order > L.MAX_REFCOUNT_ORDER:
            raise InvalidImageError("Reference count entry width too large; may not exceed 64 bits")
        if self.version == 2 and self.refcount_order != 4:
            raise InvalidImageError("Invalid refcount order for version 2")
        if self.crypt_method > L.QCOW_CRYPT_LUKS:
            raise InvalidImageError(f"Unsupported encryption method {self.crypt_method}")
        if self.compression_type not in L.COMPRESSION_TYPE_NAMES:
            raise UnsupportedFeatureError(f"Unknown compression type '{self.compression_type}'")
        if self.compression_type != L.QCOW2_COMPRESSION_TYPE_ZLIB and not (
            self.incompatible_features & L.QCOW2_INCOMPAT_COMPRESSION
        ):
            raise InvalidImageError(
                "Compression type incompatible feature bit must be set if compression type is not zlib"
            )
        if self.extended_l2 and self.cluster_bits < 14:
            raise InvalidImageError(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
            )
        # Refcount table: QEMU's bound is 8 MiB of entries.
        if self.refcount_table_clusters * cs > L.QCOW_MAX_REFTABLE_SIZE:
            raise InvalidImageError("Reference count table too large")
        if self.refcount_table_clusters == 0:
            raise InvalidImageError("Image does not contain a reference count table")
        _check_table_offset(
            self.refcount_table_offset,
            self.refcount_table_clusters * cs,
            cs,
            "Reference count table",
            file_size,
        )
        if self.nb_snapshots > L.QCOW_MAX_SNAPSHOTS:
            raise InvalidImageError("Snapshot table too large")
        _check_table_offset(
            self.snapshots_offset,
            self.nb_snapshots * 40,
            cs,
            "Snapshot table",
            file_size if self.nb_snapshots else None,
        )
        if self.l1_size > L.QCOW_MAX_L1_SIZE // L.L1_ENTRY_SIZE:
            raise InvalidImageError("Active L1 table too large")
        entry_size = L.L2_ENTRY_SIZE_EXTENDED if self.extended_l2 else L.L2_ENTRY_SIZE_NORMAL
        l2_bits = self.cluster_bits - (entry_size.bit_length() - 1)
        shift = self.cluster_bits + l2_bits
        if self.size > (1 << 63) - 1:
            raise InvalidImageError("Image is too big")
        l1_needed = -(-self.size // (1 << shift)) if self.size else 0
        if self.l1_size < l1_needed:
            raise InvalidImageError("L1 table is too small")
        if self.l1_size:
            _check_table_offset(
                self.l1_table_offset,
                self.l1_size * L.L1_ENTRY_SIZE,
                cs,
                "Active L1 table",
                file_size,
            )
        if not self.has_data_file and self.data_file_raw:
            # QEMU ignores the autoclear bit without a data file.
            self.autoclear_features &= ~L.QCOW2_AUTOCLEAR_DATA_FILE_RAW

    # --- serialize ---------------------------------------------------------

    def pack(self, cluster_size: int | None = None) -> bytes:
        """Header, extensions and backing file name, as written at offset 0.

        Sets backing_file_offset/size to where the name lands. Unknown
        extensions are kept; unknown autoclear bits are cleared.
        """
        cs = cluster_size or self.cluster_size
        autoclear = self.autoclear_features & L.QCOW2_AUTOCLEAR_MASK
        if self.version == 3:
            if self.header_length < L.HEADER_V3_SIZE:
                self.header_length = L.HEADER_V3_SIZE
        ext = bytearray()
        if self.version == 3:
            ext += self._extensions()
        else:
            # Version 2 images keep only the backing format and unknown extensions.
            ext += self._extensions(v2=True)
        fixed_len = self.header_length if self.version == 3 else L.HEADER_V2_SIZE
        name = (self.backing_file or "").encode()
        self.backing_file_offset = fixed_len + len(ext) if name else 0
        self.backing_file_size = len(name)
        out = bytearray(
            L.HEADER_V2.pack(
                L.QCOW_MAGIC,
                self.version,
                self.backing_file_offset,
                self.backing_file_size,
                self.cluster_bits,
                self.size,
                self.crypt_method,
                self.l1_size,
                self.l1_table_offset,
                self.refcount_table_offset,
                self.refcount_table_clusters,
                self.nb_snapshots,
                self.snapshots_offset,
            )
        )
        if self.version == 3:
            out += L.HEADER_V3_EXTRA.pack(
                self.incompatible_features,
                self.compatible_features,
                autoclear,
                self.refcount_order,
                self.header_length,
            )
            tail = bytearray(self.header_length - L.HEADER_V3_MIN_SIZE)
            tail[0] = self.compression_type
            extra = self.extra_header
            if extra and self.header_length > L.HEADER_V3_SIZE:
                tail[L.HEADER_V3_SIZE - L.HEADER_V3_MIN_SIZE :] = extra[
                    : self.header_length - L.HEADER_V3_SIZE
                ].ljust(self.header_length - L.HEADER_V3_SIZE, b"\0")
            out += tail
        out += ext
        out += name
        if len(out) > cs:
            raise InvalidImageError("Header and extensions do not fit in the first cluster")
        return bytes(out)

    def _extensions(self, v2: bool = False) -> bytes:
        out = bytearray()

        def add(ext_type: int, data: bytes) -> None:
            out.extend(L.HEADER_EXTENSION.pack(ext_type, len(data)))
            out.extend(data)
            out.extend(bytes(-len(data) % 8))

        if self.backing_format:
            add(L.QCOW2_EXT_MAGIC_BACKING_FORMAT, self.backing_format.encode())
        if not v2:
            if self.data_file is not None:
                add(L.QCOW2_EXT_MAGIC_DATA_FILE, self.data_file.encode())
            if self.crypto_ext is not None:
                add(
                    L.QCOW2_EXT_MAGIC_CRYPTO_HEADER,
                    L.CRYPTO_HEADER_EXTENSION.pack(*self.crypto_ext),
                )
            # QEMU writes the feature name table only for clusters above
            # 4 KiB (seen with 7.2: none at 512..4096, present at 8192).
            if self.cluster_size > 4096:
                table = b"".join(
                    L.FEATURE_TABLE_ENTRY.pack(t, bit, name.encode())
                    for t, bit, name in L.FEATURE_NAMES
                )
                add(L.QCOW2_EXT_MAGIC_FEATURE_TABLE, table)
            if self.bitmaps_ext is not None:
                nb, size, offset = self.bitmaps_ext
                add(L.QCOW2_EXT_MAGIC_BITMAPS, L.BITMAPS_EXTENSION.pack(nb, 0, size, offset))
        for ext_type, data in self.unknown_extensions:
            add(ext_type, data)
        out.extend(L.HEADER_EXTENSION.pack(L.QCOW2_EXT_MAGIC_END, 0))
        return bytes(out)


def _check_table_offset(
    offset: int, length: int, cluster_size: int, what: str, file_size: int | None
) -> None:
    """QEMU's qcow2_validate_table: aligned, and not past the end of the file."""
    if offset % cluster_size or offset + length > (1 << 63) - 1:
        raise InvalidImageError(f"{what} offset invalid")
    if file_size is not None and length and offset + length > max(file_size, 0) + (1 << 40):
        # Tables far beyond the end of the file are hostile; QEMU catches
        # them when it reads. The later read reports the precise error.
        raise InvalidImageError(f"{what} offset invalid")


@dataclass(frozen=True)
class Geometry:
    """Sizes derived once from a validated header (QEMU's BDRVQcow2State fields)."""

    cluster_bits: int
    refcount_order: int
    extended_l2: bool

    @classmethod
    def from_header(cls, h: Header) -> Geometry:
        return cls(h.cluster_bits, h.refcount_order, h.extended_l2)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_size(self) -> int:
        return L.L2_ENTRY_SIZE_EXTENDED if self.extended_l2 else L.L2_ENTRY_SIZE_NORMAL

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_size(self) -> int:
        """Entries in one L2 table."""
        return 1 << self.l2_bits

    @property
    def subclusters_per_cluster(self) -> int:
        return L.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // self.subclusters_per_cluster

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refcount_block_bits(self) -> int:
        """log2 of the entries in one refcount block."""
        return self.cluster_bits + 3 - self.refcount_order

    @property
    def refcount_block_size(self) -> int:
        return 1 << self.refcount_block_bits

    @property
    def refcount_max(self) -> int:
        return (1 << self.refcount_bits) - 1

    @property
    def csize_shift(self) -> int:
        """Bit where a compressed descriptor's sector count starts."""
        return 62 - (self.cluster_bits - 8)

    @property
    def csize_mask(self) -> int:
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def cluster_offset_mask(self) -> int:
        return (1 << self.csize_shift) - 1

    def l1_entries_for(self, size: int) -> int:
        """QEMU's size_to_l1: L1 entries needed for a virtual size."""
        shift = self.cluster_bits + self.l2_bits
        return -(-size // (1 << shift))

    def offset_into_cluster(self, offset: int) -> int:
        return offset & (self.cluster_size - 1)

    def size_to_clusters(self, size: int) -> int:
        return -(-size // self.cluster_size)

    def offset_to_l1_index(self, offset: int) -> int:
        return offset >> (self.cluster_bits + self.l2_bits)

    def offset_to_l2_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.l2_size - 1)
