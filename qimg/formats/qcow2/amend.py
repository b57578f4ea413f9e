"""Changing the options of an existing qcow2 image: QEMU's qcow2_amend_options.

The steps run in QEMU's order: upgrade (compat=1.1), the backing file check,
lazy refcounts, the refcount width, the data file options, one header write,
the size, and downgrade (compat=0.10) last, so that what version 2 cannot
hold is gone before the version changes. Every step writes what it makes
before the header points at it; a crash leaks clusters at worst.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from qimg.create import QCOW2_OPTS, OptDesc, help_lines, typed_value
from qimg.errors import BadOptionError, QimgError
from qimg.formats.qcow2 import layout as L
from qimg.options import split_options

_AMENDABLE = (
    "backing_file",
    "backing_fmt",
    "compat",
    "data_file",
    "data_file_raw",
    "lazy_refcounts",
    "refcount_bits",
    "size",
)
# block/qcow2.c's encryption amend options (applied with the encryption issue).
_ENCRYPT_OPTS = (
    OptDesc("encrypt.iter-time", "num", None, "Time to spend in PBKDF in milliseconds"),
    OptDesc("encrypt.keyslot", "num", None, "Select a single keyslot to modify explicitly"),
    OptDesc(
        "encrypt.new-secret",
        "str",
        None,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    OptDesc("encrypt.old-secret", "str", None, "Select all keyslots that match this password"),
    OptDesc(
        "encrypt.state", "str", None, "Select new state of affected keyslots (active/inactive)"
    ),
)
AMEND_OPTS = tuple(o for o in QCOW2_OPTS if o.name in _AMENDABLE) + _ENCRYPT_OPTS
_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_EXTRA_V3_MIN = 16  # snapshot extra data v3 needs: vm_state_size_large, disk_size


def options_help(fmt: str) -> str:
    """`qemu-img amend -f FMT -o help`."""
    if fmt != "qcow2":
        raise QimgError(f"Format driver '{fmt}' does not support option amendment")
    return "\n".join([f"Amend options for '{fmt}':", *help_lines(AMEND_OPTS)])


def parse_options(text: str) -> dict:
    """The -o string (several joined by ',') as typed values, checked as
    qemu_opts_do_parse checks it against the amend options; a creation
    option gets qemu-img's hint when the whole string is one."""
    amendable = {o.name: o for o in AMEND_OPTS}
    creatable = {o.name: o for o in QCOW2_OPTS}
    values = {}
    for key, value in split_options(text):
        desc = amendable.get(key)
        if desc is None:
            message = f"Invalid parameter '{key}'"
            if all(k in amendable or k in creatable for k, _v in split_options(text)):
                message += "\nThis option is only supported for image creation"
            raise BadOptionError(message)
        values[key] = typed_value(desc, "on" if value is None else value)
    return values


def amend(
    image,
    values: dict,
    progress=None,
    *,
    secrets: Mapping[str, bytes] | None = None,
    force: bool = False,
) -> None:
    """Apply the typed amend options `values` to the writable qcow2 `image`.
    `progress(done, total)`, when given, hears of the long rewrites.
    `secrets` (by id) hold what encrypt.new-secret / old-secret name;
    `force` lifts the LUKS refusals (an active slot overwritten, the last
    active slots erased)."""
    h = image.header
    old_version = h.version
    new_version = old_version
    if "compat" in values:
        new_version = _COMPAT.get(values["compat"])
        if new_version is None:
            raise QimgError(f"Unknown compatibility level {values['compat']}")
    refcount_bits = values.get("refcount_bits", h.refcount_bits)
    if refcount_bits <= 0 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise QimgError("Refcount width must be a power of two and may not exceed 64 bits")
    if "data_file" in values and not h.has_data_file:
        raise QimgError("data-file can only be set for images that use an external data file")
    data_file_raw = values.get("data_file_raw", h.data_file_raw)
    if data_file_raw and not h.data_file_raw:
        raise QimgError("data-file-raw cannot be set on existing images")
    encryption_update = any(k.startswith("encrypt.") for k in values)
    if encryption_update and h.crypt_method == L.QCOW_CRYPT_NONE:
        raise QimgError("Can't amend encryption options - encryption not present")
    if encryption_update and h.crypt_method != L.QCOW_CRYPT_LUKS:
        raise QimgError("Only LUKS encryption options can be amended")
    if new_version > old_version:
        _upgrade(image)
    if encryption_update:
        from qimg.formats.qcow2.encryption import amend_encryption

        amend_encryption(image, values, secrets or {}, force)
    if "backing_file" in values or "backing_fmt" in values:
        if (values.get("backing_file"), values.get("backing_fmt")) != (
            h.backing_file,
            h.backing_format,
        ):
            raise QimgError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
    lazy = values.get("lazy_refcounts", h.lazy_refcounts)
    if lazy and not h.lazy_refcounts and new_version < 3:
        raise QimgError(
            "Lazy refcounts only supported with compatibility level 1.1 and above "
            "(use compat=1.1 or greater)"
        )
    if refcount_bits != h.refcount_bits:
        if new_version < 3 and refcount_bits != 16:
            raise QimgError(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above "
                "(use compat=1.1 or greater)"
            )
        change_refcount_width(image, refcount_bits.bit_length() - 1, progress)
    if lazy:
        h.compatible_features |= L.QCOW2_COMPAT_LAZY_REFCOUNTS
    else:
        h.compatible_features &= ~L.QCOW2_COMPAT_LAZY_REFCOUNTS
    if not data_file_raw:
        h.autoclear_features &= ~L.QCOW2_AUTOCLEAR_DATA_FILE_RAW
    if "data_file" in values:
        h.data_file = values["data_file"] or None
    image.flush()
    image.rewrite_header()
    if values.get("size"):
        from qimg.formats.qcow2.resize import resize

        resize(image, values["size"])
    if new_version < old_version:
        _downgrade(image, progress)


