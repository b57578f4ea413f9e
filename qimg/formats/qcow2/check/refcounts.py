"""The refcount structure against the computed counts: QEMU's
check_refblocks, compare_refcounts and rebuild_refcount_structure.

A count on disk above the computed one is a leak, below it a corruption; a
cluster in use with a count of 0 on disk, or a broken refcount block, makes
the whole structure be rebuilt when errors are to be fixed (`ctx.rebuild`).
Comparison works on whole chunks of refcount blocks; a Python loop runs
only over the clusters that differ.
"""

from __future__ import annotations

import numpy as np

from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.check.context import CheckContext
from qimg.formats.qcow2.check.result import FIX_ERRORS, FIX_LEAKS
from qimg.formats.qcow2.check.tally import Tally
from qimg.formats.qcow2.refcount import Refcounts, encode_refcount_block

_U64 = np.uint64

# How many clusters one comparison of refcounts takes at once.
COMPARE_CHUNK = 1 << 22


def _c_hex(value: int) -> str:
    """C's "%#" PRIx64: like Python's "#x", but 0 prints as "0"."""
    return f"{value:#x}" if value else "0"


def _runs_of(clusters: list[int]) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in sorted `clusters`."""
    runs: list[tuple[int, int]] = []
    for c in clusters:
        if runs and runs[-1][0] + runs[-1][1] == c:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((c, 1))
    return runs


def check_refblocks(ctx: CheckContext, tally: Tally, fix: int) -> None:
    """QEMU's check_refblocks: each refcount block is counted, and must be
    aligned, inside the image and referenced once."""
    res = ctx.res
    table = ctx.image.refcounts.table
    for i in np.flatnonzero(table).tolist():
        raw = int(table[i])
        offset = raw & L.REFT_OFFSET_MASK
        cluster = offset >> ctx.cb
        if raw & L.REFT_RESERVED_MASK:
            ctx.say(f"ERROR refcount table entry {i} has reserved bits set")
            res.corruptions += 1
            ctx.rebuild = True
            continue
        if offset % ctx.cs:
            ctx.say(
                f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            )
            res.corruptions += 1
            ctx.rebuild = True
            continue
        if cluster >= ctx.nb_clusters:
            res.corruptions += 1
            prefix = "Repairing" if fix & FIX_ERRORS else "ERROR"
            ctx.say(f"{prefix} refcount block {i} is outside image")
            if fix & FIX_ERRORS:
                # QEMU grows the file; qimg rebuilds the structure instead,
                # which leaves no block of zeros behind.
                ctx.rebuild = True
            continue
        if offset:
            tally.inc_refblock(cluster)
            count = min(tally.count_of(cluster), tally.rmax)
            if count != 1:
                ctx.say(f"ERROR refcount block {i} refcount={count}")
                res.corruptions += 1
                ctx.rebuild = True


class Comparison:
    """compare_refcounts for one check pass (the unaligned-block signal is
    printed once per pass, as once per open in QEMU)."""

    def __init__(self, ctx: CheckContext):
        self.ctx = ctx
        self.signaled = False

    def compare(self, tally: Tally, fix: int) -> int:
        """QEMU's compare_refcounts; returns the highest cluster in use.

        Whole chunks of refcount blocks are compared at once; a chunk with
        an unreadable block goes block by block, so that the messages keep
        QEMU's cluster order.
        """
        ctx = self.ctx
        limit = tally.in_use_limit()
        bits = ctx.geo.refcount_block_bits
        per = 1 << bits
        if ctx.fix:
            ctx.forget_stored()
        stored = ctx.stored
        disk = stored.full(limit)
        highest = 0
        repairs: list[tuple[int, int, int]] = []
        chunk = max(per, (COMPARE_CHUNK // per) * per)
        for lo in range(0, limit, chunk):
            hi = min(limit, lo + chunk)
            if not (
                stored.any_unreadable
                and stored.unreadable[lo >> bits : ((hi - 1) >> bits) + 1].any()
            ):
                highest = self._span(tally, fix, lo, hi, disk, repairs, highest)
                continue
            for blo in range(lo, hi, per):
                bhi = min(hi, blo + per)
                if stored.unreadable[blo >> bits]:
                    self._unreadable_block(blo, bhi)
                    continue
                highest = self._span(tally, fix, blo, bhi, disk, repairs, highest)
        if repairs:
            self._apply(repairs)
        return highest

    def _unreadable_block(self, lo: int, hi: int) -> None:
        ctx = self.ctx
        self._signal_unaligned_block(lo >> ctx.geo.refcount_block_bits)
        for c in range(lo, hi):
            ctx.say(f"Can't get refcount for cluster {c}: Input/output error")
        ctx.res.check_errors += hi - lo

    def _signal_unaligned_block(self, index: int) -> None:
        """qcow2_get_refcount's qcow2_signal_corruption for an unaligned
        refcount block: printed once per open (read-only: not fatal; under
        repair QEMU marks the image corrupt, where qimg rebuilds instead)."""
        ctx = self.ctx
        offset = ctx.stored.block_offset(index)
        if ctx.fix or self.signaled or not offset % ctx.cs:
            return
        self.signaled = True
        ctx.say(
            f"qcow2: Image is corrupt: Refblock offset {offset:#x} unaligned "
            f"(reftable index: {_c_hex(index)}); further non-fatal corruption events "
            "will be suppressed"
        )

    def _span(self, tally: Tally, fix: int, lo: int, hi: int, disk, repairs, highest: int) -> int:
        """compare_refcounts over clusters [lo, hi); returns the new highest."""
        ctx, res = self.ctx, self.ctx.res
        computed = tally.counts[lo:hi]
        stored = disk[lo:hi]
        used = (stored != 0) | (computed != 0)
        if used.any():
            highest = lo + len(used) - 1 - int(np.argmax(used[::-1]))
        del used
        for j in np.flatnonzero(stored != computed).tolist():
            r1, r2 = int(stored[j]), int(computed[j])
            c = lo + j
            fixed = False
            if r1 == 0:
                ctx.rebuild = True
            elif r1 > r2 and fix & FIX_LEAKS:
                fixed = True
            elif r1 < r2 and fix & FIX_ERRORS:
                fixed = True
            word = "Repairing" if fixed else ("ERROR" if r1 < r2 else "Leaked")
            ctx.say(f"{word} cluster {c} refcount={r1} reference={r2}")
            if fixed:
                repairs.append((c, r1, r2))
            elif r1 < r2:
                res.corruptions += 1
            else:
                res.leaks += 1
        return highest

    def _apply(self, repairs: list[tuple[int, int, int]]) -> None:
        """update_refcount for each mismatch, through the refcount block cache."""
        ctx, res = self.ctx, self.ctx.res
        rc = ctx.image.refcounts
        for c, r1, r2 in repairs:
            rc.set_range(c, 1, r2)
            if r1 > r2:
                res.leaks_fixed += 1
            else:
                res.corruptions_fixed += 1
        # Ordering: refcounts are the only metadata changed here.
        rc.blocks.flush()
        ctx.image.flush_file()
        ctx.forget_stored()
        # A cluster freed here is discarded (QCOW2_DISCARD_ALWAYS), after the
        # refcounts naming it free are on disk: it reads as zeros, and the
        # host file gives its blocks back, as after qemu-img's repair.
        storage = ctx.image.storage
        file_len = storage.size()
        freed = [c for c, _r1, r2 in repairs if r2 == 0 and (c << ctx.cb) < file_len]
        for first, n in _runs_of(freed):
            offset = first << ctx.cb
            storage.punch_hole(offset, min(n << ctx.cb, file_len - offset))


# --- rebuild ---------------------------------------------------------------------


def rebuild_refcount_structure(
    ctx: CheckContext, tally: Tally, uncounted: list[tuple[int, int]]
) -> None:
    """QEMU's rebuild_refcount_structure: new refblocks and a new reftable,
    allocated first-fit in the in-memory refcounts (which still count the
    old structure), then the header is pointed at them.

    The old structure stays counted in the new refblocks: it is leaked, and
    the leak-fixing comparison that follows frees it (printing its
    "Repairing cluster" lines, as qemu-img does). Allocations are made
    where the in-memory counts are zero, so nothing in use is overwritten;
    the header is written last, after a flush. `uncounted`: (first, last)
    clusters of tables the header names a cluster or more past the end of
    the file (not counted: they read as zeros); the new structure must not
    land on one (QEMU's rebuild fails its overlap check there), so each is
    counted as in use, and the grown file holds it with a refcount of 1.
    """
    img, cs = ctx.image, ctx.cs
    limit = tally.in_use_limit()
    counts = np.minimum(tally.counts[:limit].astype(np.uint64), _U64(ctx.geo.refcount_max))
    for first, last in uncounted:
        if last >= len(counts):
            counts = np.concatenate((counts, np.zeros(last + 1 - len(counts), np.uint64)))
        counts[first : last + 1] = np.maximum(counts[first : last + 1], _U64(1))
    imrt = _Imrt(counts)
    reftable: list[int] = []
    _write_refblocks(ctx, imrt, reftable, 0, imrt.size)
    while True:
        clusters = -(-len(reftable) * 8 // cs)
        table_cluster = imrt.alloc(clusters, 0)[0]
        if not _write_refblocks(ctx, imrt, reftable, table_cluster, table_cluster + clusters):
            break
    img.storage.pwrite(table_cluster * cs, np.array(reftable, dtype=">u8").tobytes())
    img.storage.flush()
    img.set_refcount_table(table_cluster * cs, clusters)
    img.storage.flush()
    img.refcounts = Refcounts(img, ctx.geo, table_cluster * cs, clusters)
    ctx.forget_stored()


def _write_refblocks(
    ctx: CheckContext, imrt: _Imrt, reftable: list[int], first: int, end: int
) -> bool:
    """rebuild_refcounts_write_refblocks: write the refblock of every block
    of clusters in [first, end) holding a non-zero count (a slice of
    `imrt`), allocating those the reftable lacks; returns whether the
    reftable grew."""
    bits = ctx.geo.refcount_block_bits
    per = 1 << bits
    entries_per_cluster = ctx.cs // 8
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
            reftable[index] = where * ctx.cs
        block = imrt.values[start : start + per]
        if len(block) < per:
            block = np.concatenate([block, np.zeros(per - len(block), np.uint64)])
        data = encode_refcount_block(block, ctx.geo.refcount_order)
        ctx.image.storage.pwrite(reftable[index], data)
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
