"""The L1/L2 walk: QEMU's check_refcounts_l1 and check_refcounts_l2 over
whole tables.

Every L1 table (active first, then each snapshot's) is read whole; each
distinct L2 table is read once, its references weighted by how many L1
entries name it. L2 tables are read in bounded batches (L2_BATCH_BYTES)
into one reused buffer, adjacent tables in one read. A batch whose entries
are all plain (no compressed, reserved or unaligned entry, none past the
end of file) takes a short path: allocated entries as runs of adjacent
clusters (preallocated images) are counted with slice additions, others
with one fancy-indexed addition.

Messages are keyed so that they print in QEMU's entry-by-entry order (see
messages.py).
"""

from __future__ import annotations

import numpy as np

from qimg.formats.qcow2 import entries as E
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.check.context import CheckContext
from qimg.formats.qcow2.check.messages import (
    L2_FLAGS,
    L2_LAYOUT,
    L2_PAST_END,
    L2_RESERVED,
    L2_UNALLOC,
)
from qimg.formats.qcow2.check.repair import EntryRepair
from qimg.formats.qcow2.check.result import FIX_ERRORS
from qimg.formats.qcow2.check.tally import Tally, past_end_line
from qimg.formats.qcow2.refcount import read_tables

_U64 = np.uint64

# How many bytes of L2 tables one numpy batch holds (bounded memory).
L2_BATCH_BYTES = 4 << 20
# Entry bits that send an L2 batch to the general walk: compressed, reserved.
_PLAIN_BAD_BITS = L.QCOW_OFLAG_COMPRESSED | L.L2E_STD_RESERVED_MASK


class L1Walk:
    """One L1 table to walk: w is 0 for the active table, i + 1 for snapshot i's."""

    def __init__(self, offset: int, size: int, active: bool, w: int):
        self.offset, self.size, self.active, self.w = offset, size, active, w


class _LazyKeys:
    """Keys (w, l1_index, k) of a walk's L1 entries, made only when asked."""

    def __init__(self, w: int, indices: np.ndarray, k: int):
        self.w, self.indices, self.k = w, indices, k

    def __getitem__(self, j: int) -> tuple[int, int, int]:
        return (self.w, int(self.indices[j]), self.k)


class _Namings:
    """Which L1 entries name each distinct L2 table (worked out when a
    table has messages)."""

    def __init__(self, inverse, by_first, walk, index):
        self.inverse, self.by_first, self.walk, self.index = inverse, by_first, walk, index
        self.groups = None

    def __call__(self, table: int) -> tuple[np.ndarray, np.ndarray]:
        """(walks, L1 indices) of the entries naming distinct table `table`
        (check_l1_tables' order), in QEMU's walk order."""
        if self.groups is None:
            n = len(self.by_first)
            rank = np.empty(n, dtype=np.int64)
            rank[self.by_first] = np.arange(n)
            of_naming = rank[self.inverse]
            by_table = np.argsort(of_naming, kind="stable")
            bounds = np.searchsorted(of_naming[by_table], np.arange(n + 1))
            self.groups = (by_table, bounds)
        by_table, bounds = self.groups
        sel = by_table[bounds[table] : bounds[table + 1]]
        return self.walk[sel], self.index[sel]


class _BatchNotes:
    """Messages about entry i of table t of the walk's current batch (the
    batch's first table is distinct table `base`)."""

    def __init__(self, messages):
        self.messages = messages
        self.base = 0

    def __call__(self, t: int, i: int, check: int, line: str, once: bool = False) -> None:
        self.messages.table_message(self.base + t, i, check, line, once)


