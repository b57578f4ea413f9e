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
            unknown_extensions=list(self.unknown_extensions),
        )

    # --- parse -------------------------------------------------------------

    @classmethod
    def parse(cls, buf: bytes, file_size: int | None = None, *, check: bool = False) -> Header:
        """Parse and validate the header found at the start of `buf`.

        `buf` holds at least the first cluster of the file, or the whole file
        where it is shorter (QEMU reads past the end of the file as zeros).
        The checks run in the order of QEMU's qcow2_do_open, so an image with
        several faults is refused for the one qemu-img names. `check` is
        QEMU's BDRV_O_CHECK (qemu-img check): the refcount table may be empty
        and the snapshot table is not validated. Raises InvalidImageError or
        UnsupportedFeatureError with QEMU's wording. `file_size` is not
        used: QEMU does not bound the tables by the file's size at open.
        """
        if len(buf) < L.HEADER_V3_MIN_SIZE:
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
            buf = bytes(buf).ljust(cluster_size, b"\0")
        if version == 2:
            # Version 2 has no such fields; QEMU ignores bytes 72-103.
            h.refcount_order = 4
            h.header_length = L.HEADER_V2_SIZE
        else:
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
            if h.header_length > L.HEADER_COMPRESSION_TYPE_OFFSET:
                h.compression_type = buf[L.HEADER_COMPRESSION_TYPE_OFFSET]
            known_end = min(h.header_length, L.HEADER_V3_SIZE)
            h.extra_header = bytes(buf[known_end : h.header_length])
        if h.backing_file_offset > cluster_size:
            raise InvalidImageError("Invalid backing file offset")
        # Extensions run from header_length to the backing file name, or to
        # the end of the first cluster.
        ext_end = h.backing_file_offset or cluster_size
        h._validate_compression_type()
        h._check_features(buf, ext_end)
        h._validate_fields(check)
        h._parse_extensions(buf, h.header_length, ext_end)
        h._read_backing_file_name(buf)
        if h.size // L.BDRV_SECTOR_SIZE * L.BDRV_SECTOR_SIZE > L.BDRV_MAX_LENGTH:
            # bdrv_open_driver, once the driver has opened the image.
            raise InvalidImageError("Could not refresh total sector count: File too large")
        return h

    def _validate_compression_type(self) -> None:
        """QEMU's validate_compression_type."""
        if self.compression_type not in L.COMPRESSION_TYPE_NAMES:
            raise UnsupportedFeatureError(
                f"qcow2: unknown compression type: {self.compression_type}"
            )
        bit = bool(self.incompatible_features & L.QCOW2_INCOMPAT_COMPRESSION)
        if self.compression_type == L.QCOW2_COMPRESSION_TYPE_ZLIB and bit:
            raise InvalidImageError(
                "qcow2: Compression type incompatible feature bit must not be set"
            )
        if self.compression_type != L.QCOW2_COMPRESSION_TYPE_ZLIB and not bit:
            raise InvalidImageError("qcow2: Compression type incompatible feature bit must be set")

    def _parse_extensions(self, buf: bytes, start: int, end: int) -> None:
        """QEMU's qcow2_read_extensions: every extension from `start` up to an
        end marker or `end`; a header that claims more room than is left
        (the end marker too) is refused before its type is looked at."""
        offset = start
        while offset < end:
            ext_type, ext_len = L.HEADER_EXTENSION.unpack_from(buf, offset)
            offset += L.HEADER_EXTENSION.size
            if offset > end or ext_len > end - offset:
                raise InvalidImageError("Header extension too large")
            if ext_type == L.QCOW2_EXT_MAGIC_END:
                return
            self._parse_extension(ext_type, bytes(buf[offset : offset + ext_len]))
            offset += (ext_len + 7) & ~7

    def _parse_extension(self, ext_type: int, data: bytes) -> None:
        ext_len = len(data)
        if ext_type == L.QCOW2_EXT_MAGIC_BACKING_FORMAT:
            if ext_len >= L.BACKING_FORMAT_MAX:
                raise InvalidImageError(
                    f"ERROR: ext_backing_format: len={ext_len} too large (>={L.BACKING_FORMAT_MAX})"
                )
            # A C string: it ends at the first NUL; empty means "probe".
            self.backing_format = _c_string(data) or None
        elif ext_type == L.QCOW2_EXT_MAGIC_FEATURE_TABLE:
            # Read only to name unknown incompatible bits (_check_features).
            pass
        elif ext_type == L.QCOW2_EXT_MAGIC_BITMAPS:
            if ext_len != L.BITMAPS_EXTENSION.size:
                raise InvalidImageError("bitmaps_ext: Invalid extension length")
            nb, reserved, dir_size, dir_offset = L.BITMAPS_EXTENSION.unpack(data)
            from qimg.formats.qcow2.bitmap import check_extension

            check_extension(self, nb, reserved, dir_size, dir_offset)
            self.bitmaps_ext = (nb, dir_size, dir_offset)
        elif ext_type == L.QCOW2_EXT_MAGIC_CRYPTO_HEADER:
            if self.crypt_method != L.QCOW_CRYPT_LUKS:
                raise InvalidImageError(
                    "CRYPTO header extension only expected with LUKS encryption method"
                )
            if ext_len != L.CRYPTO_HEADER_EXTENSION.size:
                raise InvalidImageError(
                    f"CRYPTO header extension size {ext_len}, but expected size "
                    f"{L.CRYPTO_HEADER_EXTENSION.size}"
                )
            self.crypto_ext = L.CRYPTO_HEADER_EXTENSION.unpack(data)
            if self.crypto_ext[0] % self.cluster_size:
                raise InvalidImageError(
                    f"Encryption header offset '{self.crypto_ext[0]}' is not a multiple of "
                    f"cluster size '{self.cluster_size}'"
                )
        elif ext_type == L.QCOW2_EXT_MAGIC_DATA_FILE:
            self.data_file = _c_string(data)
        else:
            self.unknown_extensions.append((ext_type, data))

    def _check_features(self, buf: bytes, ext_end: int) -> None:
        """QEMU's report_unsupported_feature: unknown incompatible bits are
        named from the image's feature name table, the rest listed as one
        mask. The extensions are read leniently for it: the table as far as
        they can be read is used, and a broken extension is not reported."""
        unknown = self.incompatible_features & ~L.QCOW2_INCOMPAT_MASK
        if not unknown:
            return
        table = _read_feature_table(self, buf, ext_end)
        names = []
        for i in range(0, len(table), L.FEATURE_TABLE_ENTRY.size):
            ftype, bit, name = L.FEATURE_TABLE_ENTRY.unpack_from(table, i)
            if not name[0]:
                break  # the table ends at an entry with an empty name
            # QEMU shifts by the stored bit number; x86 takes it modulo 64.
            mask = 1 << (bit & 63)
            if ftype == L.QCOW2_FEATURE_TYPE_INCOMPATIBLE and unknown & mask:
                names.append(_c_string(name))
                unknown &= ~mask
        if unknown:
            names.append(f"Unknown incompatible feature: {unknown:x}")
        raise UnsupportedFeatureError("Unsupported qcow2 feature(s): " + ", ".join(names))

    def _validate_fields(self, check: bool) -> None:
        """The field checks of QEMU's qcow2_do_open, in its order."""
        cs = self.cluster_size
        if self.extended_l2 and cs // L.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER < L.BDRV_SECTOR_SIZE:
            subcluster = cs // L.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
            raise InvalidImageError(f"Unsupported subcluster size: {subcluster}")
        if self.refcount_order > L.MAX_REFCOUNT_ORDER:
            raise InvalidImageError("Reference count entry width too large; may not exceed 64 bits")
        if self.refcount_table_clusters == 0 and not check:
            raise InvalidImageError("Image does not contain a reference count table")
        _validate_table(
            self.refcount_table_offset,
            self.refcount_table_clusters,
            cs,
            L.QCOW_MAX_REFTABLE_SIZE,
            cs,
            "Reference count table",
        )
        if not check:
            _validate_table(
                self.snapshots_offset,
                self.nb_snapshots,
                L.SNAPSHOT_HEADER.size,
                L.SNAPSHOT_HEADER.size * L.QCOW_MAX_SNAPSHOTS,
                cs,
                "Snapshot table",
            )
        _validate_table(
            self.l1_table_offset,
            self.l1_size,
            L.L1_ENTRY_SIZE,
            L.QCOW_MAX_L1_SIZE,
            cs,
            "Active L1 table",
        )
        entry_size = L.L2_ENTRY_SIZE_EXTENDED if self.extended_l2 else L.L2_ENTRY_SIZE_NORMAL
        shift = 2 * self.cluster_bits - (entry_size.bit_length() - 1)
        # QEMU's size_to_l1, in uint64_t: a size near 2^64 wraps to few entries.
        l1_needed = ((self.size + (1 << shift) - 1) & L.UINT64_MAX) >> shift
        if l1_needed > L.INT_MAX:
            raise InvalidImageError("Image is too big")
        if self.l1_size < l1_needed:
            raise InvalidImageError("L1 table is too small")
        if self.l1_size and self.l1_table_offset + self.l1_size * 8 > L.BDRV_MAX_LENGTH:
            raise InvalidImageError("Could not read L1 table: Input/output error")
        if self.crypt_method > L.QCOW_CRYPT_LUKS:
            raise InvalidImageError(f"Unsupported encryption method {self.crypt_method}")
        reftable_end = self.refcount_table_offset + self.refcount_table_clusters * cs
        if self.refcount_table_clusters and reftable_end > L.BDRV_MAX_LENGTH:
            raise InvalidImageError("Could not initialize refcount handling: Input/output error")

    def _read_backing_file_name(self, buf: bytes) -> None:
        if not self.backing_file_offset:
            return
        if self.backing_file_size > min(
            L.QCOW_MAX_BACKING_FILE_NAME, self.cluster_size - self.backing_file_offset
        ):
            raise InvalidImageError("Backing file name too long")
        end = self.backing_file_offset + self.backing_file_size
        # A C string: it ends at the first NUL, and an empty name is no backing file.
        self.backing_file = _c_string(buf[self.backing_file_offset : end]) or None

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
            # Version 2 images keep only the backing format, the LUKS header
            # pointer and unknown extensions.
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
        if not v2 and self.data_file is not None:
            add(L.QCOW2_EXT_MAGIC_DATA_FILE, self.data_file.encode())
        # The LUKS header pointer, in version 2 images too (qcow2_update_header).
        if self.crypto_ext is not None:
            add(L.QCOW2_EXT_MAGIC_CRYPTO_HEADER, L.CRYPTO_HEADER_EXTENSION.pack(*self.crypto_ext))
        if not v2:
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


