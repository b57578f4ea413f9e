"""Creating qcow2 images: option validation and the initial layout.

The layout is QEMU's (qcow2_co_create): the header in cluster 0, a one-cluster
refcount table in cluster 1, the first refcount block in cluster 2, then the
L1 table; preallocation then allocates L2 tables and data clusters through
the ordinary allocator.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass

from qimg.errors import BadOptionError, ImageIOError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.encryption import EncryptionOptions, set_up_encryption
from qimg.formats.qcow2.header import Geometry, Header
from qimg.storage import create_storage, delete_storage

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
V3_HINT = "compatibility level 1.1 and above (use version=v3 or greater)"


@dataclass
class Qcow2CreateOptions:
    size: int = 0
    compat: str = "1.1"
    cluster_size: int = L.DEFAULT_CLUSTER_SIZE
    refcount_bits: int = 16
    lazy_refcounts: bool = False
    preallocation: str = "off"
    compression_type: str = "zlib"
    extended_l2: bool = False
    data_file: str | None = None
    data_file_raw: bool = False
    backing_file: str | None = None
    backing_fmt: str | None = None
    encrypt: EncryptionOptions | None = None  # None: not encrypted

    @classmethod
    def from_values(cls, values: dict) -> Qcow2CreateOptions:
        """Options from typed -o values (qimg.create parsed them), checking
        the enumerations as QEMU's QAPI visitor does, in its field order."""
        # qcow2_co_create_opts renames `encryption` before visiting.
        encrypt = EncryptionOptions.from_values(values)
        o = cls()
        for key in (
            "data_file",
            "data_file_raw",
            "extended_l2",
            "size",
            "compat",
            "backing_file",
            "backing_fmt",
            "cluster_size",
            "preallocation",
            "lazy_refcounts",
            "refcount_bits",
            "compression_type",
        ):
            if key in values:
                setattr(o, key, values[key])
        if o.compat in ("0.10", "v2"):
            o.compat = "0.10"
        elif o.compat in ("1.1", "v3"):
            o.compat = "1.1"
        else:
            raise BadOptionError(f"Parameter 'version' does not accept value '{o.compat}'")
        o.encrypt = encrypt
        if o.preallocation not in PREALLOC_MODES:
            raise BadOptionError(
                f"Parameter 'preallocation' does not accept value '{o.preallocation}'"
            )
        if o.compression_type not in L.COMPRESSION_TYPE_NAMES.values():
            raise BadOptionError(
                f"Parameter 'compression-type' does not accept value '{o.compression_type}'"
            )
        return o

    def validate(self) -> None:
        """qcow2_co_create's checks, in its order and words."""
        v2 = self.compat == "0.10"
        if self.extended_l2 and v2:
            raise BadOptionError(f"Extended L2 entries are only supported with {V3_HINT}")
        cs = self.cluster_size
        if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
            raise BadOptionError("Cluster size must be a power of two between 512 and 2048k")
        if self.extended_l2 and cs < 16384:
            raise BadOptionError(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
            )
        if self.backing_file and self.preallocation != "off" and not self.extended_l2:
            raise BadOptionError(
                "Backing file and preallocation can only be used at the same time if "
                "extended_l2 is on"
            )
        if self.backing_fmt and not self.backing_file:
            raise BadOptionError("Backing format cannot be used without backing file")
        if v2 and self.lazy_refcounts:
            raise BadOptionError(f"Lazy refcounts only supported with {V3_HINT}")
        rb = self.refcount_bits
        if rb < 1 or rb > 64 or rb & (rb - 1):
            raise BadOptionError("Refcount width must be a power of two and may not exceed 64 bits")
        if v2 and rb != 16:
            raise BadOptionError(
                "Different refcount widths than 16 bits require compatibility level 1.1 "
                "or above (use version=v3 or greater)"
            )
        if self.data_file_raw and not self.data_file:
            raise BadOptionError("data-file-raw requires data-file")
        if self.data_file_raw and self.backing_file:
            raise BadOptionError("Backing file and data-file-raw cannot be used at the same time")
        if v2 and self.data_file:
            raise BadOptionError(f"External data files are only supported with {V3_HINT}")
        if v2 and self.compression_type != "zlib":
            raise BadOptionError(f"Non-zlib compression type is only supported with {V3_HINT}")
        entry = L.L2_ENTRY_SIZE_EXTENDED if self.extended_l2 else L.L2_ENTRY_SIZE_NORMAL
        l1_entries = -(-self.size // (cs * (cs // entry)))
        if l1_entries * L.L1_ENTRY_SIZE > L.QCOW_MAX_L1_SIZE:
            raise BadOptionError(
                "The image size is too large for file format 'qcow2' "
                "(try using a larger cluster size)"
            )


def create_qcow2(
    path: str, o: Qcow2CreateOptions, secrets: Mapping[str, bytes] | None = None
) -> None:
    """Write a new, empty qcow2 image at `path` (size already resolved);
    `secrets` (by id) hold the key of an encrypted one."""
    from qimg.formats.qcow2.image import Qcow2Image

    o.validate()
    if o.encrypt is not None:
        # The key first: a missing secret or a bad LUKS option fails
        # before any file exists (QEMU removes what it made).
        secret = o.encrypt.secret(secrets or {})
        params = o.encrypt.luks_params() if o.encrypt.format == "luks" else None
    size = -(-o.size // 512) * 512
    cluster_bits = o.cluster_size.bit_length() - 1
    h = Header(
        version=2 if o.compat == "0.10" else 3,
        cluster_bits=cluster_bits,
        size=size,
        refcount_order=o.refcount_bits.bit_length() - 1,
        header_length=L.HEADER_V2_SIZE if o.compat == "0.10" else L.HEADER_V3_SIZE,
        refcount_table_offset=o.cluster_size,
        refcount_table_clusters=1,
        l1_table_offset=3 * o.cluster_size,
        backing_file=o.backing_file,
        backing_format=o.backing_fmt,
        data_file=o.data_file,
    )
    if o.lazy_refcounts:
        h.compatible_features |= L.QCOW2_COMPAT_LAZY_REFCOUNTS
    if o.extended_l2:
        h.incompatible_features |= L.QCOW2_INCOMPAT_EXTL2
    if o.data_file:
        h.incompatible_features |= L.QCOW2_INCOMPAT_DATA_FILE
        if o.data_file_raw:
            h.autoclear_features |= L.QCOW2_AUTOCLEAR_DATA_FILE_RAW
    if o.compression_type == "zstd":
        h.compression_type = L.QCOW2_COMPRESSION_TYPE_ZSTD
        h.incompatible_features |= L.QCOW2_INCOMPAT_COMPRESSION
    geo = Geometry.from_header(h)
    cs = o.cluster_size

    # A failed create removes what it made, as QEMU's bdrv_co_delete_file.
    data_storage = None
    storage = create_storage(path)
    try:
        if o.data_file:
            # QEMU creates the data file by the name as given (relative to
            # the working directory) and opens it the same way.
            data_storage = create_storage(o.data_file)
        # numpy loads only now: opening the file above may first free an
        # existing target's pages (convert loads numpy meanwhile).
        import numpy as np

        # Ordering: refcount structures, then the header that points at them.
        block = np.zeros(geo.refcount_block_size, dtype=np.uint64)
        block[:3] = 1
        from qimg.formats.qcow2.refcount import encode_refcount_block

        table = np.zeros(cs // 8, dtype=np.uint64)
        table[0] = 2 * cs
        storage.pwrite(cs, table.astype(">u8").tobytes())
        storage.pwrite(2 * cs, encode_refcount_block(block, geo.refcount_order))
        h.l1_size = 0
        h.l1_table_offset = 0
        storage.pwrite(0, h.pack().ljust(cs, b"\0"))
        image = Qcow2Image(storage, header=h, data_storage=data_storage)
        _allocate_l1(image, geo.l1_entries_for(size))
        prealloc = o.preallocation
        if o.data_file_raw and prealloc == "off":
            prealloc = "metadata"  # the raw data file needs a full mapping
        if prealloc != "off":
            preallocate(image, prealloc)
        if o.encrypt is not None:
            # After the preallocation, as QEMU's qcow2_co_create: the LUKS
            # header follows the preallocated clusters (which hold no
            # ciphertext and read as what zeros decrypt to, as in QEMU).
            set_up_encryption(image, o.encrypt, secret, params)
        image.flush()
        if data_storage is not None and data_storage.size() < size:
            data_storage.truncate(size)
    except BaseException:
        storage.close()
        delete_storage(path)
        if data_storage is not None:
            data_storage.close()
            delete_storage(o.data_file)
        raise
    image.close()


def _allocate_l1(image, l1_size: int) -> None:
    """Allocate and write a zeroed L1 table, then point the header at it."""
    import numpy as np

    h = image.header
    cs = image.geo.cluster_size
    if l1_size * 8 > L.QCOW_MAX_L1_SIZE:
        raise BadOptionError("The image size is too large (try using a larger cluster size)")
    if l1_size:
        nbytes = l1_size * 8
        offset = image.refcounts.alloc(-(-nbytes // cs))
        image.refcounts.blocks.flush()
        image.storage.pwrite(offset, bytes(nbytes))
        if image.storage.size() < offset + nbytes:
            image.storage.truncate(offset + nbytes)
    else:
        offset = 0
    h.l1_size = l1_size
    h.l1_table_offset = offset
    image.storage.pwrite(
        L.HEADER_OFF_L1_SIZE, l1_size.to_bytes(4, "big") + offset.to_bytes(8, "big")
    )
    image.clusters.l1_offset = offset
    image.clusters.l1_size = l1_size
    image.clusters.l1 = np.zeros(l1_size, dtype=np.uint64)


def preallocate(image, mode: str, first_cluster: int = 0) -> None:
    """Map every cluster from `first_cluster` to the end of the image
    (QEMU's preallocate_co; all of them unallocated): per L2 table, the
    table and then its data clusters, so they alternate in the file."""
    import numpy as np

    geo = image.geo
    cs = geo.cluster_size
    end_cluster = geo.size_to_clusters(image.size)
    if end_cluster <= first_cluster:
        return
    per_l2 = geo.l2_size
    has_data_file = image.header.has_data_file
    if mode in ("falloc", "full"):
        _check_free_space(
            image.data_storage, (end_cluster - first_cluster) * cs, mode, has_data_file
        )
    first = first_cluster
    while first < end_cluster:
        l1_index, i0 = first // per_l2, first % per_l2
        n = min(per_l2 - i0, end_cluster - first)
        l2_offset, table = image.clusters.l2_for_write(l1_index)
        if has_data_file:
            host = first * cs
        else:
            host = image.refcounts.alloc(n)
        entries = np.uint64(host | L.QCOW_OFLAG_COPIED) + np.arange(n, dtype=np.uint64) * np.uint64(
            cs
        )
        if geo.extended_l2:
            table[i0 : i0 + n, 0] = entries
        else:
            table[i0 : i0 + n] = entries
        image.clusters.l2_cache.set_dependency(image.refcounts.blocks)
        image.clusters.l2_cache.mark_dirty(l2_offset)
        target = image.data_storage
        end = host + n * cs
        try:
            if mode == "falloc":
                target.fallocate(host, n * cs)
            elif mode == "full":
                write_zeros(target, host, n * cs)
        except ImageIOError as exc:
            raise _prealloc_error(exc, mode, has_data_file) from None
        if target.size() < end:
            target.truncate(end)
        first += n


def _check_free_space(storage, nbytes: int, mode: str, has_data_file: bool) -> None:
    """Fail at once when the file system cannot hold the data, as QEMU's one
    fallocate of the whole range does, instead of filling it table by table
    (which would starve every other writer on it until the failure)."""
    free = storage.available_space()
    if free is not None and free < nbytes:
        exc = ImageIOError("No space left on device")
        exc.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise _prealloc_error(exc, mode, has_data_file)


def _prealloc_error(exc: ImageIOError, mode: str, has_data_file: bool) -> ImageIOError:
    """qcow2_co_truncate's words for a host file that cannot take the data
    (file-posix's, wrapped once more when the data lives in the image file)."""
    os_error = exc.__context__
    if not isinstance(os_error, OSError) or not os_error.strerror:
        return exc
    what = (
        "Could not preallocate new data"
        if mode == "falloc"
        else ("Could not write zeros for preallocation")
    )
    inner = f"{what}: {os_error.strerror}"
    if not has_data_file:
        inner = f"Failed to resize underlying file: {inner}"
    return ImageIOError(f"Could not resize image: {inner}")


def write_zeros(storage, offset: int, length: int) -> None:
    chunk = bytes(min(length, 8 << 20))
    while length:
        n = min(length, len(chunk))
        storage.pwrite(offset, chunk[:n])
        offset += n
        length -= n