class Walk:
    """check_refcounts_l1 for a list of L1 tables, counting into `tally`.

    `copied` (when not None) checks OFLAG_COPIED of the active L2 tables as
    they are read (see copied.py); `misplaced_active` are active L2 tables
    whose L1 entries -r all drops (see snapshots.misplaced_l1_tables).
    """

    def __init__(self, ctx: CheckContext, tally: Tally, fix: int, copied=None, misplaced=()):
        self.ctx = ctx
        self.tally = tally
        self.fix = fix
        self.copied = copied
        self.messages = ctx.messages
        self.table_message = _BatchNotes(ctx.messages)
        self.repair = EntryRepair(ctx, self.table_message, set(misplaced))
        self.namings: _Namings | None = None
        self._l2_buf: np.ndarray | None = None

    # --- L1 tables ----------------------------------------------------------------

    def run(self, walks: list[L1Walk]) -> None:
        """Walk every L1 table, then every distinct L2 table they name."""
        named = [self._l1_table(walk) for walk in walks if walk.size]
        if not named:
            return
        # Distinct tables in order of first naming, with how many active and
        # inactive L1 entries name each.
        offs = np.concatenate([n[0] for n in named])
        walk = np.concatenate([np.full(len(n[0]), n[1]) for n in named])
        act = walk == 0
        distinct, first, inverse = np.unique(offs, return_index=True, return_inverse=True)
        by_first = np.argsort(first, kind="stable")
        actives = np.bincount(inverse[act], minlength=len(distinct))[by_first]
        inactives = np.bincount(inverse[~act], minlength=len(distinct))[by_first]
        order = distinct[by_first]
        index = np.concatenate([n[2] for n in named])
        self.namings = _Namings(inverse.reshape(-1), by_first, walk, index)
        self.messages.namings = self.namings
        if self.copied is not None:
            self.ctx.stored.full(self.ctx.nb_clusters + 1)
        batch = max(1, L2_BATCH_BYTES // self.ctx.cs)
        for i in range(0, len(order), batch):
            part = slice(i, i + batch)
            self.table_message.base = i
            self.l2_batch(order[part], actives[part], inactives[part])
            self.messages.expand_table_messages()

    def _l1_table(self, walk: L1Walk) -> tuple[np.ndarray, int, np.ndarray]:
        """check_refcounts_l1's own checks of one L1 table; returns the L2
        offsets it names, its walk number and their L1 indices."""
        ctx, w = self.ctx, walk.w
        self.tally.inc_range(walk.offset, walk.size * 8, key=(w, -1))
        l1 = ctx.read_l1(walk.offset, walk.size)
        if self.fix & FIX_ERRORS:
            l1 = self.repair.l1_table(l1, walk)
        nz = np.flatnonzero(l1)
        entries = l1[nz]
        bad = np.flatnonzero(entries & _U64(L.L1E_RESERVED_MASK))
        for j, e in zip(bad.tolist(), entries[bad].tolist()):
            self.messages.say_at(
                (w, int(nz[j]), 0), f"ERROR found L1 entry with reserved bits set: {e:x}"
            )
        ctx.res.corruptions += len(bad)
        l2s = entries & _U64(L.L1E_OFFSET_MASK)
        self.tally.inc_clusters(l2s, ctx.cs, keys=_LazyKeys(w, nz, 1))
        unaligned = np.flatnonzero((l2s & _U64(ctx.cs - 1)) != 0)
        for j in unaligned.tolist():
            self.messages.say_at(
                (w, int(nz[j]), 2),
                f"ERROR l2_offset={int(l2s[j]):x}: Table is not cluster aligned; "
                "L1 entry corrupted",
            )
        ctx.res.corruptions += len(unaligned)
        return l2s, w, nz

    # --- L2 tables ------------------------------------------------------------------

    def _read_batch(self, l2_offsets: np.ndarray) -> np.ndarray:
        """The batch's tables as native uint64, one row per table."""
        cs, n = self.ctx.cs, len(l2_offsets)
        # One buffer for every batch: fresh pages cost a fault each.
        if self._l2_buf is None or len(self._l2_buf) < n * cs:
            self._l2_buf = np.empty(n * cs, dtype=np.uint8)  # huge pages, unlike bytearray
        buf = self._l2_buf[: n * cs]
        # An L1 entry with flags but no offset names the header, as in QEMU.
        read_tables(self.ctx.image.storage, l2_offsets, cs, buf, skip_zero=False)
        tables = buf.view(np.uint64)
        tables.byteswap(inplace=True)  # big-endian on disk
        return tables.reshape(n, -1)

    def l2_batch(self, l2_offsets, actives, inactives) -> None:
        """check_refcounts_l2 for a batch of distinct L2 tables, named by
        `actives` entries of the active L1 table and `inactives` of snapshots'."""
        offsets = l2_offsets.tolist()
        tables = self._read_batch(l2_offsets)
        actives = actives.astype(np.int64)
        weights = actives + inactives
        # check_oflag_copied skips L1 entries without an offset (the walk
        # reads the header as their table; see _read_batch).
        oflag_actives = np.where(l2_offsets == 0, 0, actives)
        if self.ctx.geo.extended_l2:
            rows = tables.reshape(len(offsets), -1, 2)
            e, bitmap = rows[:, :, 0].copy(), rows[:, :, 1].copy()
        else:
            e, bitmap = tables, None
            if not self.ctx.has_data_file and self._plain(e, weights, actives, oflag_actives):
                return
        if self.fix & FIX_ERRORS:
            self.repair.l2_batch(offsets, e, bitmap)
        _L2Checks(self, offsets, e, bitmap, weights, actives).run()
        if self.copied is not None:
            self.copied.during_walk(e, oflag_actives, self.table_message.base, self.namings)

    def _plain(self, e: np.ndarray, weights, actives, oflag_actives) -> bool:
        """The L2 checks (and OFLAG_COPIED's) for a batch whose entries are
        all standard, aligned, without reserved bits and inside the file:
        the common case, with fewer passes and temporaries. Returns False,
        having changed nothing, when the batch needs the general walk."""
        ctx, res = self.ctx, self.ctx.res
        flat = e.reshape(-1)
        unaligned = (ctx.cs - 1) & L.L2E_OFFSET_MASK
        if int(np.bitwise_or.reduce(flat)) & (_PLAIN_BAD_BITS | unaligned):
            return False
        off = E.host_offsets(flat)
        if int(off.max()) >= ctx.file_len:
            return False
        # Every entry is unallocated, zero, or normal: normal where allocated.
        normal = off != 0
        del off
        per_table = np.count_nonzero(normal.reshape(e.shape), axis=1)
        if not per_table.any():
            return True
        # Allocated entries in table order, as cluster indices.
        picked = flat[normal]
        copied = picked.view(np.int64) < 0
        np.bitwise_and(picked, _U64(L.L2E_OFFSET_MASK), out=picked)
        np.right_shift(picked, _U64(ctx.cb), out=picked)
        idx = picked.view(np.int64)
        if self.tally.trace is not None:
            pos = np.flatnonzero(normal)
            width = e.shape[1]
            self.trace_entries(idx, idx, pos // width, pos % width)
        res.allocated_clusters += int((per_table * actives).sum())
        runs = self._count_plain(idx, per_table, weights, actives)
        if self.copied is not None:
            self.copied.during_walk_plain(
                flat, normal, idx, copied, per_table, oflag_actives, runs, self.table_message.base,
                self.namings,
            )  # fmt: skip
        return True

    def _count_plain(self, idx, per_table, weights, actives) -> list | None:
        """Fragmentation and counts of the plain path's allocated clusters;
        returns them as runs when they are few (see _runs)."""
        res = self.ctx.res
        # Fragmentation: a jump between neighbours of the same table.
        jump = idx[1:] != idx[:-1] + 1
        runs = _runs(idx, jump)
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
            self.tally.bump_runs(runs, int(weights[0]))
        elif uniform:
            self.tally.add(idx, int(weights[0]))
        else:
            row_w = np.repeat(weights, per_table)
            for w in np.unique(weights).tolist():
                self.tally.add(idx[row_w == w], w)
        return runs

    def trace_entries(self, first, last, t_idx, i_idx, keep=None) -> None:
        """Trace references of L2 entries (table t_idx[j] of the batch,
        index i_idx[j]) to clusters first[j]..last[j], once per naming."""
        for j in self.tally.trace_hits(first, last, keep):
            walks, indices = self.namings(self.table_message.base + int(t_idx[j]))
            for w, l1i in zip(walks.tolist(), indices.tolist()):
                key = (w, l1i, 3, int(i_idx[j]), L2_PAST_END)
                self.tally.trace_ref(int(first[j]), int(last[j]), key)


def _runs(idx: np.ndarray, jump: np.ndarray) -> list[tuple[int, int]] | None:
    """idx as a few disjoint runs of adjacent clusters [lo, hi), in idx's
    order; None when there are many (a preallocated image has one per L2
    table) or when runs overlap (a cluster named twice)."""
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


class _L2Checks:
    """check_refcounts_l2's checks of one batch of L2 tables (the general
    path), by QEMU's cluster type of each entry."""

    def __init__(self, walk: Walk, offsets, e, bitmap, weights, actives):
        self.walk = walk
        self.ctx = walk.ctx
        self.res = walk.ctx.res
        self.tally = walk.tally
        self.offsets, self.e, self.bitmap = offsets, e, bitmap
        self.weights, self.actives = weights, actives
        geo = self.ctx.geo
        self.types = E.cluster_types(e, geo.extended_l2, self.ctx.has_data_file)
        self.compressed = self.types == E.CLUSTER_COMPRESSED
        self.normal = E.has_host_cluster(self.types)
        self.off = E.host_offsets(e)

    def run(self) -> None:
        self.reserved_bits()
        if self.compressed.any():
            self.compressed_clusters()
        if self.normal.any():
            self.allocated_clusters()
        if self.bitmap is not None:
            self.unallocated_bitmaps()

    def report(self, values, mask, fmt, check: int) -> None:
        """One message per masked entry (values[t, i] formatted), counted
        once per L1 entry naming its table."""
        t_idx, i_idx = np.nonzero(mask)
        for t, i in zip(t_idx.tolist(), i_idx.tolist()):
            self.walk.table_message(t, i, check, fmt(int(values[t, i]), i))
            self.res.corruptions += int(self.weights[t])

    def report_past_end(self, where, offsets, sizes) -> np.ndarray | None:
        """qcow2_inc_refcounts_imrt's check for the ranges of entries
        `where` (table, index arrays): those reaching a cluster or more
        past the end of the file are reported at their entry. Returns the
        mask of the others, None when all are inside."""
        past = self.tally.past_end(offsets + sizes)
        if not past.any():
            return None
        t_idx, i_idx = where
        sz = np.broadcast_to(np.asarray(sizes, dtype=np.uint64), offsets.shape)
        for j in np.flatnonzero(past).tolist():
            t = int(t_idx[j])
            line = past_end_line(int(offsets[j]), int(sz[j]))
            self.walk.table_message(t, int(i_idx[j]), L2_PAST_END, line)
            self.res.corruptions += int(self.weights[t])
        return ~past

    def reserved_bits(self) -> None:
        """Reserved bits of standard descriptors."""
        reserved = ~self.compressed & ((self.e & _U64(L.L2E_STD_RESERVED_MASK)) != 0)
        if reserved.any():
            self.report(
                self.e,
                reserved,
                lambda v, i: f"ERROR found l2 entry with reserved bits set: {v:x}",
                L2_RESERVED,
            )

    def compressed_flags(self) -> np.ndarray:
        """The flag and layout checks of compressed entries; returns the
        mask of those whose data is counted."""
        e, compressed, geo = self.e, self.compressed, self.ctx.geo
        copied = compressed & E.is_copied(e)
        if copied.any():
            cmask = geo.cluster_offset_mask
            self.report(
                e,
                copied,
                lambda v, i: (
                    f"ERROR: coffset={v & cmask:#x}: copied flag must never be "
                    "set for compressed clusters"
                ),
                L2_FLAGS,
            )
        usable = compressed.copy()
        if self.ctx.has_data_file:
            self.report(
                e,
                compressed,
                lambda v, i: f"ERROR compressed cluster {i} with data file, entry={v:#x}",
                L2_LAYOUT,
            )
            usable[:] = False
        elif self.bitmap is not None:
            badmap = compressed & (self.bitmap != 0)
            if badmap.any():
                self.report(
                    e,
                    badmap,
                    lambda v, i: (
                        f"ERROR compressed cluster {i} with non-zero subcluster "
                        f"allocation bitmap, entry={v:#x}"
                    ),
                    L2_LAYOUT,
                )
                usable &= ~badmap
        return usable

    def compressed_clusters(self) -> None:
        e, geo = self.e, self.ctx.geo
        usable = self.compressed_flags()
        coff, csize = (a.astype(np.uint64) for a in E.compressed_spans(e[usable], geo))
        wts = np.broadcast_to(self.weights[:, None], e.shape)[usable]
        where = np.nonzero(usable)
        inside = self.report_past_end(where, coff, csize)
        if self.tally.trace is not None:
            first = (coff >> _U64(self.ctx.cb)).astype(np.int64)
            last = ((coff + csize - _U64(1)) >> _U64(self.ctx.cb)).astype(np.int64)
            self.walk.trace_entries(first, last, *where, inside)
        if inside is not None:
            coff, csize, wts = coff[inside], csize[inside], wts[inside]
        self.tally.inc_weighted(coff, csize, wts)
        nact = int(np.broadcast_to(self.actives[:, None], e.shape)[usable].sum())
        self.res.allocated_clusters += nact
        self.res.compressed_clusters += nact
        self.res.fragmented_clusters += nact

    def allocated_clusters(self) -> None:
        """Standard allocated clusters (normal and preallocated zero)."""
        normal, off, bitmap, cs = self.normal, self.off, self.bitmap, self.ctx.cs
        if bitmap is not None:
            corrupt_map = normal & (((bitmap >> _U64(32)) & bitmap) != 0)
            if corrupt_map.any():
                self.report(
                    off,
                    corrupt_map,
                    lambda v, i: (
                        f"ERROR offset={v:x}: Allocated cluster has corrupted "
                        "subcluster allocation bitmap"
                    ),
                    L2_FLAGS,
                )
        unaligned = normal & ((off & _U64(cs - 1)) != 0)
        skip = np.zeros_like(normal)
        if unaligned.any():
            skip = self.unaligned_clusters(unaligned)
        counted = normal & ~skip
        # Fragmentation, per active walk: allocated entries in table order.
        t_idx, i_idx = np.nonzero(counted)
        offs = off[t_idx, i_idx]
        act = self.actives[t_idx]
        if act.any():
            self.res.allocated_clusters += int(act.sum())
            same = t_idx[1:] == t_idx[:-1]
            jump = offs[1:] != offs[:-1] + _U64(cs)
            self.res.fragmented_clusters += int((act[1:] * (same & jump)).sum())
        if self.ctx.has_data_file:
            return  # data clusters are counted in the data file
        wts = self.weights[t_idx]
        inside = self.report_past_end((t_idx, i_idx), offs, _U64(cs))
        if self.tally.trace is not None:
            first = (offs >> _U64(self.ctx.cb)).astype(np.int64)
            last = ((offs + _U64(cs - 1)) >> _U64(self.ctx.cb)).astype(np.int64)
            self.walk.trace_entries(first, last, t_idx, i_idx, inside)
        if inside is not None:
            offs, wts = offs[inside], wts[inside]
        self.tally.inc_weighted(offs, cs, wts)

    def unaligned_clusters(self, unaligned) -> np.ndarray:
        """Unaligned data is reported; unaligned preallocated (zero)
        clusters are repaired under -r all. Returns the repaired entries."""
        if self.bitmap is not None:
            has_data = (self.bitmap & _U64(L.QCOW_L2_BITMAP_ALL_ALLOC)) != 0
        else:
            has_data = self.types != E.CLUSTER_ZERO_ALLOC
        prealloc = unaligned & ~has_data
        dat = unaligned & has_data
        if dat.any():
            self.report(
                self.off,
                dat,
                lambda v, i: (
                    f"ERROR offset={v:x}: Data cluster is not properly aligned; L2 entry corrupted."
                ),
                L2_LAYOUT,
            )
        if not prealloc.any():
            return np.zeros_like(unaligned)
        return self.walk.repair.prealloc(
            self.offsets, self.e, self.bitmap, prealloc, self.weights, self.walk.fix
        )

    def unallocated_bitmaps(self) -> None:
        """Unallocated entries with a subcluster allocation map."""
        unalloc = ~self.compressed & ~self.normal
        unalloc &= (self.bitmap & _U64(L.QCOW_L2_BITMAP_ALL_ALLOC)) != 0
        if unalloc.any():
            self.report(
                self.e,
                unalloc,
                lambda v, i: "ERROR: Unallocated cluster has non-zero subcluster allocation map",
                L2_UNALLOC,
            )
