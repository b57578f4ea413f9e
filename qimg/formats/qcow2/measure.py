"""The size arithmetic of a new qcow2 image (QEMU's qcow2_measure).

The fully allocated size is the header cluster, every L2 and L1 entry the
virtual size needs, the refcount structure that counts all of them and
the data (qcow2_calc_prealloc_size); the required size leaves out the data
clusters the source does not hold. Bitmaps are counted as if wholly
allocated (qcow2_get_persistent_dirty_bitmap_size).
"""

from __future__ import annotations

from dataclasses import dataclass

from qimg.errors import BadOptionError, QimgError
from qimg.formats.qcow2 import layout as L

DEFAULT_CLUSTER_SIZE = 1 << 16
PREALLOC_MODES = ("off", "metadata", "falloc", "full")


@dataclass
class Qcow2Target:
    """The creation options qcow2_measure reads, checked in its order."""

    cluster_size: int
    version: int
    refcount_bits: int
    extended_l2: bool
    preallocation: str
    has_backing_file: bool
    luks: bool

    @classmethod
    def from_options(cls, values: dict) -> Qcow2Target:
        """`values` are the -o options, already typed (sizes and numbers as
        ints, booleans as bools)."""
        extended_l2 = bool(values.get("extended_l2", False))
        cluster_size = _cluster_size(values.get("cluster_size", DEFAULT_CLUSTER_SIZE), extended_l2)
        compat = values.get("compat")
        if compat is None or compat == "1.1":
            version = 3
        elif compat == "0.10":
            version = 2
        else:
            raise BadOptionError(f"Invalid compatibility level: '{compat}'")
        refcount_bits = values.get("refcount_bits", 16)
        if refcount_bits > 64 or refcount_bits & (refcount_bits - 1) or not refcount_bits:
            raise BadOptionError("Refcount width must be a power of two and may not exceed 64 bits")
        if version < 3 and refcount_bits != 16:
            raise BadOptionError(
                "Different refcount widths than 16 bits require compatibility level 1.1 "
                "or above (use compat=1.1 or greater)"
            )
        prealloc = values.get("preallocation", "off")
        if prealloc not in PREALLOC_MODES:
            raise BadOptionError(f"invalid parameter value: {prealloc}")
        return cls(
            cluster_size,
            version,
            refcount_bits,
            extended_l2,
            prealloc,
            values.get("backing_file") is not None,
            values.get("encrypt.format") == "luks",
        )

    def check_size(self, size: int) -> None:
        """The virtual size's L1 table must fit QEMU's limit."""
        l2e = L.L2_ENTRY_SIZE_EXTENDED if self.extended_l2 else L.L2_ENTRY_SIZE_NORMAL
        clusters = _round_up(size, self.cluster_size) // self.cluster_size
        l2_tables = -(-clusters // (self.cluster_size // l2e))
        if l2_tables * L.L1_ENTRY_SIZE > L.QCOW_MAX_L1_SIZE:
            raise QimgError("The image size is too large (try using a larger cluster size)")


def _cluster_size(value: int, extended_l2: bool) -> int:
    """qcow2_opt_get_cluster_size_del (QEMU takes the bit count of the low
    32 bits, so a size of 4 GiB or more is refused as not a power of two)."""
    low = value & 0xFFFFFFFF
    bits = (low & -low).bit_length() - 1 if low else 32
    if bits < L.MIN_CLUSTER_BITS or bits > L.MAX_CLUSTER_BITS or (1 << bits) != value:
        raise BadOptionError(
            f"Cluster size must be a power of two between {1 << L.MIN_CLUSTER_BITS} "
            f"and {1 << (L.MAX_CLUSTER_BITS - 10)}k"
        )
    least = (1 << L.MIN_CLUSTER_BITS) * L.QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER
    if extended_l2 and value < least:
        raise BadOptionError(
            f"Extended L2 entries are only supported with cluster sizes of at least {least} bytes"
        )
    return value


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """QEMU's qcow2_refcount_metadata_size (no generous increase): the
    bytes of refcount blocks and table that count `clusters` clusters and
    themselves, found as the fixed point of that count."""
    per_table_cluster = cluster_size // L.REFCOUNT_TABLE_ENTRY_SIZE
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    n = -1
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def prealloc_size(size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """QEMU's qcow2_calc_prealloc_size: a fully allocated image of `size`."""
    aligned = _round_up(size, cluster_size)
    l2e = L.L2_ENTRY_SIZE_EXTENDED if extended_l2 else L.L2_ENTRY_SIZE_NORMAL
    meta = cluster_size  # the header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // L.L1_ENTRY_SIZE)
    meta += nl1e * L.L1_ENTRY_SIZE
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def bitmaps_size(bitmaps: list[tuple[str, int]], size: int, cluster_size: int) -> int:
    """QEMU's qcow2_get_persistent_dirty_bitmap_size: each (name,
    granularity) bitmap of a disk of `size` bytes as wholly allocated
    clusters, its table, and the directory, in clusters of the target."""
    total = 0
    directory = 0
    for name, granularity in bitmaps:
        granules = -(-size // granularity)
        nbytes = -(-granules // 8)
        clusters = -(-nbytes // cluster_size)
        total += clusters * cluster_size
        total += _round_up(clusters * L.BME_TABLE_ENTRY_SIZE, cluster_size)
        directory += _round_up(L.BITMAP_DIRECTORY_ENTRY.size + len(name.encode()), 8)
    return total + _round_up(directory, cluster_size)