# --- compat ----------------------------------------------------------------------


def _upgrade(image) -> None:
    """QEMU's qcow2_upgrade: version 3 with the version 3 header fields."""
    from qimg.formats.qcow2.snapshot import read_snapshots, write_snapshot_table

    h = image.header
    if h.nb_snapshots:
        snapshots, _size = read_snapshots(image)
        if any(len(s.extra_data) < _EXTRA_V3_MIN for s in snapshots):
            # Version 3 requires the extra data (disk size, large VM state
            # size): the table is rewritten first, the header switched after.
            write_snapshot_table(image, snapshots)
    h.version = 3
    h.header_length = L.HEADER_V3_SIZE
    h.refcount_order = 4
    image.flush()
    image.rewrite_header()


def _downgrade(image, progress=None) -> None:
    """QEMU's qcow2_downgrade, with its refusals: zero clusters become
    unallocated (or, over a backing file, zeroed data clusters) first; the
    header is version 2 only once every table holds version 2 entries."""
    h = image.header
    if h.refcount_order != 4:
        raise QimgError("compat=0.10 requires refcount_bits=16")
    if h.has_data_file:
        raise QimgError("Cannot downgrade an image with a data file")
    if h.nb_snapshots:
        from qimg.formats.qcow2.snapshot import read_snapshots

        snapshots, _size = read_snapshots(image)
        if any(s.vm_state_size > 0xFFFFFFFF or s.disk_size != image.size for s in snapshots):
            raise QimgError("Internal snapshots prevent downgrade of image")
    incompatible = h.incompatible_features & ~(
        L.QCOW2_INCOMPAT_DIRTY | L.QCOW2_INCOMPAT_COMPRESSION
    )
    if incompatible:
        raise QimgError(
            f"Cannot downgrade an image with incompatible features {incompatible:#x} set"
        )
    if h.compression_type != L.QCOW2_COMPRESSION_TYPE_ZLIB and _has_compressed(image):
        raise QimgError(
            "Cannot downgrade an image with zstd compression type and existing compressed clusters"
        )
    _expand_zero_clusters(image, progress)
    _drop_bitmaps(image)
    h.version = 2
    h.compression_type = L.QCOW2_COMPRESSION_TYPE_ZLIB
    h.incompatible_features = 0
    h.compatible_features = 0
    h.autoclear_features = 0
    image.flush()
    image.rewrite_header()


def _l2_tables(image) -> list[int]:
    """Host offsets of every L2 table, active and of snapshots, once each."""
    from qimg.formats.qcow2.snapshot import read_snapshots

    tables = [image.clusters.l1]
    if image.header.nb_snapshots:
        for s in read_snapshots(image)[0]:
            raw = image.read_metadata(s.l1_table_offset, s.l1_size * L.L1_ENTRY_SIZE)
            tables.append(np.frombuffer(raw, dtype=">u8").astype(np.uint64))
    offsets = np.concatenate(tables) & np.uint64(L.L1E_OFFSET_MASK)
    return np.unique(offsets[offsets != 0]).tolist()


def _has_compressed(image) -> bool:
    image.flush()
    for offset in _l2_tables(image):
        table = image.clusters.l2_cache.get(offset)
        entries = table[:, 0] if image.geo.extended_l2 else table
        if (entries & np.uint64(L.QCOW_OFLAG_COMPRESSED)).any():
            return True
    return False


def _expand_zero_clusters(image, progress=None) -> None:
    """QEMU's qcow2_expand_zero_clusters over every L2 table, active and of
    snapshots (version 2 has no zero flag): a zero cluster becomes
    unallocated, or, over a backing file, a new cluster of zeros (counted
    once per L1 table sharing its L2 table); one whose host cluster only
    this L2 table references has that cluster zeroed and keeps it.

    Unlike QEMU 7.2, a host cluster that other L2 tables also reference (a
    cluster zeroed after a snapshot shared it) is not overwritten with
    zeros, which would change the snapshot's data: the reference is
    dropped and the entry made anew as above; and OFLAG_COPIED is set from
    the cluster's refcount, not from the L2 table's.

    Ordering: zeros are written and new clusters counted before the L2
    table pointing at them; references go only after the table that held
    them; all is flushed before the header changes version.
    """
    image.flush()
    tables = _l2_tables(image)
    counts = image.refcounts.all_counts()
    for done, l2 in enumerate(tables, 1):
        counts = _expand_in_table(image, l2, counts)
        if progress is not None:
            progress(done, len(tables))
    image.flush()


