"""Consistency check and repair: QEMU's qcow2_check_refcounts, whole tables at once.

Compare-then-fix (block/qcow2-refcount.c). Refcounts are rebuilt in memory
from every reference the image makes (header, active and snapshot L1 tables,
each L2 table once per L1 entry naming it, data and compressed clusters,
refcount table and blocks, snapshot table, bitmap directory, bitmap tables
and their clusters), then compared with the refcounts on disk. A count on
disk above the computed one is a leak, below it a corruption; a cluster in
use with a count of 0 on disk, or a broken refcount block, makes the whole
refcount structure be rebuilt when errors are to be fixed.

Counting works on arrays of cluster indices, never a Python loop per
cluster; a Python loop runs only over what is wrong. Memory: one array of
computed counts and one of the stored refcounts, each of the image's
refcount width (uint8 for widths below 8), over the clusters of the file;
L2 tables are read in bounded batches (L2_BATCH_BYTES) into one reused
buffer, adjacent tables in one read. A batch whose entries are all plain
(no compressed, reserved or unaligned entry, none past the end of file)
takes a short path: allocated entries as runs of adjacent clusters
(preallocated images) are counted with slice additions, others with one
fancy-indexed addition (sorted and grouped first when a cluster repeats).

Where QEMU 7.2's repair leaves an image broken (an L2 entry that is unaligned
or points past the end of the file, an L1 entry pointing at refcount
metadata or past the end, a bitmap table entry past the end) qimg makes the
entry unallocated (zero in v3 images) and reports the lost cluster, so that
the repaired image checks clean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qimg.errors import ImageIOError, QimgError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.refcount import decode_refcount_block, encode_refcount_block
from qimg.formats.qcow2.snapshot import Snapshot, parse_entry
from qimg.storage import MAX_REQUEST_END, check_request, sector_length

# BdrvCheckMode
FIX_LEAKS = 1
FIX_ERRORS = 2
FIX_ALL = FIX_LEAKS | FIX_ERRORS

REFT_RESERVED_MASK = 0x1FF
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE

_U64 = np.uint64
# Refcounts in memory, by refcount_order: the smallest dtype that holds
# refcount_max (computed counts above the dtype's max are kept exactly,
# aside; see _Checker.big).
_COUNT_DTYPES = {0: np.uint8, 1: np.uint8, 2: np.uint8, 3: np.uint8}
_COUNT_DTYPES.update({4: np.uint16, 5: np.uint32, 6: np.uint64})

OVERFLOW_HINT = (
    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to "
    "create a clean copy if the image cannot be opened for writing"
)

# How many L2 tables one numpy batch holds (bounded memory).
L2_BATCH_BYTES = 4 << 20
# Entry bits that send an L2 batch to the general walk: compressed, reserved.
_PLAIN_BAD_BITS = L.QCOW_OFLAG_COMPRESSED | L.L2E_STD_RESERVED_MASK
# How many clusters one comparison of refcounts takes at once.
COMPARE_CHUNK = 1 << 22


class CheckFailed(QimgError):
    """Raised when: the check could not complete (qemu-img's "Check failed").

    `result` holds what was found up to that point; its messages are still
    shown to the user.
    """

    def __init__(self, message: str, result: CheckResult | None = None):
        super().__init__(message)
        self.result = result


@dataclass
class CheckResult:
    """BdrvCheckResult plus qemu-img's ImageCheck fields."""

    filename: str = ""
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    # Lines qemu-img prints on stderr while checking, in order.
    messages: list[str] = field(default_factory=list)
    # Set when a repair ran: the counts of that first pass (the rest of the
    # result is the state found by the check that followed).
    repaired: bool = False

    def to_json(self) -> dict:
        """qemu-img check --output=json: keys in its order, optional ones only when non-zero."""
        optional = {
            "image-end-offset": self.image_end_offset,
            "compressed-clusters": self.compressed_clusters,
            "total-clusters": self.total_clusters,
            "corruptions": self.corruptions,
            "corruptions-fixed": self.corruptions_fixed,
            "check-errors": None,
            "leaks": self.leaks,
            "leaks-fixed": self.leaks_fixed,
            "allocated-clusters": self.allocated_clusters,
            "filename": None,
            "format": None,
            "fragmented-clusters": self.fragmented_clusters,
        }
        out: dict = {}
        for key, value in optional.items():
            if key == "check-errors":
                out[key] = self.check_errors
            elif key == "filename":
                out[key] = self.filename
            elif key == "format":
                out[key] = self.format
            elif value:
                out[key] = value
        return out

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status for this result."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


# --- the public entry points ----------------------------------------------------


def check_image(image, fix: int = 0) -> CheckResult:
    """qemu-img check [-r leaks|all] on an open image; raises CheckFailed.

    As img_check does: when anything was repaired, the image is checked
    again and that second result is returned, with the fixed counts of the
    first pass.
    """
    if getattr(image, "format_name", None) != "qcow2":
        from qimg.errors import NoCheckError

        raise NoCheckError("This image format does not support checks")
    result = _check_once(image, fix)
    if result.corruptions_fixed or result.leaks_fixed:
        again = _check_once(image, 0)
        again.messages[:0] = result.messages
        again.corruptions_fixed = result.corruptions_fixed
        again.leaks_fixed = result.leaks_fixed
        again.repaired = True
        result = again
    result.filename = image.filename
    return result


def open_for_check(path: str, fmt: str | None, fix: int, force_share: bool = False):
    """Open an image as qemu-img check does (BDRV_O_CHECK): read-write only
    to repair; a dirty image is not repaired on open, an image marked
    corrupt may be opened read-write to be repaired; the data file and the
    backing chain are opened (not read)."""
    import os

    from qimg.errors import ImageIOError, NoCheckError
    from qimg.filenames import parse_filename
    from qimg.formats.qcow2.header import Header
    from qimg.formats.qcow2.image import Qcow2Image
    from qimg.opening import open_backing_chain, open_data_file, open_image, probe_format
    from qimg.storage import open_storage

    given = path  # as typed: a file:/json: name opens its file (qimg.filenames)
    try:
        name = parse_filename(given)
    except QimgError as exc:
        exc.args = (f"Could not open '{given}': {exc}",)
        raise
    path, fmt = name.path, fmt or name.fmt
    if not os.path.exists(path):
        # qemu-img names the file twice here: bdrv_open's prefix and file-posix's.
        raise ImageIOError(
            f"Could not open '{given}': Could not open '{path}': No such file or directory"
        )
    fmt = fmt or probe_format(path)
    if fmt != "qcow2":
        try:
            image = open_image(path, fmt, writable=bool(fix), force_share=force_share)
        except QimgError as exc:
            exc.args = (f"Could not open '{given}': {exc}",)  # bdrv_open's prefix
            raise
        with image:
            raise NoCheckError("This image format does not support checks")
    storage = open_storage(path, bool(fix), force_share=force_share)
    try:
        size = storage.size()
        # qcow2_do_open discards the snapshot table pointer in check mode:
        # the check reads (and repairs) the table itself.
        head = bytearray(storage.pread(0, min(size, 1 << L.MAX_CLUSTER_BITS)))
        head[L.HEADER_OFF_NB_SNAPSHOTS : L.HEADER_OFF_SNAPSHOTS_OFFSET + 8] = bytes(12)
        # ... and accepts a refcount table of zero clusters (the check finds
        # every cluster's refcount missing).
        header = Header.parse(bytes(head), size, check=True)
        corrupt = header.incompatible_features & L.QCOW2_INCOMPAT_CORRUPT
        header.incompatible_features &= ~L.QCOW2_INCOMPAT_CORRUPT
        # As qemu-img check, the data file and the backing chain are opened
        # too (and their errors are the check's), though neither is read.
        data_storage = open_data_file(header, bool(fix), force_share)
        try:
            backing = None
            if name.open_backing:
                backing = open_backing_chain(
                    path, header, writable=bool(fix), force_share=force_share
                )
            image = Qcow2Image(storage, header=header, backing=backing, data_storage=data_storage)
        except BaseException:
            if data_storage is not None:
                data_storage.close()
            raise
        image.header.incompatible_features |= corrupt
        return image
    except QimgError as exc:
        storage.close()
        msg = str(exc)
        if not msg.startswith(f"Could not open '{given}'"):
            exc.args = (f"Could not open '{given}': {msg}",)
        raise
    except BaseException:
        storage.close()
        raise


def check_file(path: str, fmt: str | None = None, fix: int = 0, force_share: bool = False):
    """qemu-img check FILE: open, check (and repair), close."""
    image = open_for_check(path, fmt, fix, force_share)
    try:
        result = check_image(image, fix)
        result.filename = path
        return result
    finally:
        image.close()


def repair_dirty(image) -> CheckResult:
    """QEMU's open of a dirty image (lazy refcounts): repair the refcounts,
    then clear the dirty bit. Call on an image opened read-write whose
    header has the dirty bit; raises CheckFailed if it cannot be repaired."""
    result = _check_once(image, FIX_ALL)
    if result.check_errors:
        raise CheckFailed("Could not repair dirty image: Input/output error", result)
    return result


def _check_once(image, fix: int) -> CheckResult:
    """QEMU's qcow2_co_check_locked."""
    res = CheckResult(filename=image.filename)
    checker = _Checker(image, res, fix)
    try:
        table = _SnapshotTable.check_read(image, res, fix)
        checker.set_snapshots(table, res)
        checker.check_refcounts()
        table.fix(image, res, fix)
    except CheckFailed as exc:
        exc.result = res
        raise
    finally:
        checker.close()
    if fix and not res.check_errors and not res.corruptions:
        _mark_clean(image)
    return res


def _mark_clean(image) -> None:
    """qcow2_mark_clean + qcow2_mark_consistent: clear the dirty and corrupt bits."""
    h = image.header
    bits = L.QCOW2_INCOMPAT_DIRTY | L.QCOW2_INCOMPAT_CORRUPT
    if h.version >= 3 and h.incompatible_features & bits:
        image.flush()
        h.incompatible_features &= ~bits
        image.storage.pwrite(
            L.HEADER_OFF_INCOMPATIBLE_FEATURES, h.incompatible_features.to_bytes(8, "big")
        )
        image.storage.flush()
    image._marked_dirty = False


# --- on-disk refcounts -------------------------------------------------------------


class _OnDisk:
    """Refcounts as stored.

    `full(n)` holds every refcount of clusters [0, n) in one native array
    (the image's width; sub-byte widths widened to uint8), read in runs of
    adjacent refcount blocks: the comparison and OFLAG_COPIED lookups index
    it directly. Clusters past it go through `block()` (bounded cache).
    """

    def __init__(self, image, max_bytes: int = 32 << 20):
        self.image = image
        self.geo = image.geo
        self.table = image.refcounts.table
        self.dtype = _COUNT_DTYPES[self.geo.refcount_order]
        self.cache: dict[int, np.ndarray] = {}
        self.limit = max(8, max_bytes // self.geo.cluster_size)
        # full(): values of whole blocks, and which blocks cannot be read
        # (unaligned, or where QEMU's block layer refuses the read: their
        # values unknown, left zero).
        self.values: np.ndarray | None = None
        self.unreadable: np.ndarray | None = None
        self.any_unreadable = False

    def block_offset(self, index: int) -> int:
        if index >= len(self.table):
            return 0
        return int(self.table[index]) & L.REFT_OFFSET_MASK

    def block(self, index: int) -> np.ndarray | None:
        """Decoded refcount block `index`; None where there is none; raises
        _Unreadable where QEMU's qcow2_get_refcount fails (an unaligned
        block, or one QEMU's block layer refuses to read)."""
        cached = self.cache.get(index)
        if cached is not None:
            return cached
        offset = self.block_offset(index)
        if not offset:
            return None
        if offset % self.geo.cluster_size or offset > MAX_REQUEST_END - self.geo.cluster_size:
            raise _Unreadable(offset)
        raw = self.image.storage.pread(offset, self.geo.cluster_size)
        values = decode_refcount_block(raw, self.geo.refcount_order).astype(self.dtype)
        if len(self.cache) >= self.limit:
            self.cache.pop(next(iter(self.cache)))
        self.cache[index] = values
        return values

    def full(self, n: int) -> np.ndarray:
        """Refcounts of clusters [0, n) at least (whole blocks), native dtype."""
        if self.values is not None and len(self.values) >= n:
            return self.values
        geo = self.geo
        cs = geo.cluster_size
        per = geo.refcount_block_size
        nb = max(1, -(-n // per))
        offs = np.zeros(nb, dtype=np.uint64)
        k = min(nb, len(self.table))
        offs[:k] = self.table[:k] & _U64(L.REFT_OFFSET_MASK)
        unreadable = ((offs & _U64(cs - 1)) != 0) | (offs > _U64(MAX_REQUEST_END - cs))
        offs[unreadable] = 0
        order = geo.refcount_order
        if order >= 3:
            # A numpy buffer, not a bytearray: large ones get huge pages.
            buf = np.zeros(nb * cs, dtype=np.uint8)  # zeros where there is no block
            _read_runs(self.image.storage, offs, cs, buf, skip_zero=True)
            values = buf.view(_COUNT_DTYPES[order])
            if order > 3:
                values.byteswap(inplace=True)
        else:
            values = np.zeros(nb * per, dtype=np.uint8)
            for bi in np.flatnonzero(offs).tolist():
                raw = self.image.storage.pread(int(offs[bi]), cs)
                values[bi * per : (bi + 1) * per] = decode_refcount_block(raw, order)
        self.values = values
        self.unreadable = unreadable
        self.any_unreadable = bool(unreadable.any())
        return values

    def lookup(self, clusters: np.ndarray, runs: list[tuple[int, int]] | None = None):
        """(refcounts, ok) of cluster indices; ok is False where the
        refcount cannot be read (see block()). `runs`, when
        given, are `clusters` as runs [lo, hi) of adjacent clusters."""
        if not len(clusters):
            return np.zeros(0, dtype=np.uint64), np.ones(0, dtype=bool)
        values = self.values
        if values is not None and runs is not None and runs[-1][1] <= len(values):
            refs = np.concatenate([values[lo:hi] for lo, hi in runs])
        elif values is not None and int(clusters.max()) < len(values):
            refs = values[clusters.astype(np.intp, copy=False)]
        else:
            return self._lookup_blocks(clusters)
        if self.any_unreadable:
            idx = clusters.astype(np.intp, copy=False)
            return refs, ~self.unreadable[idx >> self.geo.refcount_block_bits]
        return refs, np.ones(len(clusters), dtype=bool)

    def _lookup_blocks(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bits = self.geo.refcount_block_bits
        out = np.zeros(len(clusters), dtype=np.uint64)
        ok = np.ones(len(clusters), dtype=bool)
        blocks = clusters >> _U64(bits)
        order = np.argsort(blocks, kind="stable")
        sorted_blocks = blocks[order]
        edges = np.flatnonzero(np.diff(sorted_blocks)) + 1
        starts = np.concatenate(([0], edges))
        ends = np.concatenate((edges, [len(order)]))
        mask = _U64((1 << bits) - 1)
        for s, e in zip(starts.tolist(), ends.tolist()):
            bi = int(sorted_blocks[s])
            sel = order[s:e]
            try:
                block = self.block(bi)
            except _Unreadable:
                ok[sel] = False
                continue
            if block is not None:
                out[sel] = block[(clusters[sel] & mask).astype(np.intp)]
        return out, ok

    def invalidate(self) -> None:
        self.cache.clear()
        self.values = None
        self.unreadable = None
        self.any_unreadable = False
        self.table = self.image.refcounts.table


def _read_runs(storage, offsets: np.ndarray, size: int, buf, skip_zero: bool) -> None:
    """Read `size` bytes from each offset (but 0 where skip_zero) into
    buf[k*size:], one read per run of adjacent offsets; what lies past the
    end of the file reads as zeros. buf must be zero where nothing is read."""
    n = len(offsets)
    if not n:
        return
    offs = offsets.astype(np.uint64, copy=False)
    present = offs != 0 if skip_zero else np.ones(n, dtype=bool)
    # A run starts at k unless k-1 is present and ends where k starts.
    follows = np.zeros(n, dtype=bool)
    follows[1:] = present[:-1] & (offs[1:] == offs[:-1] + _U64(size))
    starts = np.flatnonzero(present & ~follows)
    # A run ends at the next index that does not follow its predecessor.
    breaks = np.append(np.flatnonzero(~follows), n)
    ends = breaks[np.searchsorted(breaks, starts, side="right")]
    view = memoryview(buf)
    for k, j in zip(starts.tolist(), ends.tolist()):
        got = storage.preadv(int(offs[k]), view[k * size : j * size])
        if got < (j - k) * size:
            view[k * size + got : j * size] = bytes((j - k) * size - got)


class _LazyKeys:
    """Keys (w, l1_index, k) of a walk's L1 entries, made only when asked."""

    def __init__(self, w: int, indices: np.ndarray, k: int):
        self.w, self.indices, self.k = w, indices, k

    def __getitem__(self, j: int) -> tuple[int, int, int]:
        return (self.w, int(self.indices[j]), self.k)


def _past_end_line(offset: int, size: int) -> str:
    return (
        "ERROR: counting reference for region exceeding the end of the file by "
        f"one cluster or more: offset {offset:#x} size {size:#x}"
    )


def _c_hex(value: int) -> str:
    """C's "%#" PRIx64: like Python's "#x", but 0 prints as "0"."""
    return f"{value:#x}" if value else "0"


class _Unreadable(Exception):
    def __init__(self, offset: int):
        self.offset = offset


# --- the checker ---------------------------------------------------------------------


class _Checker:
    """One run of qcow2_check_refcounts over an image."""

    def __init__(self, image, res: CheckResult, fix: int):
        self.image = image
        self.res = res
        self.fix = fix
        self.geo = image.geo
        self.cs = self.geo.cluster_size
        self.cb = self.geo.cluster_bits
        self.file_len = sector_length(image.storage)
        self.nb_clusters = -(-self.file_len // self.cs)
        self.has_data_file = image.header.has_data_file
        self.v3 = image.header.version >= 3
        self.ondisk = _OnDisk(image)
        self.signaled = False  # see signal_unaligned_block
        self.counts: np.ndarray = np.zeros(0, dtype=np.uint32)
        self.overflow = 0
        self.rebuild = False
        self.oflag_messages: list[str] | None = None
        self.oflag_corruptions = 0
        self._snapshots: tuple[list, int] = ([], 0)
        self.snap_table = _SnapshotTable()
        # Active L2 tables that need repair but share their cluster with
        # other data (see misplaced_l1_tables): -r all drops the L1 entries.
        self.misplaced_active: set[int] = set()
        self._l2_buf: np.ndarray | None = None
        # See say_at: the walk's keyed messages, and those of the L2 tables
        # of the current batch, (table, l2 index, check, line, once) with
        # `once` for repairs (done at the first L1 entry naming the table).
        self.walk_messages: list[tuple[tuple, str]] | None = None
        self.table_messages: list[tuple[int, int, int, str, bool]] = []
        self._batch_base = 0
        self._namings = None
        self._naming_groups = None
        # Overflow (see report_walk_overflows): `trace` (sorted cluster
        # indices) makes the walk record its references to those clusters
        # in `traced` as (key, cluster); after the walk, `checked` makes
        # each reference report overflow where it is made, as QEMU does.
        self.trace: np.ndarray | None = None
        self.traced: list[tuple[tuple, int]] = []
        self.checked = False
        self.locate_overflows = True

    def close(self) -> None:
        self.ondisk.invalidate()

    def say(self, line: str) -> None:
        self.res.messages.append(line)

    # Messages of the L1/L2 walk are collected with a sort key and printed in
    # the order QEMU's entry-by-entry walk meets them, while the tables are
    # handled whole (by kind of problem, each shared L2 table once):
    #   (w, -3) data file with snapshots   (w, -2) snapshot entry unusable
    #   (w, -1) the L1 table itself        (w, l1_index, k) L1 entry, k 0..2
    #   (w, l1_index, 3, l2_index, check)  L2 entry, checks in QEMU's order
    # where w is the walk (0 active, i + 1 snapshot i). Python's sort is
    # stable: messages with equal keys keep the order they were made in.
    L2_RESERVED, L2_FLAGS, L2_LAYOUT, L2_PAST_END, L2_UNALLOC = range(5)

    def say_at(self, key: tuple, line: str) -> None:
        if self.walk_messages is None:
            self.say(line)
        else:
            self.walk_messages.append((key, line))

    def flush_walk_messages(self) -> None:
        """Print the walk's messages in QEMU's order (also on failure)."""
        self.expand_table_messages()
        pending, self.walk_messages = self.walk_messages, None
        if pending:
            pending.sort(key=lambda m: m[0])
            self.res.messages.extend(line for _key, line in pending)

    # --- qcow2_check_refcounts --------------------------------------------------

    def check_refcounts(self) -> None:
        res = self.res
        img = self.image
        res.total_clusters = -(-img.size // self.cs)
        self.calculate_refcounts(res, self.fix)
        pre = _copy_counts(res)
        highest = self.compare_refcounts(res, 0)
        if self.rebuild and self.fix & FIX_ERRORS:
            old = _copy_counts(res)
            self.say("Rebuilding refcount structure")
            self.rebuild_refcount_structure()
            res.corruptions = 0
            res.leaks = 0
            self.rebuild = False
            self.calculate_refcounts(res, 0)
            # The old structure is leaked now: fix that, as QEMU does, in a
            # comparison whose counts are dropped except the leaks it could
            # not fix (those the rebuild itself introduced).
            saved = _copy_counts(res)
            _restore_counts(res, (0, 0, 0, 0, 0))
            highest = self.compare_refcounts(res, FIX_LEAKS)
            if self.rebuild:
                self.say("ERROR rebuilt refcount structure is still broken")
            fresh_leaks = res.leaks
            _restore_counts(res, saved)
            if res.corruptions < old[1]:
                res.corruptions_fixed += old[1] - res.corruptions
            if res.leaks < old[2]:
                res.leaks_fixed += old[2] - res.leaks
            res.leaks += fresh_leaks
        elif self.fix:
            if self.rebuild:
                self.say("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise CheckFailed("Check failed: Input/output error")
            if res.leaks or res.corruptions:
                _restore_counts(res, pre)
                highest = self.compare_refcounts(res, self.fix)
        self.check_oflag_copied(res)
        res.image_end_offset = (highest + 1) * self.cs

    # --- building the in-memory refcounts ---------------------------------------

    def calculate_refcounts(self, res: CheckResult, fix: int) -> None:
        """QEMU's calculate_refcounts, with every reference counted at once."""
        img = self.image
        h = img.header
        self.file_len = sector_length(img.storage)
        self.nb_clusters = -(-self.file_len // self.cs)
        # One cluster of slack: a reference may run up to a cluster past EOF.
        dtype = _COUNT_DTYPES[self.geo.refcount_order]
        self.counts = np.zeros(self.nb_clusters + 1, dtype=dtype)
        self.cap = int(np.iinfo(dtype).max)
        # Invariant: counts[c] == cap exactly where c is in `big`, which
        # holds the true count (>= cap); `bound` >= counts.max().
        self.big: dict[int, int] = {}
        self.bound = 0
        self.overflow = 0
        self.checked = False
        self.in_file_limit = self.nb_clusters + 1
        self.inc_range(res, 0, self.cs)  # header
        # Without repairs the refcounts on disk cannot change before the
        # OFLAG_COPIED check, so it runs during the walk.
        self.oflag_messages = [] if not self.fix else None
        self.oflag_corruptions = 0
        # Walk w: 0 the active L1 table, i + 1 snapshot i's (QEMU's order).
        walks: list[tuple[int, int, bool, int]] = []  # (l1 offset, size, active, walk)
        walks.append((img.clusters.l1_offset, img.clusters.l1_size, True, 0))
        snapshots, snap_size = self.snapshots()
        self.walk_messages = []
        try:
            if self.has_data_file and snapshots:
                self.say_at((1, -3), f"ERROR {len(snapshots)} snapshots in image with data file")
                res.corruptions += 1
            for i, sn in enumerate(snapshots):
                if sn.l1_table_offset % self.cs:
                    self.say_at(
                        (i + 1, -2),
                        f"ERROR snapshot {sn.id_str} ({sn.name}) "
                        f"l1_offset={sn.l1_table_offset:#x}: "
                        "L1 table is not cluster aligned; snapshot table entry corrupted",
                    )
                    res.corruptions += 1
                    continue
                if sn.l1_size > L.QCOW_MAX_L1_SIZE // 8:
                    self.say_at(
                        (i + 1, -2),
                        f"ERROR snapshot {sn.id_str} ({sn.name}) l1_size={sn.l1_size:#x}: "
                        "L1 table is too large; snapshot table entry corrupted",
                    )
                    res.corruptions += 1
                    continue
                walks.append((sn.l1_table_offset, sn.l1_size, False, i + 1))
            self.check_l1_tables(res, walks, fix)
            self.report_walk_overflows(res, walks)
        finally:
            self.flush_walk_messages()
        self.checked = True
        if snapshots or self.snap_table.size:
            self.inc_range(res, self.snap_table.offset, snap_size)
        self.inc_range(res, img.refcounts.table_offset, img.refcounts.table_clusters * self.cs)
        if h.crypto_ext is not None and h.crypto_ext[1]:
            self.inc_range(res, h.crypto_ext[0], h.crypto_ext[1])
        self.check_bitmaps(res, fix)
        self.check_refblocks(res, fix)
        self.finish_counts(res)

    def snapshots(self):
        return self._snapshots

    def set_snapshots(self, table: _SnapshotTable, res: CheckResult) -> None:
        """Use the snapshot table read by the check; under -r all, snapshots
        whose L1 table cannot be used are discarded first (qimg's addition:
        QEMU reports them and keeps them), so that their clusters are freed
        by this very pass."""
        self.snap_table = table
        if self.fix & FIX_ERRORS:
            why = {id(sn): self.unusable_snapshot(sn) for sn in table.snapshots}
            kept = [sn for sn in table.snapshots if why[id(sn)] is None]
            misplaced, self.misplaced_active = self.misplaced_l1_tables(table, kept)
            for sn in misplaced:
                why[id(sn)] = (
                    f"l1_offset={sn.l1_table_offset:#x}: damaged L1 table shares "
                    "clusters with other data"
                )
            for sn in table.snapshots:
                if why[id(sn)] is not None:
                    self.say(
                        f"Repairing snapshot {sn.id_str} ({sn.name}) {why[id(sn)]}; "
                        "snapshot discarded"
                    )
                    res.corruptions_fixed += 1
                    table.rewrite = True
            table.snapshots = [sn for sn in table.snapshots if why[id(sn)] is None]
        self._snapshots = (table.snapshots, table.size)

    def unusable_snapshot(self, sn) -> str | None:
        """Why the snapshot's L1 table cannot be used at all (None: it can)."""
        if self.has_data_file:
            return "in image with data file"
        if sn.l1_table_offset % self.cs:
            return f"l1_offset={sn.l1_table_offset:#x}: L1 table is not cluster aligned"
        if sn.l1_size > L.QCOW_MAX_L1_SIZE // 8:
            return f"l1_size={sn.l1_size:#x}: L1 table is too large"
        if sn.l1_table_offset + sn.l1_size * 8 - self.file_len >= self.cs:
            return f"l1_size={sn.l1_size:#x}: L1 table lies past the end of the file"
        return None

    def misplaced_l1_tables(self, table: _SnapshotTable, kept: list) -> tuple[list, set]:
        """(snapshots of `kept`, active L2 table offsets) whose tables need
        repair where those tables share a cluster with anything else the
        image references: the entry points at the wrong place (often at data
        in use), and repairing "its" L1 or L2 tables would overwrite what
        lies there. Found by a counting pass that writes nothing, run only
        when some table needs repair.

        An L1 table is referenced by itself only; an L2 table once per L1
        entry naming it. More references mean the clusters are shared.
        """
        mask = _U64(L.L1E_OFFSET_MASK)
        l1 = self.image.clusters.l1
        usable = l1[l1 != 0]
        active = l1 & mask
        usable = usable[~self.unusable_l1_entries(usable)] & mask
        active_repaired = [t for t in np.unique(usable).tolist() if self.l2_table_is_garbage(t)]
        named = [active[active != 0]]
        damaged = []
        for sn in kept:
            if not sn.l1_size:
                continue
            entries = self.read_l1(sn.l1_table_offset, sn.l1_size)
            entries = entries[entries != 0]
            bad = self.unusable_l1_entries(entries)
            l2s = entries[~bad] & mask
            named.append(l2s)
            repaired = [
                t for t in np.setdiff1d(l2s, active).tolist() if self.l2_table_is_garbage(t)
            ]
            if bad.any() or repaired:
                damaged.append((sn, repaired))
        if not damaged and not active_repaired:
            return [], set()
        probe = _Checker(self.image, CheckResult(), 0)
        probe._snapshots = (kept, table.size)
        probe.snap_table = table
        probe.locate_overflows = False  # its messages are not printed
        try:
            probe.calculate_refcounts(probe.res, 0)
        except QimgError:
            return [], set()
        finally:
            probe.close()
        tables, naming = np.unique(np.concatenate(named), return_counts=True)
        times = dict(zip(tables.tolist(), naming.tolist()))
        out = []
        for sn, repaired in damaged:
            first = sn.l1_table_offset >> self.cb
            last = (sn.l1_table_offset + sn.l1_size * 8 - 1) >> self.cb
            shared = int(probe.counts[first : last + 1].max(initial=0)) > 1
            shared |= any(probe.count_of(t >> self.cb) > times[t] for t in repaired)
            if shared:
                out.append(sn)
        shared_active = {t for t in active_repaired if probe.count_of(t >> self.cb) > times[t]}
        return out, shared_active

    def inc_range(self, res: CheckResult, offset: int, size: int, key=None) -> None:
        """qcow2_inc_refcounts_imrt for one byte range (`key`: see say_at)."""
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            line = _past_end_line(offset, size)
            self.say(line) if key is None else self.say_at(key, line)
            res.corruptions += 1
            return
        first, last = offset >> self.cb, (offset + size - 1) >> self.cb
        if self.trace is not None and key is not None:
            self._trace_ref(first, last, key)
        if self.checked and int(self.counts[first : last + 1].max()) >= self.geo.refcount_max:
            self._inc_checked(first, last)
            return
        self._bump_range(first, last - first + 1, 1)

    def inc_clusters(
        self, res: CheckResult, offsets: np.ndarray, sizes, weight: int = 1, keys=None
    ) -> None:
        """qcow2_inc_refcounts_imrt for many ranges at once (uint64 offsets);
        `keys`, one per range, place the messages of a walk (see say_at)."""
        if not len(offsets) or weight <= 0:
            return
        ends = offsets + _U64(sizes) if np.isscalar(sizes) else offsets + sizes
        past = (ends.astype(np.int64) - self.file_len) >= self.cs
        if self.checked and self._may_overflow(offsets, ends, past, weight):
            self._inc_each(res, offsets, ends, past, weight)
            return
        if self.trace is not None and keys is not None:
            first = (offsets >> _U64(self.cb)).astype(np.int64)
            last = ((ends - _U64(1)) >> _U64(self.cb)).astype(np.int64)
            for j in self._trace_hits(first, last, ~past):
                self._trace_ref(int(first[j]), int(last[j]), keys[j])
        if past.any():
            sz = np.broadcast_to(np.asarray(sizes, dtype=np.uint64), offsets.shape)
            for j in np.flatnonzero(past).tolist():
                line = _past_end_line(int(offsets[j]), int(sz[j]))
                for _ in range(weight):
                    self.say(line) if keys is None else self.say_at(keys[j], line)
            res.corruptions += int(past.sum()) * weight
            keep = ~past
            offsets, ends = offsets[keep], ends[keep]
        first = (offsets >> _U64(self.cb)).astype(np.int64)
        last = ((ends - _U64(1)) >> _U64(self.cb)).astype(np.int64)
        self._add(first, weight)
        two = last != first
        if two.any():
            self._add(last[two], weight)
            more = last - first > 1
            if more.any():  # compressed data longer than a cluster: rare
                for a, b in zip(first[more].tolist(), last[more].tolist()):
                    self._bump_range(a + 1, b - a - 1, weight)

    # --- refcount overflow ---------------------------------------------------------

    def report_walk_overflows(self, res: CheckResult, walks) -> None:
        """QEMU reports an overflow at each reference found after a cluster's
        count reached refcount_max, during the walk. The walk counts whole
        tables at once; for the (rare) overflowing clusters a second walk,
        which writes nothing, lists their references in walk order, and the
        excess ones get the messages. The counts are then clamped, and the
        references after the walk are checked one by one (`checked`)."""
        rmax = self.geo.refcount_max
        if self.bound < min(rmax + 1, self.cap):  # bound >= counts.max()
            return
        over = np.flatnonzero(self.counts >= min(rmax + 1, self.cap))
        over = np.array([c for c in over.tolist() if self.count_of(c) > rmax], dtype=np.int64)
        if not len(over):
            return
        excess = {c: self.count_of(c) - rmax for c in over.tolist()}
        seen = dict.fromkeys(excess, 0)
        if 0 in seen:
            seen[0] = 1  # the header, counted before the walk
        refs = self.trace_walk(over, walks) if self.locate_overflows else []
        refs.sort(key=lambda r: r[0])
        for key, c in refs:
            seen[c] += 1
            if seen[c] > rmax and excess[c] > 0:
                self.say_overflow(key, c)
                excess[c] -= 1
        for c, n in excess.items():  # not found again: after the walk
            for _ in range(n):
                self.say_overflow((float("inf"),), c)
        res.corruptions += sum(self.count_of(c) - rmax for c in over.tolist())
        self.counts[over] = min(rmax, self.cap)
        for c in over.tolist():
            self.big.pop(c, None)

    def say_overflow(self, key: tuple | None, c: int) -> None:
        for line in (f"ERROR: overflow cluster offset={c << self.cb:#x}", OVERFLOW_HINT):
            self.say(line) if key is None else self.say_at(key, line)

    def trace_walk(self, clusters: np.ndarray, walks) -> list[tuple[tuple, int]]:
        """(key, cluster) of the walk's references to `clusters` (sorted)."""
        probe = _Checker(self.image, CheckResult(), 0)
        probe._snapshots = self._snapshots
        probe.snap_table = self.snap_table
        probe.file_len, probe.nb_clusters = self.file_len, self.nb_clusters
        probe.counts = np.zeros_like(self.counts)
        probe.cap, probe.big, probe.bound = self.cap, {}, 0
        probe.in_file_limit = self.in_file_limit
        probe.trace = clusters
        probe.walk_messages = []
        try:
            probe.check_l1_tables(probe.res, walks, 0)
        finally:
            probe.close()
        return probe.traced

    def _trace_hits(self, first: np.ndarray, last: np.ndarray, keep=None) -> list[int]:
        """Indices j whose range [first[j], last[j]] holds a traced cluster."""
        pos = np.searchsorted(self.trace, first)
        hit = pos < len(self.trace)
        hit[hit] = self.trace[pos[hit]] <= last[hit]
        if keep is not None:
            hit &= keep
        return np.flatnonzero(hit).tolist()

    def _trace_ref(self, first: int, last: int, key: tuple) -> None:
        t = self.trace
        for c in t[(t >= first) & (t <= last)].tolist():
            self.traced.append(((*key, c), c))

    def _trace_entries(self, first, last, t_idx, i_idx, keep=None) -> None:
        """Trace references of L2 entries (table t_idx[j] of the batch,
        index i_idx[j]) to clusters first[j]..last[j], once per naming."""
        for j in self._trace_hits(first, last, keep):
            walks, indices = self.namings(self._batch_base + int(t_idx[j]))
            for w, l1i in zip(walks.tolist(), indices.tolist()):
                key = (w, l1i, 3, int(i_idx[j]), self.L2_PAST_END)
                self._trace_ref(int(first[j]), int(last[j]), key)

    def _may_overflow(self, offsets, ends, past, weight: int) -> bool:
        keep = ~past
        first = (offsets[keep] >> _U64(self.cb)).astype(np.int64)
        last = ((ends[keep] - _U64(1)) >> _U64(self.cb)).astype(np.int64)
        if not len(first):
            return False
        top = int(np.maximum(self.counts[first], self.counts[last]).max())
        return top + weight * (2 * len(first)) > self.geo.refcount_max

    def _inc_each(self, res, offsets, ends, past, weight: int) -> None:
        """inc_clusters reference by reference, as QEMU (after the walk)."""
        for j in range(len(offsets)):
            off, end = int(offsets[j]), int(ends[j])
            for _ in range(weight):
                if past[j]:
                    self.say(_past_end_line(off, end - off))
                    res.corruptions += 1
                else:
                    self._inc_checked(off >> self.cb, (end - 1) >> self.cb)

    def _inc_checked(self, first: int, last: int) -> None:
        """One reference to clusters first..last, reporting overflow."""
        rmax = self.geo.refcount_max
        for c in range(first, last + 1):
            if self.count_of(c) >= rmax:
                self.say_overflow(None, c)
                self.res.corruptions += 1
            else:
                self._bump_range(c, 1, 1)

    def _add(self, idx: np.ndarray, weight: int) -> None:
        """counts[idx] += weight for each index (int64, repeats allowed)."""
        if not len(idx):
            return
        if len(idx) > 1 and not bool((idx[1:] > idx[:-1]).all()):
            idx = np.sort(idx)
            new = np.empty(len(idx), dtype=bool)
            new[0] = True
            np.not_equal(idx[1:], idx[:-1], out=new[1:])
            if not new.all():
                starts = np.flatnonzero(new)
                times = np.diff(np.append(starts, len(idx)))
                self._bump_at(idx[starts], times * weight)
                return
        self._bump_at(idx, weight)

    def _bump_at(self, idx, add) -> None:
        """counts[idx] += add (idx: distinct indices or a slice); saturates
        at cap, keeping the true count in `big`."""
        top = int(add.max()) if isinstance(add, np.ndarray) else int(add)
        if self.bound + top >= self.cap:
            self.bound = int(self.counts.max())
        if self.bound + top < self.cap:
            self.counts[idx] += np.asarray(add).astype(self.counts.dtype)
            self.bound += top
            return
        if isinstance(idx, slice):
            idx = np.arange(idx.start, idx.stop, dtype=np.int64)
        total = self.counts[idx].astype(object) + np.asarray(add).astype(object)
        for j in np.flatnonzero(total >= self.cap).tolist():
            c = int(idx[j])
            if c in self.big:  # counts[c] is cap: add to the true count
                self.big[c] += int(total[j]) - self.cap
            else:
                self.big[c] = int(total[j])
        self.counts[idx] = np.minimum(total, self.cap).astype(self.counts.dtype)
        self.bound = self.cap

    def _bump_runs(self, runs: list[tuple[int, int]], add: int) -> None:
        """counts[lo:hi] += add for disjoint runs [lo, hi) (so that the
        bound grows by `add` only)."""
        if self.bound + add >= self.cap:
            self.bound = int(self.counts.max())
        if self.bound + add >= self.cap:
            for lo, hi in runs:
                self._bump_at(slice(lo, hi), add)
            return
        value = self.counts.dtype.type(add)
        for lo, hi in runs:
            self.counts[lo:hi] += value
        self.bound += add

    def _bump_range(self, first: int, n: int, add: int) -> None:
        """counts[first:first+n] += add."""
        if n > 0:
            self._bump_at(slice(first, first + n), add)

    def count_of(self, c: int) -> int:
        """The exact count of cluster c (before finish_counts)."""
        v = int(self.counts[c])
        return self.big[c] if v == self.cap and c in self.big else v

    # --- L1 and L2 tables ----------------------------------------------------------

    def read_l1(self, offset: int, size: int) -> np.ndarray:
        raw = self.image.storage.pread(offset, size * 8) if size else b""
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    def check_l1_tables(self, res: CheckResult, walks, fix: int) -> None:
        """check_refcounts_l1 for every walk; each L2 table is read once, its
        references weighted by how many L1 entries name it."""
        named: list[np.ndarray] = []  # L2 offsets named by each walk
        named_walk: list[np.ndarray] = []  # ... the walk naming them
        named_index: list[np.ndarray] = []  # ... and the L1 index
        for l1_offset, l1_size, active, w in walks:
            if not l1_size:
                continue
            self.inc_range(res, l1_offset, l1_size * 8, key=(w, -1))
            l1 = self.read_l1(l1_offset, l1_size)
            if fix & FIX_ERRORS:
                l1 = self.repair_l1(res, l1, l1_offset, active, w)
            nz = np.flatnonzero(l1)
            entries = l1[nz]
            bad = np.flatnonzero(entries & _U64(L.L1E_RESERVED_MASK))
            for j, e in zip(bad.tolist(), entries[bad].tolist()):
                self.say_at(
                    (w, int(nz[j]), 0), f"ERROR found L1 entry with reserved bits set: {e:x}"
                )
            res.corruptions += len(bad)
            l2s = entries & _U64(L.L1E_OFFSET_MASK)
            keys = _LazyKeys(w, nz, 1)
            self.inc_clusters(res, l2s, self.cs, keys=keys)
            unaligned = np.flatnonzero((l2s & _U64(self.cs - 1)) != 0)
            for j in unaligned.tolist():
                self.say_at(
                    (w, int(nz[j]), 2),
                    f"ERROR l2_offset={int(l2s[j]):x}: Table is not cluster aligned; "
                    "L1 entry corrupted",
                )
            res.corruptions += len(unaligned)
            named.append(l2s)
            named_walk.append(np.full(len(l2s), w))
            named_index.append(nz)
        if not named:
            return
        # Distinct tables in order of first naming, with how many active and
        # inactive L1 entries name each.
        offs = np.concatenate(named)
        walk = np.concatenate(named_walk)
        act = walk == 0
        distinct, first, inverse = np.unique(offs, return_index=True, return_inverse=True)
        by_first = np.argsort(first, kind="stable")
        actives = np.bincount(inverse[act], minlength=len(distinct))[by_first]
        inactives = np.bincount(inverse[~act], minlength=len(distinct))[by_first]
        order = distinct[by_first]
        # Which L1 entries name each table: worked out when a table has messages.
        self._namings = (inverse.reshape(-1), by_first, walk, np.concatenate(named_index))
        self._naming_groups = None
        if self.oflag_messages is not None:
            self.ondisk.full(self.nb_clusters + 1)
        batch = max(1, L2_BATCH_BYTES // self.cs)
        for i in range(0, len(order), batch):
            part = slice(i, i + batch)
            self._batch_base = i
            self.check_l2_batch(res, order[part], actives[part], inactives[part], fix)
            self.expand_table_messages()

    def namings(self, table: int) -> tuple[np.ndarray, np.ndarray]:
        """(walks, L1 indices) of the L1 entries naming distinct table
        `table` (check_l1_tables' order), in QEMU's walk order."""
        inverse, by_first, walk, index = self._namings
        if self._naming_groups is None:
            rank = np.empty(len(by_first), dtype=np.int64)
            rank[by_first] = np.arange(len(by_first))
            of_naming = rank[inverse]
            by_table = np.argsort(of_naming, kind="stable")
            bounds = np.searchsorted(of_naming[by_table], np.arange(len(by_first) + 1))
            self._naming_groups = (by_table, bounds)
        by_table, bounds = self._naming_groups
        sel = by_table[bounds[table] : bounds[table + 1]]
        return walk[sel], index[sel]

    def table_message(self, t: int, i: int, check: int, line: str, once: bool = False) -> None:
        """A message about entry i of table t of the current batch, printed
        once per L1 entry naming the table (`once`: at the first only)."""
        self.table_messages.append((self._batch_base + t, i, check, line, once))

    def expand_table_messages(self) -> None:
        """Key the current batch's table messages by the L1 entries naming
        each table, as QEMU walks a table once per naming."""
        pending, self.table_messages = self.table_messages, []
        if self.walk_messages is None:
            self.res.messages.extend(m[3] for m in pending)
            return
        for table, i, check, line, once in pending:
            walks, indices = self.namings(table)
            for w, l1i in zip(walks.tolist(), indices.tolist()):
                self.walk_messages.append(((w, l1i, 3, i, check), line))
                if once:
                    break

    def repair_l1(self, res: CheckResult, l1: np.ndarray, l1_offset: int, active: bool, w: int):
        """qimg's addition: clear L1 entries whose L2 table cannot be used
        (reserved bits, unaligned, past EOF, or metadata that is no L2 table)."""
        nz = np.flatnonzero(l1)
        entries = l1[nz]
        bad = self.unusable_l1_entries(entries)
        shared = np.zeros(len(entries), dtype=bool)
        if active and self.misplaced_active:
            offs = entries & _U64(L.L1E_OFFSET_MASK)
            shared = np.isin(offs, list(self.misplaced_active)) & ~bad
        if not (bad.any() or shared.any()):
            return l1
        l1 = l1.copy()
        for j in np.flatnonzero(bad | shared).tolist():
            index = int(nz[j])
            why = "shares clusters with other data" if shared[j] else "unusable"
            self.say_at(
                (w, index, 0),
                f"Repairing L1 entry {index} (l1_entry={int(entries[j]):x}): "
                f"L2 table {why}; made unallocated",
            )
            l1[index] = 0
            data = b"\0" * 8
            kind = "l1" if active else "inactive-l1"
            self.image.write_metadata(l1_offset + index * 8, data, kind)
            if active:
                self.image.clusters.l1[index] = 0
            res.corruptions_fixed += 1
        self.image.flush_file()
        return l1

    def unusable_l1_entries(self, entries: np.ndarray) -> np.ndarray:
        """Mask of the (non-zero) L1 entries whose L2 table cannot be used:
        reserved bits, unaligned, past EOF, or refcount metadata that is no
        L2 table."""
        offs = entries & _U64(L.L1E_OFFSET_MASK)
        bad = (entries & _U64(L.L1E_RESERVED_MASK)) != 0
        bad |= (offs & _U64(self.cs - 1)) != 0
        bad |= (offs.astype(np.int64) + self.cs - self.file_len) >= self.cs
        if not len(entries):
            return bad
        meta = self.refcount_metadata_clusters()
        on_meta = np.isin(offs >> _U64(self.cb), meta) & ~bad
        for j in np.flatnonzero(on_meta).tolist():
            bad[j] = self.l2_table_is_garbage(int(offs[j]))
        return bad

    def refcount_metadata_clusters(self) -> np.ndarray:
        """Cluster indices of the header, refcount table and blocks, active L1."""
        img = self.image
        parts = [np.array([0], dtype=np.uint64)]
        t0 = img.refcounts.table_offset >> self.cb
        parts.append(np.arange(t0, t0 + img.refcounts.table_clusters, dtype=np.uint64))
        rb = img.refcounts.table & _U64(L.REFT_OFFSET_MASK)
        parts.append(rb[rb != 0] >> _U64(self.cb))
        if img.clusters.l1_size:
            a = img.clusters.l1_offset >> self.cb
            b = (img.clusters.l1_offset + img.clusters.l1_size * 8 - 1) >> self.cb
            parts.append(np.arange(a, b + 1, dtype=np.uint64))
        return np.concatenate(parts)

    def l2_table_is_garbage(self, offset: int) -> bool:
        table = self.decode_l2(self.image.storage.pread(offset, self.cs))
        entries = table[:, 0] if table.ndim == 2 else table
        _bad, lost = self.unsavable(entries)
        return bool(lost.any())

    def decode_l2(self, raw: bytes) -> np.ndarray:
        table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        return table.reshape(-1, 2) if self.geo.extended_l2 else table

    def unsavable(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(any entry, lost) masks: entries qimg's repair makes unallocated:
        reserved bits, unaligned data clusters, data past the end of file."""
        compressed = (e & _U64(L.QCOW_OFLAG_COMPRESSED)) != 0
        off = e & _U64(L.L2E_OFFSET_MASK)
        std = ~compressed & (off != 0)
        lost = ~compressed & ((e & _U64(L.L2E_STD_RESERVED_MASK)) != 0)
        lost |= std & ((off & _U64(self.cs - 1)) != 0)
        if self.has_data_file:
            # Data clusters lie in the data file (not bounded by this one's
            # end); compressed clusters cannot exist there.
            lost |= compressed
            return e != 0, lost
        lost |= std & ((off.astype(np.int64) + self.cs - self.file_len) >= self.cs)
        coff = e & _U64(self.geo.cluster_offset_mask)
        lost |= compressed & ((coff.astype(np.int64) + 512 - self.file_len) >= self.cs)
        return e != 0, lost

    def check_l2_batch(self, res: CheckResult, l2_offsets, actives, inactives, fix: int) -> None:
        """check_refcounts_l2 for a batch of distinct L2 tables, named by
        `actives` entries of the active L1 table and `inactives` of snapshots'."""
        offsets = l2_offsets.tolist()
        cs = self.cs
        n = len(offsets)
        # One buffer for every batch: fresh pages cost a fault each.
        if self._l2_buf is None or len(self._l2_buf) < n * cs:
            self._l2_buf = np.empty(n * cs, dtype=np.uint8)  # huge pages, unlike bytearray
        buf = self._l2_buf[: n * cs]
        # An L1 entry with flags but no offset names the header, as in QEMU.
        _read_runs(self.image.storage, l2_offsets, cs, buf, skip_zero=False)
        tables = buf.view(np.uint64)
        tables.byteswap(inplace=True)  # big-endian on disk
        actives = actives.astype(np.int64)
        weights = actives + inactives
        # check_oflag_copied skips L1 entries without an offset (the walk
        # reads the header as their table; see _read_runs above).
        oflag_actives = np.where(l2_offsets == 0, 0, actives)
        if self.geo.extended_l2:
            tables = tables.reshape(n, -1, 2)
            e = tables[:, :, 0].copy()
            bitmap = tables[:, :, 1].copy()
        else:
            e = tables.reshape(n, -1)
            bitmap = None
            if not self.has_data_file and self.walk_l2_plain(
                res, e, weights, actives, oflag_actives
            ):
                return
        if fix & FIX_ERRORS:
            self.repair_l2_batch(res, offsets, e, bitmap)
        self.walk_l2(res, offsets, e, bitmap, weights, actives, fix)
        if self.oflag_messages is not None:
            self.oflag_l2(res, offsets, e, oflag_actives)

    def walk_l2_plain(
        self, res: CheckResult, e: np.ndarray, weights, actives, oflag_actives
    ) -> bool:
        """walk_l2 (and oflag_l2) for a batch whose entries are all
        standard, aligned, without reserved bits and inside the file: the
        common case, with fewer passes and temporaries. Returns False, having
        changed nothing, when the batch needs the general walk."""
        flat = e.reshape(-1)
        unaligned = (self.cs - 1) & L.L2E_OFFSET_MASK
        if int(np.bitwise_or.reduce(flat)) & (_PLAIN_BAD_BITS | unaligned):
            return False
        off = flat & _U64(L.L2E_OFFSET_MASK)
        if int(off.max()) >= self.file_len:
            return False
        normal = off != 0
        del off
        per_table = np.count_nonzero(normal.reshape(e.shape), axis=1)
        if not per_table.any():
            return True
        # Allocated entries in table order, as cluster indices.
        picked = flat[normal]
        copied = picked.view(np.int64) < 0
        np.bitwise_and(picked, _U64(L.L2E_OFFSET_MASK), out=picked)
        np.right_shift(picked, _U64(self.cb), out=picked)
        idx = picked.view(np.int64)
        if self.trace is not None:
            pos = np.flatnonzero(normal)
            width = e.shape[1]
            self._trace_entries(idx, idx, pos // width, pos % width)
        res.allocated_clusters += int((per_table * actives).sum())
        # Fragmentation: a jump between neighbours of the same table.
        jump = idx[1:] != idx[:-1] + 1
        runs = self._runs(idx, jump)
        starts = np.cumsum(per_table) - per_table
        inner = starts[1:][(per_table[1:] > 0) & (starts[1:] > 0)] - 1
        jump[inner] = False
        uniform = bool((actives == actives[0]).all() and (weights == weights[0]).all())
        if uniform:
            res.fragmented_clusters += int(actives[0]) * int(np.count_nonzero(jump))
        else:
            res.fragmented_clusters += int(np.repeat(actives, per_table)[1:][jump].sum())
        del jump
        if uniform and runs is not None:
            self._bump_runs(runs, int(weights[0]))
        elif uniform:
            self._add(idx, int(weights[0]))
        else:
            row_w = np.repeat(weights, per_table)
            for w in np.unique(weights).tolist():
                self._add(idx[row_w == w], w)
        if self.oflag_messages is not None:
            self._oflag_plain(res, flat, normal, idx, copied, per_table, oflag_actives, runs)
        return True

    @staticmethod
    def _runs(idx: np.ndarray, jump: np.ndarray) -> list[tuple[int, int]] | None:
        """idx as a few disjoint runs of adjacent clusters [lo, hi), in
        idx's order; None when there are many (a preallocated image has one
        per L2 table) or when runs overlap (a cluster named twice)."""
        breaks = np.flatnonzero(jump)
        if len(breaks) > len(idx) // 256:
            return None
        firsts = [0, *(breaks + 1).tolist()]
        lasts = [*breaks.tolist(), len(idx) - 1]
        runs = [(int(idx[a]), int(idx[b]) + 1) for a, b in zip(firsts, lasts)]
        ordered = sorted(runs)
        if any(a[1] > b[0] for a, b in zip(ordered, ordered[1:])):
            return None
        return runs

    def _oflag_plain(self, res, flat, normal, idx, copied, per_table, actives, runs) -> None:
        """oflag_l2 for walk_l2_plain's allocated entries (`runs`: their
        cluster indices as runs, when they are few)."""
        refs, ok = self.ondisk.lookup(idx, runs)
        bad = ok & ((refs == 1) != copied)
        if not bool((actives > 0).all()):
            bad &= np.repeat(actives > 0, per_table)
        wrong = np.flatnonzero(bad)
        if not len(wrong):
            return
        where = np.flatnonzero(normal)[wrong]
        width = len(flat) // len(per_table)
        for j, pos in zip(wrong.tolist(), where.tolist()):
            self._report_oflag(res, pos // width, pos % width, int(flat[pos]), int(refs[j]))

    def repair_l2_batch(self, res, offsets, e, bitmap) -> None:
        """qimg's addition to fix_l2_entry_by_zero: entries whose cluster is
        lost (unaligned data, past EOF, reserved bits) become zero (v3) or
        unallocated (v2), where the table may be written."""
        if bitmap is not None:
            self.repair_bitmaps(res, offsets, e, bitmap)
        _any, lost = self.unsavable(e)
        if not lost.any():
            return
        zero = _U64(L.QCOW_OFLAG_ZERO if self.v3 and not self.geo.extended_l2 else 0)
        esize = self.geo.l2_entry_size
        for t in np.flatnonzero(lost.any(axis=1)).tolist():
            l2_offset = offsets[t]
            if self.overlaps(l2_offset, self.cs):
                continue
            for i in np.flatnonzero(lost[t]).tolist():
                old = int(e[t, i])
                self.table_message(
                    t,
                    i,
                    self.L2_RESERVED,
                    f"Repairing offset={old & L.L2E_OFFSET_MASK:x}: cluster lost "
                    f"(l2_entry={old:x}, L2 offset {l2_offset:#x}, index {i}); "
                    "made unallocated",
                    once=True,
                )
                e[t, i] = zero
                data = int(zero).to_bytes(8, "big")
                if bitmap is not None:
                    b = int(bitmap[t, i])
                    b = (b | (b << 32)) & L.QCOW_L2_BITMAP_ALL_ZEROES if self.v3 else 0
                    bitmap[t, i] = b
                    data += b.to_bytes(8, "big")
                self.image.write_metadata(l2_offset + i * esize, data, "l2")
                res.corruptions_fixed += 1
        self.image.clusters.l2_cache.invalidate()
        self.image.flush_file()

    def repair_bitmaps(self, res, offsets, e, bitmap) -> None:
        """qimg's addition (QEMU only reports these): subcluster bitmaps
        that QEMU cannot read are made valid, keeping what can be kept.
        An allocated subcluster also marked zero stays allocated (its data
        was written); an unallocated cluster loses its allocation bits; a
        compressed cluster's bitmap becomes 0 (the spec's only value)."""
        compressed = (e & _U64(L.QCOW_OFLAG_COMPRESSED)) != 0
        off = e & _U64(L.L2E_OFFSET_MASK)
        alloc = bitmap & _U64(L.QCOW_L2_BITMAP_ALL_ALLOC)
        normal = ~compressed & (off != 0)
        both = normal & (((bitmap >> _U64(32)) & bitmap) != 0)
        stray = ~compressed & ~normal & (alloc != 0)
        cbad = compressed & (bitmap != 0)
        if not (both.any() or stray.any() or cbad.any()):
            return
        fixed = bitmap.copy()
        fixed[both] &= ~(alloc[both] << _U64(32))
        fixed[stray] &= ~_U64(L.QCOW_L2_BITMAP_ALL_ALLOC)
        fixed[cbad] = 0
        esize = self.geo.l2_entry_size
        for t, i in zip(*(a.tolist() for a in np.nonzero(both | stray | cbad))):
            l2_offset = offsets[t]
            if self.overlaps(l2_offset, self.cs):
                continue
            v = int(e[t, i])
            if both[t, i]:
                line = (
                    f"Repairing offset={v & L.L2E_OFFSET_MASK:x}: Allocated cluster has "
                    "corrupted subcluster allocation bitmap"
                )
            elif stray[t, i]:
                line = "Repairing: Unallocated cluster has non-zero subcluster allocation map"
            else:
                line = (
                    f"Repairing compressed cluster {i} with non-zero subcluster "
                    f"allocation bitmap, entry={v:#x}"
                )
            self.table_message(t, i, self.L2_FLAGS, line, once=True)
            bitmap[t, i] = fixed[t, i]
            data = int(fixed[t, i]).to_bytes(8, "big")
            self.image.write_metadata(l2_offset + i * esize + 8, data, "l2")
            res.corruptions_fixed += 1
        self.image.clusters.l2_cache.invalidate()
        self.image.flush_file()

    def overlaps(self, offset: int, length: int) -> bool:
        """Would a write of an L2 table land on other metadata? (No side effects.)"""
        img = self.image
        end = offset + length
        for r_off, r_len, kind in img.metadata_regions():
            if kind != "l2" and r_len and offset < r_off + r_len and r_off < end:
                return True
        meta = self.refcount_metadata_clusters()
        return bool(np.any(meta == _U64(offset >> self.cb)))

    def walk_l2(self, res, offsets, e, bitmap, weights, actives, fix) -> None:
        geo = self.geo
        cs = self.cs
        compressed = (e & _U64(L.QCOW_OFLAG_COMPRESSED)) != 0
        off = e & _U64(L.L2E_OFFSET_MASK)
        if geo.extended_l2:
            zero_flag = np.zeros_like(compressed)
        else:
            zero_flag = ~compressed & ((e & _U64(L.QCOW_OFLAG_ZERO)) != 0)
        if self.has_data_file:
            normal = ~compressed & ((off != 0) | (~zero_flag & ((e >> _U64(63)) != 0)))
        else:
            normal = ~compressed & (off != 0)
        w_rows = weights[:, None]

        # Reserved bits of standard descriptors.
        reserved = ~compressed & ((e & _U64(L.L2E_STD_RESERVED_MASK)) != 0)
        if reserved.any():
            self._report_rows(
                res,
                e,
                reserved,
                weights,
                lambda v, i: f"ERROR found l2 entry with reserved bits set: {v:x}",
                self.L2_RESERVED,
            )

        # Compressed clusters.
        if compressed.any():
            copied = compressed & ((e >> _U64(63)) != 0)
            if copied.any():
                cmask = geo.cluster_offset_mask
                self._report_rows(
                    res,
                    e,
                    copied,
                    weights,
                    lambda v, i: (
                        f"ERROR: coffset={v & cmask:#x}: copied flag must never be "
                        "set for compressed clusters"
                    ),
                    self.L2_FLAGS,
                )
            usable = compressed.copy()
            if self.has_data_file:
                self._report_rows(
                    res,
                    e,
                    compressed,
                    weights,
                    lambda v, i: f"ERROR compressed cluster {i} with data file, entry={v:#x}",
                    self.L2_LAYOUT,
                )
                usable[:] = False
            elif bitmap is not None:
                badmap = compressed & (bitmap != 0)
                if badmap.any():
                    self._report_rows(
                        res,
                        e,
                        badmap,
                        weights,
                        lambda v, i: (
                            f"ERROR compressed cluster {i} with non-zero subcluster "
                            f"allocation bitmap, entry={v:#x}"
                        ),
                        self.L2_LAYOUT,
                    )
                    usable &= ~badmap
            ce = e[usable] & ~_U64(L.QCOW_OFLAG_COPIED)
            coff = ce & _U64(geo.cluster_offset_mask)
            nb = ((ce >> _U64(geo.csize_shift)) & _U64(geo.csize_mask)) + _U64(1)
            csize = nb * _U64(512) - (coff & _U64(511))
            wts = np.broadcast_to(w_rows, e.shape)[usable]
            inside = self._report_past_end(res, np.nonzero(usable), coff, csize, weights)
            if self.trace is not None:
                first = (coff >> _U64(self.cb)).astype(np.int64)
                last = ((coff + csize - _U64(1)) >> _U64(self.cb)).astype(np.int64)
                self._trace_entries(first, last, *np.nonzero(usable), inside)
            if inside is not None:
                coff, csize, wts = coff[inside], csize[inside], wts[inside]
            self._inc_weighted(res, coff, csize, wts)
            a = np.broadcast_to(actives[:, None], e.shape)[usable]
            nact = int(a.sum())
            res.allocated_clusters += nact
            res.compressed_clusters += nact
            res.fragmented_clusters += nact

        # Standard allocated clusters (normal and preallocated zero).
        if normal.any():
            if bitmap is not None:
                corrupt_map = normal & (((bitmap >> _U64(32)) & bitmap) != 0)
                if corrupt_map.any():
                    self._report_rows(
                        res,
                        off,
                        corrupt_map,
                        weights,
                        lambda v, i: (
                            f"ERROR offset={v:x}: Allocated cluster has corrupted "
                            "subcluster allocation bitmap"
                        ),
                        self.L2_FLAGS,
                    )
            unaligned = normal & ((off & _U64(cs - 1)) != 0)
            skip = np.zeros_like(normal)
            if unaligned.any():
                if bitmap is not None:
                    has_data = (bitmap & _U64(L.QCOW_L2_BITMAP_ALL_ALLOC)) != 0
                else:
                    has_data = ~zero_flag
                prealloc = unaligned & ~has_data
                dat = unaligned & has_data
                if dat.any():
                    self._report_rows(
                        res,
                        off,
                        dat,
                        weights,
                        lambda v, i: (
                            f"ERROR offset={v:x}: Data cluster is not properly "
                            "aligned; L2 entry corrupted."
                        ),
                        self.L2_LAYOUT,
                    )
                if prealloc.any():
                    skip = self._fix_prealloc(res, offsets, e, bitmap, prealloc, weights, fix)
            counted = normal & ~skip
            # Fragmentation, per active walk: allocated entries in table order.
            t_idx, i_idx = np.nonzero(counted)
            offs = off[t_idx, i_idx]
            act = actives[t_idx]
            if act.any():
                res.allocated_clusters += int(act.sum())
                same = t_idx[1:] == t_idx[:-1]
                jump = offs[1:] != offs[:-1] + _U64(cs)
                res.fragmented_clusters += int((act[1:] * (same & jump)).sum())
            if not self.has_data_file:
                wts = weights[t_idx]
                inside = self._report_past_end(res, (t_idx, i_idx), offs, _U64(cs), weights)
                if self.trace is not None:
                    first = (offs >> _U64(self.cb)).astype(np.int64)
                    last = ((offs + _U64(cs - 1)) >> _U64(self.cb)).astype(np.int64)
                    self._trace_entries(first, last, t_idx, i_idx, inside)
                if inside is not None:
                    offs, wts = offs[inside], wts[inside]
                self._inc_weighted(res, offs, cs, wts)

        # Unallocated entries with a subcluster allocation map.
        if bitmap is not None:
            unalloc = ~compressed & ~normal & ((bitmap & _U64(L.QCOW_L2_BITMAP_ALL_ALLOC)) != 0)
            if unalloc.any():
                self._report_rows(
                    res,
                    e,
                    unalloc,
                    weights,
                    lambda v, i: (
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                    ),
                    self.L2_UNALLOC,
                )
        del w_rows

    def _report_rows(self, res, values, mask, weights, fmt, check: int) -> None:
        """One message per masked entry (values[t, i] formatted), counted
        once per L1 entry naming its table."""
        t_idx, i_idx = np.nonzero(mask)
        for t, i in zip(t_idx.tolist(), i_idx.tolist()):
            self.table_message(t, i, check, fmt(int(values[t, i]), i))
            res.corruptions += int(weights[t])

    def _report_past_end(self, res, where, offsets, sizes, weights) -> np.ndarray | None:
        """qcow2_inc_refcounts_imrt's check for the ranges of entries
        `where` (table, index arrays): those reaching a cluster or more
        past the end of the file are reported at their entry. Returns the
        mask of the others, None when all are inside."""
        ends = offsets + sizes
        past = (ends.astype(np.int64) - self.file_len) >= self.cs
        if not past.any():
            return None
        t_idx, i_idx = where
        sz = np.broadcast_to(np.asarray(sizes, dtype=np.uint64), offsets.shape)
        for j in np.flatnonzero(past).tolist():
            t = int(t_idx[j])
            line = _past_end_line(int(offsets[j]), int(sz[j]))
            self.table_message(t, int(i_idx[j]), self.L2_PAST_END, line)
            res.corruptions += int(weights[t])
        return ~past

    def _inc_weighted(self, res, offsets: np.ndarray, sizes, weights: np.ndarray) -> None:
        if not len(offsets):
            return
        if np.all(weights == weights[0]):
            self.inc_clusters(res, offsets, sizes, int(weights[0]))
            return
        sz = np.broadcast_to(np.asarray(sizes, dtype=np.uint64), offsets.shape)
        for w in np.unique(weights).tolist():
            sel = weights == w
            self.inc_clusters(res, offsets[sel], sz[sel], w)

    def _fix_prealloc(self, res, offsets, e, bitmap, prealloc, weights, fix) -> np.ndarray:
        """Unaligned preallocated clusters: fix_l2_entry_by_zero under -r all."""
        skip = np.zeros_like(prealloc)
        esize = self.geo.l2_entry_size
        t_idx, i_idx = np.nonzero(prealloc)
        off = e & _U64(L.L2E_OFFSET_MASK)
        for t, i in zip(t_idx.tolist(), i_idx.tolist()):
            v = int(off[t, i])
            res.corruptions += 1
            if not fix & FIX_ERRORS:
                self.table_message(
                    t,
                    i,
                    self.L2_LAYOUT,
                    f"ERROR offset={v:x}: Preallocated cluster is not properly aligned; "
                    "L2 entry corrupted.",
                )
                res.corruptions += int(weights[t]) - 1
                continue
            self.table_message(
                t,
                i,
                self.L2_LAYOUT,
                f"Repairing offset={v:x}: Preallocated cluster is not properly aligned; "
                "L2 entry corrupted.",
                once=True,
            )
            l2_offset = offsets[t]
            if self.overlaps(l2_offset, self.cs):
                self.table_message(t, i, self.L2_LAYOUT, "ERROR: Overlap check failed", once=True)
                res.check_errors += 1
                raise CheckFailed("Check failed: Input/output error")
            if bitmap is not None:
                b = int(bitmap[t, i])
                b = (b | (b << 32)) & L.QCOW_L2_BITMAP_ALL_ZEROES
                bitmap[t, i] = b
                e[t, i] = 0
                data = (0).to_bytes(8, "big") + b.to_bytes(8, "big")
            else:
                e[t, i] = L.QCOW_OFLAG_ZERO
                data = L.QCOW_OFLAG_ZERO.to_bytes(8, "big")
            self.image.write_metadata(l2_offset + i * esize, data, "l2")
            self.image.flush_file()
            res.corruptions -= 1
            res.corruptions_fixed += 1
            skip[t, i] = True
        self.image.clusters.l2_cache.invalidate()
        return skip

    # --- bitmaps -----------------------------------------------------------------------

    def check_bitmaps(self, res: CheckResult, fix: int) -> None:
        """qcow2_check_bitmaps_refcounts. The open checked the directory and
        the tables of consistent bitmaps; an in-use bitmap's table is read
        first here, and one QEMU cannot read fails the check."""
        from qimg.formats.qcow2.bitmap import pread_padded, read_bitmap_directory

        bitmaps = read_bitmap_directory(self.image)
        if not bitmaps:
            return
        _nb, dir_size, dir_offset = self.image.header.bitmaps_ext
        self.inc_range(res, dir_offset, dir_size)
        for bm in bitmaps:
            self.inc_range(res, bm.table_offset, bm.table_size * 8)
            raw = pread_padded(self.image, bm.table_offset, bm.table_size * 8)
            table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
            offs = table & _U64(L.BME_TABLE_ENTRY_OFFSET_MASK)
            invalid = (table & _U64(BME_TABLE_ENTRY_RESERVED_MASK)) != 0
            invalid |= (offs != 0) & (
                ((table & _U64(L.BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0)
                | ((offs & _U64(self.cs - 1)) != 0)
            )
            if invalid.any():
                res.corruptions += 1
                raise CheckFailed("Check failed: Invalid argument", res)
            past = (offs != 0) & ((offs.astype(np.int64) - self.file_len) >= 0)
            if (fix & FIX_ERRORS) and past.any():
                table = self.repair_bitmap_table(res, bm, table, past)
                offs = table & _U64(L.BME_TABLE_ENTRY_OFFSET_MASK)
            used = offs[offs != 0]
            self.inc_clusters(res, used, self.cs)

    def repair_bitmap_table(self, res, bm, table, bad) -> np.ndarray:
        """qimg's addition: a bitmap cluster that cannot be read becomes
        'all ones' (every granule dirty: safe for incremental backups)."""
        table = table.copy()
        for i in np.flatnonzero(bad).tolist():
            self.say(
                f"Repairing bitmap '{bm.name}' table entry {i} ({int(table[i]):#x}): "
                "cluster lost; marked all dirty"
            )
            table[i] = L.BME_TABLE_ENTRY_FLAG_ALL_ONES
            res.corruptions_fixed += 1
        self.image.write_metadata(bm.table_offset, table.astype(">u8").tobytes(), "bitmap-table")
        self.image.flush_file()
        return table

    # --- refcount blocks ----------------------------------------------------------------

    def check_refblocks(self, res: CheckResult, fix: int) -> None:
        """QEMU's check_refblocks."""
        table = self.image.refcounts.table
        nz = np.flatnonzero(table)
        for i in nz.tolist():
            raw = int(table[i])
            offset = raw & L.REFT_OFFSET_MASK
            cluster = offset >> self.cb
            if raw & REFT_RESERVED_MASK:
                self.say(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset % self.cs:
                self.say(
                    f"ERROR refcount block {i} is not cluster aligned; "
                    "refcount table entry corrupted"
                )
                res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= self.nb_clusters:
                res.corruptions += 1
                prefix = "Repairing" if fix & FIX_ERRORS else "ERROR"
                self.say(f"{prefix} refcount block {i} is outside image")
                if fix & FIX_ERRORS:
                    # QEMU grows the file; qimg rebuilds the structure instead,
                    # which leaves no block of zeros behind.
                    self.rebuild = True
                continue
            if offset:
                rmax = self.geo.refcount_max
                if self.count_of(cluster) >= rmax:
                    self.say_overflow(None, cluster)
                    res.corruptions += 1
                else:
                    self._bump_range(cluster, 1, 1)
                count = min(self.count_of(cluster), rmax)
                if count != 1:
                    self.say(f"ERROR refcount block {i} refcount={count}")
                    res.corruptions += 1
                    self.rebuild = True

    # --- comparison ---------------------------------------------------------------------

    def finish_counts(self, res: CheckResult) -> np.ndarray:
        """Clamp to refcount_max. Overflows were reported at their
        references (report_walk_overflows, `checked`); any left here are
        reported after everything else."""
        counts = self.counts
        rmax = self.geo.refcount_max
        if self.bound < min(rmax + 1, self.cap):  # the usual case: nothing to clamp
            self.big = {}
            return counts
        over = np.flatnonzero(counts >= min(rmax + 1, self.cap))
        for c in over.tolist():
            n = self.count_of(c) - rmax
            for _ in range(n):
                self.say_overflow(None, c)
            res.corruptions += max(n, 0)
        if len(over) and rmax < self.cap:
            np.minimum(counts, counts.dtype.type(rmax), out=counts)
        self.big = {}
        self.bound = min(self.bound, rmax)
        return counts

    def compare_refcounts(self, res: CheckResult, fix: int) -> int:
        """QEMU's compare_refcounts; returns the highest cluster in use.

        Whole chunks of refcount blocks are compared at once; a chunk with
        an unreadable block (see _OnDisk.block) goes block by block, so that the
        messages keep QEMU's cluster order.
        """
        counts = self.counts
        # QEMU's array covers the file, plus a partly referenced cluster past it.
        limit = self.nb_clusters
        if len(counts) > limit and counts[limit]:
            limit += 1
        bits = self.geo.refcount_block_bits
        per = 1 << bits
        if self.fix:
            self.ondisk.invalidate()
        disk = self.ondisk.full(limit)
        highest = 0
        repairs: list[tuple[int, int, int]] = []
        chunk = max(per, (COMPARE_CHUNK // per) * per)
        for lo in range(0, limit, chunk):
            hi = min(limit, lo + chunk)
            if (
                self.ondisk.any_unreadable
                and self.ondisk.unreadable[lo >> bits : ((hi - 1) >> bits) + 1].any()
            ):
                for blo in range(lo, hi, per):
                    bhi = min(hi, blo + per)
                    if self.ondisk.unreadable[blo >> bits]:
                        self.signal_unaligned_block(blo >> bits)
                        for c in range(blo, bhi):
                            self.say(f"Can't get refcount for cluster {c}: Input/output error")
                        res.check_errors += bhi - blo
                        continue
                    highest = self._compare_span(res, fix, blo, bhi, disk, repairs, highest)
                continue
            highest = self._compare_span(res, fix, lo, hi, disk, repairs, highest)
        if repairs:
            self.apply_refcount_repairs(res, repairs)
        return highest

    def signal_unaligned_block(self, index: int) -> None:
        """qcow2_get_refcount's qcow2_signal_corruption for an unaligned
        refcount block: printed once per open (read-only: not fatal; under
        repair QEMU marks the image corrupt, where qimg rebuilds instead)."""
        offset = self.ondisk.block_offset(index)
        if self.fix or self.signaled or not offset % self.cs:
            return
        self.signaled = True
        self.say(
            f"qcow2: Image is corrupt: Refblock offset {offset:#x} unaligned "
            f"(reftable index: {_c_hex(index)}); further non-fatal corruption events "
            "will be suppressed"
        )

    def _compare_span(self, res, fix, lo: int, hi: int, disk, repairs, highest: int) -> int:
        """compare_refcounts over clusters [lo, hi); returns the new highest."""
        computed = self.counts[lo:hi]
        stored = disk[lo:hi]
        used = (stored != 0) | (computed != 0)
        if used.any():
            highest = lo + len(used) - 1 - int(np.argmax(used[::-1]))
        del used
        diff = np.flatnonzero(stored != computed)
        for j in diff.tolist():
            r1, r2 = int(stored[j]), int(computed[j])
            c = lo + j
            fixed = False
            if r1 == 0:
                self.rebuild = True
            elif r1 > r2 and fix & FIX_LEAKS:
                fixed = True
            elif r1 < r2 and fix & FIX_ERRORS:
                fixed = True
            word = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
            self.say(f"{word} cluster {c} refcount={r1} reference={r2}")
            if fixed:
                repairs.append((c, r1, r2))
            elif r1 < r2:
                res.corruptions += 1
            else:
                res.leaks += 1
        return highest

    def apply_refcount_repairs(self, res: CheckResult, repairs) -> None:
        """update_refcount for each mismatch, through the refcount block cache."""
        rc = self.image.refcounts
        for c, r1, r2 in repairs:
            rc.set_range(c, 1, r2)
            if r1 > r2:
                res.leaks_fixed += 1
            else:
                res.corruptions_fixed += 1
        # Ordering: refcounts are the only metadata changed here.
        rc.blocks.flush()
        self.image.flush_file()
        self.ondisk.invalidate()
        # A cluster freed here is discarded (QCOW2_DISCARD_ALWAYS), after the
        # refcounts naming it free are on disk: it reads as zeros, and the
        # host file gives its blocks back, as after qemu-img's repair.
        storage = self.image.storage
        file_len = storage.size()
        freed = [c for c, _r1, r2 in repairs if r2 == 0 and (c << self.cb) < file_len]
        for first, n in _runs_of(freed):
            offset = first << self.cb
            storage.punch_hole(offset, min(n << self.cb, file_len - offset))

    # --- OFLAG_COPIED ---------------------------------------------------------------------

    def oflag_l2(self, res: CheckResult, offsets, e, actives) -> None:
        """check_oflag_copied's L2 part, done during the walk when nothing is
        repaired (the refcounts on disk cannot change before it would run)."""
        rows = np.flatnonzero(actives)
        if not len(rows):
            return
        sub = e[rows]
        flat = sub.reshape(-1)
        idx, refs, ok = self._oflag_entries(flat)
        copied = (flat[idx] >> _U64(63)) != 0
        bad = np.flatnonzero(ok & ((refs == 1) != copied))
        width = sub.shape[1]
        for j in bad.tolist():
            t = int(rows[idx[j] // width])
            self._report_oflag(res, t, int(idx[j] % width), int(flat[idx[j]]), int(refs[j]))

    def _report_oflag(self, res, t: int, i: int, entry: int, refcount: int) -> None:
        """One OFLAG_COPIED error for entry i of table t of the batch per
        active L1 entry naming the table, as QEMU walks a shared L2 table
        once per L1 entry; keyed (l1_index, 1, i) for check_oflag_copied."""
        line = f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"
        walks, indices = self.namings(self._batch_base + t)
        for l1i in indices[walks == 0].tolist():
            self.oflag_messages.append(((l1i, 1, i), line))
            res.corruptions += 1

    def _oflag_entries(self, e: np.ndarray):
        compressed = (e & _U64(L.QCOW_OFLAG_COMPRESSED)) != 0
        off = e & _U64(L.L2E_OFFSET_MASK)
        if self.has_data_file:
            zero_flag = ~compressed & ((e & _U64(L.QCOW_OFLAG_ZERO)) != 0)
            normal = ~compressed & ((off != 0) | (~zero_flag & ((e >> _U64(63)) != 0)))
        else:
            normal = ~compressed & (off != 0)
        idx = np.flatnonzero(normal)
        if self.has_data_file:
            return idx, np.ones(len(idx), dtype=np.uint64), np.ones(len(idx), dtype=bool)
        refs, ok = self.ondisk.lookup(off[idx] >> _U64(self.cb))
        return idx, refs, ok

    def _oflag_table(self, res: CheckResult, l2_offset: int, e: np.ndarray, repair: bool):
        idx, refs, ok = self._oflag_entries(e)
        copied = (e[idx] >> _U64(63)) != 0
        wrong = ok & ((refs == 1) != copied)
        bad = np.flatnonzero(wrong)
        if not len(bad):
            return None
        word = "Repairing" if repair else "ERROR"
        for j in bad.tolist():
            v = int(e[idx[j]])
            self.say(f"{word} OFLAG_COPIED data cluster: l2_entry={v:x} refcount={int(refs[j])}")
        res.corruptions += len(bad)
        if not repair:
            return None
        fixed = e.copy()
        sel = idx[bad]
        one = refs[bad] == 1
        fixed[sel[one]] |= _U64(L.QCOW_OFLAG_COPIED)
        fixed[sel[~one]] &= ~_U64(L.QCOW_OFLAG_COPIED)
        return fixed, len(bad)

    def _oflag_l1_entry(self, res: CheckResult, i: int, refcount: int, repair: bool) -> None:
        """check_oflag_copied's L1 part for active L1 entry i (flag wrong)."""
        l1 = self.image.clusters.l1
        entry = int(l1[i])
        word = "Repairing" if repair else "ERROR"
        self.say(
            f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={entry:x} refcount={refcount}"
        )
        if not repair:
            res.corruptions += 1
            return
        if refcount == 1:
            l1[i] = entry | L.QCOW_OFLAG_COPIED
        else:
            l1[i] = entry & ~L.QCOW_OFLAG_COPIED
        self.image.clusters.write_l1_entry(i)
        self.image.flush_file()
        res.corruptions_fixed += 1

    def check_oflag_copied(self, res: CheckResult) -> None:
        """QEMU's check_oflag_copied over the active L1 table."""
        fix = self.fix
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        img = self.image
        if self.fix:
            self.ondisk.invalidate()
        self.ondisk.full(self.nb_clusters + 1)
        l1 = img.clusters.l1
        nz = np.flatnonzero(l1 & _U64(L.L1E_OFFSET_MASK))
        wrong_l1: dict[int, int] = {}  # L1 index -> refcount of its L2 table
        if len(nz):
            l2s = (l1[nz] & _U64(L.L1E_OFFSET_MASK)) >> _U64(self.cb)
            refs, ok = self.ondisk.lookup(l2s)
            copied = (l1[nz] >> _U64(63)) != 0
            wrong = np.flatnonzero(ok & ((refs == 1) != copied))
            wrong_l1 = dict(zip(nz[wrong].tolist(), refs[wrong].tolist()))
        word = "Repairing" if repair else "ERROR"
        if self.oflag_messages is not None:
            # The L2 part was done during the walk (nothing is repaired):
            # each L1 entry's message goes before those of its table.
            for i, refcount in wrong_l1.items():
                line = (
                    f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={int(l1[i]):x} "
                    f"refcount={refcount}"
                )
                self.oflag_messages.append(((i, 0), line))
                res.corruptions += 1
            self.oflag_messages.sort(key=lambda m: m[0])
            self.res.messages.extend(line for _key, line in self.oflag_messages)
            self.oflag_messages = None
            return
        for i in nz.tolist():
            if i in wrong_l1:
                self._oflag_l1_entry(res, i, wrong_l1[i], repair)
            l2_offset = int(l1[i]) & L.L1E_OFFSET_MASK
            raw = img.storage.pread(l2_offset, self.cs)
            table = self.decode_l2(raw)
            e = table[:, 0].copy() if table.ndim == 2 else table.copy()
            out = self._oflag_table(res, l2_offset, e, repair)
            if out is None:
                continue
            fixed, n = out
            if self.overlaps(l2_offset, self.cs):
                self.say(
                    "ERROR: Could not write L2 table; metadata overlap check failed: "
                    "Input/output error"
                )
                res.check_errors += 1
                raise CheckFailed("Check failed: Input/output error")
            if table.ndim == 2:
                table = table.copy()
                table[:, 0] = fixed
                data = table.astype(">u8").tobytes()
            else:
                data = fixed.astype(">u8").tobytes()
            img.write_metadata(l2_offset, data, "l2")
            res.corruptions -= n
            res.corruptions_fixed += n
        img.clusters.l2_cache.invalidate()
        img.flush_file()

    # --- rebuild -------------------------------------------------------------------------

    def uncounted_tables(self) -> list[tuple[int, int]]:
        """(first, last) clusters of the tables the header names (active L1,
        snapshot table, bitmap directory) that lie a cluster or more past
        the end of the file: inc_range did not count them."""
        img = self.image
        regions = [(img.clusters.l1_offset, img.clusters.l1_size * 8)]
        regions.append((self.snap_table.offset, self.snap_table.size))
        ext = img.header.bitmaps_ext
        if ext is not None:
            regions.append((ext[2], ext[1]))
        return sorted(
            (off >> self.cb, (off + size - 1) >> self.cb)
            for off, size in regions
            if size > 0 and off + size - self.file_len >= self.cs
        )

    def rebuild_refcount_structure(self) -> None:
        """QEMU's rebuild_refcount_structure: new refblocks and a new
        reftable, allocated first-fit in the in-memory refcounts (which still
        count the old structure), then the header is pointed at them.

        The old structure stays counted in the new refblocks: it is leaked,
        and the leak-fixing comparison that follows frees it (printing its
        "Repairing cluster" lines, as qemu-img does). Allocations are made
        where the in-memory counts are zero, so nothing in use is
        overwritten; the header is written last, after a flush.
        """
        img = self.image
        cs = self.cs
        limit = self.nb_clusters
        if len(self.counts) > limit and self.counts[limit]:
            limit += 1
        rmax = _U64(self.geo.refcount_max)
        counts = np.minimum(self.counts[:limit].astype(np.uint64), rmax)
        # Tables the header names a cluster or more past the end of the file
        # were not counted (they read as zeros). The new structure must not
        # land on one (QEMU's rebuild fails its overlap check there): each is
        # counted as in use, so the grown file holds it with a refcount of 1.
        for first, last in self.uncounted_tables():
            if last >= len(counts):
                counts = np.concatenate((counts, np.zeros(last + 1 - len(counts), np.uint64)))
            counts[first : last + 1] = np.maximum(counts[first : last + 1], _U64(1))
        imrt = _Imrt(counts)
        reftable: list[int] = []
        self._write_refblocks(imrt, reftable, 0, imrt.size)
        while True:
            clusters = -(-len(reftable) * 8 // cs)
            table_cluster = imrt.alloc(clusters, 0)[0]
            if not self._write_refblocks(imrt, reftable, table_cluster, table_cluster + clusters):
                break
        table = np.array(reftable, dtype=">u8").tobytes()
        img.storage.pwrite(table_cluster * cs, table)
        img.storage.flush()
        img.set_refcount_table(table_cluster * cs, clusters)
        img.storage.flush()
        from qimg.formats.qcow2.refcount import Refcounts

        img.refcounts = Refcounts(img, self.geo, table_cluster * cs, clusters)
        self.ondisk = _OnDisk(img)

    def _write_refblocks(self, imrt: _Imrt, reftable: list[int], first: int, end: int) -> bool:
        """rebuild_refcounts_write_refblocks: write the refblock of every
        block of clusters in [first, end) holding a non-zero count (a
        slice of `imrt`), allocating those the reftable lacks; returns
        whether the reftable grew."""
        bits = self.geo.refcount_block_bits
        per = 1 << bits
        entries_per_cluster = self.cs // 8
        first_free = 0
        grown = False
        cluster = first
        while cluster < min(end, imrt.size):
            # The next cluster in use, looked for a refblock's span at a time.
            span = imrt.values[cluster : min(end, imrt.size, ((cluster >> bits) + 1) << bits)]
            nz = np.flatnonzero(span)
            if not len(nz):
                cluster += len(span)
                continue
            cluster += int(nz[0])
            index = cluster >> bits
            start = index << bits
            if index >= len(reftable) or not reftable[index]:
                where, first_free = imrt.alloc(1, max(first_free, start))
                # The refblock holding the new refblock's count is written too.
                end = max(end, where + 1)
                if index >= len(reftable):
                    n = -(-(index + 1) // entries_per_cluster) * entries_per_cluster
                    reftable.extend([0] * (n - len(reftable)))
                    grown = True
                reftable[index] = where * self.cs
            block = imrt.values[start : start + per]
            if len(block) < per:
                block = np.concatenate([block, np.zeros(per - len(block), np.uint64)])
            data = encode_refcount_block(block, self.geo.refcount_order)
            self.image.storage.pwrite(reftable[index], data)
            cluster = start + per
        return grown


class _Imrt:
    """QEMU's in-memory refcount table during a rebuild: one count per
    cluster, `size` of them (QEMU's *nb_clusters); `values` may be longer,
    its entries past `size` are zero."""

    def __init__(self, values: np.ndarray):
        self.values = values
        self.size = len(values)
        # Clusters [dense_from, dense_to) are known in use. Counts only go
        # from zero to one here (and the table grows only by clusters it
        # then allocates), so what is in use stays in use.
        self.dense_from = self.dense_to = 0

    _SCAN = 1 << 16

    def _first_free(self, pos: int) -> int | None:
        """The first cluster at or after `pos` with count zero, if any."""
        start = pos
        while pos < self.size:
            if self.dense_from <= pos < self.dense_to:
                pos = self.dense_to
                continue
            window = self.values[pos : min(self.size, pos + self._SCAN)]
            zeros = np.flatnonzero(window == 0)
            if len(zeros):
                return pos + int(zeros[0])
            pos += len(window)
        if start <= self.dense_to and start < self.size:
            self.dense_from = min(start, self.dense_from)
        elif start < self.size:
            self.dense_from = start
        self.dense_to = max(self.size, self.dense_to)
        return None

    def alloc(self, count: int, first_free: int) -> tuple[int, int]:
        """alloc_clusters_imrt: the first run of `count` free clusters at or
        after `first_free` (growing the table past its end if none), each
        set to 1. Returns (first cluster, the updated first_free)."""
        if count == 1:
            # A refblock: the first free cluster, or one appended past the end.
            start = self._first_free(first_free)
            if start is not None:
                self.values[start] = 1
                return start, start
            start = max(self.size, first_free)
            self.grow(start + 1)
            self.values[start] = 1
            if self.dense_to == start:
                self.dense_to = start + 1
            return start, first_free
        zeros = np.flatnonzero(self.values[first_free : self.size] == 0) + first_free
        if not len(zeros):
            # Nothing free: append after the end (or at first_free past it).
            start = max(self.size, first_free)
            self.grow(start + count)
            self.values[start : start + count] = 1
            return start, first_free
        # Runs of free clusters [run_starts[k], run_ends[k]).
        breaks = np.flatnonzero(np.diff(zeros) != 1)
        run_starts = np.concatenate([zeros[:1], zeros[breaks + 1]])
        run_ends = np.concatenate([zeros[breaks], zeros[-1:]]) + 1
        fits = np.flatnonzero(run_ends - run_starts >= count)
        if len(fits):
            start = int(run_starts[fits[0]])
        else:
            # The run that ends the table (if any) is extended past its end.
            start = int(run_starts[-1]) if int(run_ends[-1]) == self.size else self.size
            self.grow(start + count)
        self.values[start : start + count] = 1
        return start, int(zeros[0])

    def grow(self, size: int) -> None:
        """`size` clusters; the array's room doubles (appends stay linear)."""
        if size > len(self.values):
            values = np.zeros(max(size, 2 * len(self.values)), np.uint64)
            values[: self.size] = self.values[: self.size]
            self.values = values
        self.size = max(self.size, size)


def _runs_of(clusters: list[int]) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in sorted `clusters`."""
    runs: list[tuple[int, int]] = []
    for c in clusters:
        if runs and runs[-1][0] + runs[-1][1] == c:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((c, 1))
    return runs


def _copy_counts(res: CheckResult) -> tuple[int, int, int, int, int]:
    return (res.check_errors, res.corruptions, res.leaks, res.corruptions_fixed, res.leaks_fixed)


def _restore_counts(res: CheckResult, saved) -> None:
    (res.check_errors, res.corruptions, res.leaks, res.corruptions_fixed, res.leaks_fixed) = saved


# --- the snapshot table (block/qcow2-snapshot.c) -------------------------------------

_SNAPSHOT_LIMIT_HINT = (
    "You can force-remove all {n} overhanging snapshots with qemu-img check -r all"
)


def _as_qemu_keeps(sn: Snapshot, extra_len: int, image_size: int) -> None:
    """The entry as qcow2_read_snapshots keeps it in memory: names end at
    their first NUL, the large VM state size counts from 8 bytes of extra
    data, and absent fields take their defaults."""
    sn.id_str = sn.id_str.split("\0", 1)[0]
    sn.name = sn.name.split("\0", 1)[0]
    if extra_len >= 8:
        sn.vm_state_size = int.from_bytes(sn.extra_data[:8].ljust(8, b"\0"), "big")
    if sn.disk_size is None:
        sn.disk_size = image_size
    if sn.icount is None:
        sn.icount = (1 << 64) - 1


@dataclass
class _SnapshotTable:
    """qcow2_check_read_snapshot_table's state: what was read, what to fix."""

    offset: int = 0
    size: int = 0
    snapshots: list = field(default_factory=list)
    # Corruptions that rewriting the table fixes (qcow2_check_fix_snapshot_table).
    corruptions: int = 0
    rewrite: bool = False

    @classmethod
    def check_read(cls, image, res: CheckResult, fix: int) -> _SnapshotTable:
        """qcow2_check_read_snapshot_table; raises CheckFailed where QEMU's fails."""
        import struct

        storage = image.storage
        cs = image.geo.cluster_size
        repair = bool(fix & FIX_ERRORS)
        nb, offset = struct.unpack(">IQ", storage.pread(L.HEADER_OFF_NB_SNAPSHOTS, 12))
        table = cls(offset=offset)
        reduced = 0
        if nb > L.QCOW_MAX_SNAPSHOTS and repair:
            res.messages.append(f"Discarding {nb - L.QCOW_MAX_SNAPSHOTS} overhanging snapshots")
            reduced += nb - L.QCOW_MAX_SNAPSHOTS
            nb = L.QCOW_MAX_SNAPSHOTS
        if nb > L.QCOW_MAX_SNAPSHOTS:
            res.check_errors += 1
            res.messages.append("qimg: ERROR snapshot table too large")
            res.messages.append(_SNAPSHOT_LIMIT_HINT.format(n=nb - L.QCOW_MAX_SNAPSHOTS))
            raise CheckFailed("Check failed: File too large")
        if (1 << 63) - 1 - nb * L.SNAPSHOT_HEADER.size < offset or offset % cs:
            res.check_errors += 1
            res.messages.append("qimg: ERROR snapshot table offset invalid")
            raise CheckFailed("Check failed: Invalid argument")
        file_len = storage.size()

        def pread(pos: int, n: int) -> bytes:
            try:
                check_request(pos, n)
            except ImageIOError as exc:
                res.check_errors += 1
                res.messages.append(
                    f"qimg: ERROR failed to read the snapshot table: "
                    f"Failed to read snapshot table: {exc}"
                )
                raise CheckFailed(f"Check failed: {exc}") from None
            if n <= 0 or pos >= file_len:
                return bytes(max(n, 0))
            return storage.pread(pos, n).ljust(n, b"\0")

        def fail(message: str, hint: str) -> None:
            res.check_errors += 1
            res.messages.append(f"qimg: ERROR failed to read the snapshot table: {message}")
            res.messages.append(hint)
            raise CheckFailed("Check failed: File too large")

        pos, length, dropped = offset, 0, 0
        for i in range(nb):
            pre = pos
            length = (length + 7) & ~7
            pos = (pos + 7) & ~7
            start = pos
            sn, extra_len, pos = parse_entry(pread, pos, L.SNAPSHOT_EXTRA_DATA_SIZE_MAX)
            if extra_len > L.SNAPSHOT_EXTRA_DATA_SIZE_MAX:
                if not repair:
                    fail(
                        f"Too much extra metadata in snapshot table entry {i}",
                        "You can force-remove this extra metadata with qemu-img check -r all",
                    )
                res.messages.append(
                    f"Discarding too much extra metadata in snapshot table entry {i} "
                    f"({extra_len} > {L.SNAPSHOT_EXTRA_DATA_SIZE_MAX})"
                )
                dropped += 1
            _as_qemu_keeps(sn, extra_len, image.size)
            length += pos - start - extra_len + len(sn.extra_data)
            if length > L.QCOW_MAX_SNAPSHOTS_SIZE or pos - offset > (1 << 31) - 1:
                if not repair:
                    fail("Snapshot table is too big", _SNAPSHOT_LIMIT_HINT.format(n=nb - i))
                res.messages.append(
                    f"Discarding {nb - i} overhanging snapshots (snapshot table is too big)"
                )
                reduced += nb - i
                nb = i
                pos = pre
                break
            table.snapshots.append(sn)
        table.size = pos - offset if nb else 0
        res.corruptions += dropped
        table.corruptions += dropped
        if reduced:
            # The header must say what the refcount check will count.
            storage.pwrite(L.HEADER_OFF_NB_SNAPSHOTS, struct.pack(">I", nb))
            storage.flush()
            res.corruptions_fixed += reduced
        if image.header.version >= 3:
            word = "Repairing" if repair else "ERROR"
            for i, sn in enumerate(table.snapshots):
                if len(sn.extra_data) < 16:
                    res.corruptions += 1
                    table.corruptions += 1
                    res.messages.append(f"{word} snapshot table entry {i} is incomplete")
        image.header.nb_snapshots = nb
        image.header.snapshots_offset = offset if nb else image.header.snapshots_offset
        return table

    def fix(self, image, res: CheckResult, fix: int) -> None:
        """qcow2_check_fix_snapshot_table: rewrite the table when it was
        repaired in memory (after the refcounts were made whole)."""
        if not fix & FIX_ERRORS or not (self.corruptions or self.rewrite):
            return
        self._write(image, res.messages)
        res.corruptions_fixed += self.corruptions
        res.corruptions -= self.corruptions
        self.corruptions = 0

    def _write(self, image, messages: list[str]) -> None:
        """qcow2_write_snapshots. Ordering: the new table is written and
        flushed in new clusters before the header names it; the old table
        is freed last (a crash leaks it, never loses the table)."""
        import struct

        out = bytearray()
        for sn in self.snapshots:
            out += bytes(-len(out) % 8)
            id_b, name_b = sn.id_str.encode(), sn.name.encode()
            extra_size = max(L.SNAPSHOT_EXTRA_V3.size, len(sn.extra_data))
            out += L.SNAPSHOT_HEADER.pack(
                sn.l1_table_offset, sn.l1_size, len(id_b), len(name_b), sn.date_sec,
                sn.date_nsec, sn.vm_clock_nsec,
                sn.vm_state_size if sn.vm_state_size <= 0xFFFFFFFF else 0, extra_size,
            )  # fmt: skip
            out += L.SNAPSHOT_EXTRA_V3.pack(sn.vm_state_size, sn.disk_size, sn.icount)
            out += sn.extra_data[L.SNAPSHOT_EXTRA_V3.size :] + id_b + name_b
        cs = image.geo.cluster_size
        new = 0
        # The old table is no longer metadata to protect: it is in memory,
        # and its clusters in the file keep their refcounts until freed
        # below, so no allocation can take them. What a damaged header
        # claims past the end of the file is not a table at all, and new
        # clusters (refcount blocks included) may be placed there.
        image.header.nb_snapshots = 0
        if out:
            new = image.refcounts.alloc(-(-len(out) // cs))
            image.flush()
            image.storage.pwrite(new, bytes(out))
        image.storage.flush()
        nb = len(self.snapshots)
        image.storage.pwrite(L.HEADER_OFF_NB_SNAPSHOTS, struct.pack(">IQ", nb, new))
        image.storage.flush()
        image.header.nb_snapshots, image.header.snapshots_offset = nb, new
        old, size = self.offset, self.size
        if size and old + size <= image.storage.size():
            image.refcounts.free(old, size)
            image.flush()
        elif size:
            # QEMU's qcow2_free_clusters refuses a range past the end of file.
            messages.append("qcow2_free_clusters failed: Invalid argument")
        self.offset, self.size = new, len(out)