def _c_string(data: bytes) -> str:
    """Bytes read as QEMU reads a name: up to the first NUL, as UTF-8."""
    return bytes(data).split(b"\0", 1)[0].decode("utf-8", "replace")


def _validate_table(
    offset: int, entries: int, entry_len: int, max_bytes: int, cluster_size: int, what: str
) -> None:
    """QEMU's qcow2_validate_table: not too many entries, cluster aligned,
    and the table's end within INT64_MAX. Where it lies against the end of
    the file is for the reads to find (QEMU reads past it as zeros)."""
    if entries > max_bytes // entry_len:
        raise InvalidImageError(f"{what} too large")
    if L.INT64_MAX - entries * entry_len < offset or offset % cluster_size:
        raise InvalidImageError(f"{what} offset invalid")


def _read_feature_table(h: Header, buf: bytes, ext_end: int) -> bytes:
    """The feature name table as QEMU's lenient extension pass leaves it: the
    last table read before the extensions end or break, padded with a zeroed
    entry that ends it."""
    table = b""
    offset = h.header_length
    probe = h.copy()
    try:
        while offset < ext_end:
            ext_type, ext_len = L.HEADER_EXTENSION.unpack_from(buf, offset)
            offset += L.HEADER_EXTENSION.size
            if offset > ext_end or ext_len > ext_end - offset or ext_type == L.QCOW2_EXT_MAGIC_END:
                break
            data = bytes(buf[offset : offset + ext_len])
            if ext_type == L.QCOW2_EXT_MAGIC_FEATURE_TABLE:
                table = data
            else:
                probe._parse_extension(ext_type, data)
            offset += (ext_len + 7) & ~7
    except InvalidImageError:
        pass
    entry = L.FEATURE_TABLE_ENTRY.size
    return table + bytes(-len(table) % entry + entry)


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