def _expand_in_table(image, l2: int, counts: np.ndarray) -> np.ndarray:
    """_expand_zero_clusters for the L2 table at `l2`; `counts` holds every
    refcount as this table finds them (returned, kept up to date)."""
    from qimg.formats.qcow2.create import write_zeros

    clusters, refcounts = image.clusters, image.refcounts
    cs = image.geo.cluster_size
    cb = np.uint64(image.geo.cluster_bits)
    table = clusters.l2_cache.get(l2)
    zero = np.flatnonzero(
        ((table & np.uint64(L.QCOW_OFLAG_ZERO)) != 0)
        & ((table & np.uint64(L.QCOW_OFLAG_COMPRESSED)) == 0)
    )
    if not len(zero):
        return counts
    k = refcounts.get(l2 >> image.geo.cluster_bits)  # L1 tables sharing this table
    hosts = table[zero] & np.uint64(L.L2E_OFFSET_MASK)
    index = (hosts >> cb).astype(np.int64)
    if len(counts) <= int(index.max()):
        counts = refcounts.all_counts()
    released = (hosts != 0) & (counts[np.minimum(index, len(counts) - 1)] > np.uint64(k))
    dropped = index[released]
    hosts[released] = 0
    plain = hosts == 0
    flags = np.where(counts[np.minimum(index, len(counts) - 1)] == 1, 1, 0).astype(np.uint64)
    if plain.any() and image.backing is not None:
        n = int(plain.sum())
        first = refcounts.alloc(n)
        new = np.uint64(first) + np.arange(n, dtype=np.uint64) * np.uint64(cs)
        if k > 1:
            refcounts.change_many((new >> cb).astype(np.int64), k - 1)
        hosts[plain] = new
        flags[plain] = 1 if k == 1 else 0
    allocated = hosts != 0
    for start, length in _runs(hosts[allocated].astype(np.int64), cs):
        image.check_overlap(start, length, "data")
        write_zeros(image.storage, start, length)
    table[zero] = np.where(allocated, hosts | (flags << np.uint64(63)), np.uint64(0))
    clusters.l2_cache.set_dependency(refcounts.blocks)
    clusters.l2_cache.mark_dirty(l2)
    if len(dropped):
        refcounts.blocks.set_dependency(clusters.l2_cache)
        refcounts.change_many(np.repeat(dropped, k), -1)
        np.subtract.at(counts, dropped, np.uint64(k))
    return counts


def _runs(hosts: np.ndarray, cs: int) -> list[tuple[int, int]]:
    """(offset, length) of runs of consecutive host clusters (sorted)."""
    if not len(hosts):
        return []
    hosts = np.sort(hosts)
    cuts = np.flatnonzero(np.diff(hosts) != cs) + 1
    starts = np.concatenate(([0], cuts))
    stops = np.concatenate((cuts, [len(hosts)]))
    return [(int(hosts[a]), (b - a) * cs) for a, b in zip(starts.tolist(), stops.tolist())]


def _drop_bitmaps(image) -> None:
    """Version 2 keeps no persistent bitmaps: their directory, tables and
    data are freed (QEMU 7.2 keeps the extension, which its version 2
    reader then calls inconsistent, and leaks those clusters)."""
    from qimg.formats.qcow2.bitmap import _table_clusters, load_bitmap_table, read_bitmap_directory

    h = image.header
    if h.bitmaps_ext is None:
        return
    frees = []
    for e in read_bitmap_directory(image):
        frees += _table_clusters(e, load_bitmap_table(image, e))
    _nb, size, offset = h.bitmaps_ext
    if size:
        frees.append((offset, size))
    h.bitmaps_ext = None
    image.flush()
    image.rewrite_header()
    for offset, length in frees:
        image.refcounts.free(offset, length)
    image._bitmaps = None


# --- refcount width ------------------------------------------------------------------


def change_refcount_width(image, refcount_order: int, progress=None) -> None:
    """QEMU's qcow2_change_refcount_order: a new refcount table and blocks
    of the new width, counting every cluster in use, are written in free
    space past the last used cluster; one header write switches to them;
    then the old table and blocks are released through the new ones."""
    from qimg.formats.qcow2.refcount import NewRefcountStructure

    image.flush()
    new = NewRefcountStructure(image.refcounts, refcount_order)
    new.write(image.write_metadata, progress)
    image.flush_file()
    old_starts, old_counts = new.old_structure()
    h = image.header
    h.refcount_order = refcount_order
    h.refcount_table_offset = new.table_offset
    h.refcount_table_clusters = new.table_clusters
    image.rewrite_header()
    image.geo = dataclasses.replace(image.geo, refcount_order=refcount_order)
    image.refcounts = None  # loaded again, at the new width, from the header
    image.overlap_map.invalidate_regions()
    image.refcounts.free_runs(old_starts, old_counts)
    image.flush()
