"""QEMU's check_oflag_copied: OFLAG_COPIED must be set exactly where the
refcount of the cluster an active L1 or L2 entry names is 1.

Without repairs the refcounts on disk cannot change before this check, so
the L2 part runs during the walk, on the tables it reads (`during_walk`);
its messages are keyed (l1_index, 0) for the L1 entry and (l1_index, 1, i)
for entry i of its table, QEMU's order. With repairs it runs after the
refcounts are made whole, table by table (`run`).
"""

from __future__ import annotations

import numpy as np

from qimg.formats.qcow2 import entries as E
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.check.context import CheckContext
from qimg.formats.qcow2.check.result import FIX_ERRORS, FIX_LEAKS

_U64 = np.uint64


class CopiedCheck:
    def __init__(self, ctx: CheckContext):
        self.ctx = ctx
        # Keyed messages of the L2 part done during the walk; None when the
        # check runs after the refcounts are repaired.
        self.during: list[tuple[tuple, str]] | None = [] if not ctx.fix else None

    # --- during the walk ------------------------------------------------------------

    def during_walk(self, e: np.ndarray, actives, base: int, namings) -> None:
        """The L2 part for a batch of the walk (tables base + t)."""
        rows = np.flatnonzero(actives)
        if not len(rows):
            return
        sub = e[rows]
        flat = sub.reshape(-1)
        idx, refs, ok = self._refcounts(flat)
        copied = E.is_copied(flat[idx])
        bad = np.flatnonzero(ok & ((refs == 1) != copied))
        width = sub.shape[1]
        for j in bad.tolist():
            t = base + int(rows[idx[j] // width])
            self._report(t, int(idx[j] % width), int(flat[idx[j]]), int(refs[j]), namings)

    def during_walk_plain(
        self, flat, normal, idx, copied, per_table, actives, runs, base: int, namings
    ) -> None:
        """The L2 part for the walk's plain path: allocated entries `normal`
        of `flat`, as cluster indices `idx` (as `runs` when few)."""
        refs, ok = self.ctx.stored.lookup(idx, runs)
        bad = ok & ((refs == 1) != copied)
        if not bool((actives > 0).all()):
            bad &= np.repeat(actives > 0, per_table)
        wrong = np.flatnonzero(bad)
        if not len(wrong):
            return
        where = np.flatnonzero(normal)[wrong]
        width = len(flat) // len(per_table)
        for j, pos in zip(wrong.tolist(), where.tolist()):
            t = base + pos // width
            self._report(t, pos % width, int(flat[pos]), int(refs[j]), namings)

    def _report(self, table: int, i: int, entry: int, refcount: int, namings) -> None:
        """One error for entry i of distinct table `table` per active L1
        entry naming the table, as QEMU walks a shared table once per L1
        entry."""
        line = f"ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"
        walks, indices = namings(table)
        for l1i in indices[walks == 0].tolist():
            self.during.append(((l1i, 1, i), line))
            self.ctx.res.corruptions += 1

    def _refcounts(self, e: np.ndarray):
        """(indices of the entries with a host cluster, their refcounts, ok)."""
        ctx = self.ctx
        types = E.cluster_types(e, ctx.geo.extended_l2, ctx.has_data_file)
        idx = np.flatnonzero(E.has_host_cluster(types))
        if ctx.has_data_file:
            return idx, np.ones(len(idx), dtype=np.uint64), np.ones(len(idx), dtype=bool)
        refs, ok = ctx.stored.lookup(E.host_offsets(e[idx]) >> _U64(ctx.cb))
        return idx, refs, ok

    # --- the check -----------------------------------------------------------------

    def run(self) -> None:
        """check_oflag_copied over the active L1 table."""
        ctx, res = self.ctx, self.ctx.res
        if ctx.fix & FIX_ERRORS:
            repair = True
        elif ctx.fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        if ctx.fix:
            ctx.forget_stored()
        ctx.stored.full(ctx.nb_clusters + 1)
        l1 = ctx.image.clusters.l1
        nz = np.flatnonzero(l1 & _U64(L.L1E_OFFSET_MASK))
        wrong_l1 = self._wrong_l1_entries(l1, nz)
        if self.during is not None:
            self._finish_during_walk(l1, wrong_l1, repair)
            return
        for i in nz.tolist():
            if i in wrong_l1:
                self._l1_entry(i, wrong_l1[i], repair)
            self._l2_table(int(l1[i]) & L.L1E_OFFSET_MASK, repair)
        ctx.image.clusters.l2_cache.invalidate()
        ctx.image.flush_file()

    def _wrong_l1_entries(self, l1: np.ndarray, nz: np.ndarray) -> dict[int, int]:
        """L1 index -> refcount of its L2 table, where the flag is wrong."""
        if not len(nz):
            return {}
        refs, ok = self.ctx.stored.lookup((l1[nz] & _U64(L.L1E_OFFSET_MASK)) >> _U64(self.ctx.cb))
        wrong = np.flatnonzero(ok & ((refs == 1) != E.is_copied(l1[nz])))
        return dict(zip(nz[wrong].tolist(), refs[wrong].tolist()))

    def _finish_during_walk(self, l1, wrong_l1: dict[int, int], repair: bool) -> None:
        """The L2 part was done during the walk: each L1 entry's message
        goes before those of its table."""
        word = "Repairing" if repair else "ERROR"
        for i, refcount in wrong_l1.items():
            line = (
                f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={int(l1[i]):x} "
                f"refcount={refcount}"
            )
            self.during.append(((i, 0), line))
            self.ctx.res.corruptions += 1
        self.during.sort(key=lambda m: m[0])
        self.ctx.res.messages.extend(line for _key, line in self.during)
        self.during = None

    def _l1_entry(self, i: int, refcount: int, repair: bool) -> None:
        """The L1 part for active L1 entry i (flag wrong)."""
        ctx = self.ctx
        l1 = ctx.image.clusters.l1
        entry = int(l1[i])
        word = "Repairing" if repair else "ERROR"
        ctx.say(
            f"{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={entry:x} refcount={refcount}"
        )
        if not repair:
            ctx.res.corruptions += 1
            return
        if refcount == 1:
            l1[i] = entry | L.QCOW_OFLAG_COPIED
        else:
            l1[i] = entry & ~L.QCOW_OFLAG_COPIED
        ctx.image.clusters.write_l1_entry(i)
        ctx.image.flush_file()
        ctx.res.corruptions_fixed += 1

    def _l2_table(self, l2_offset: int, repair: bool) -> None:
        """The L2 part for one active L2 table: report, and under repair
        rewrite the table with the flags set right."""
        ctx, res = self.ctx, self.ctx.res
        table = E.decode_l2(ctx.image.storage.pread(l2_offset, ctx.cs), ctx.geo.extended_l2)
        e = E.descriptors(table).copy()
        idx, refs, ok = self._refcounts(e)
        bad = np.flatnonzero(ok & ((refs == 1) != E.is_copied(e[idx])))
        if not len(bad):
            return
        word = "Repairing" if repair else "ERROR"
        for j in bad.tolist():
            v = int(e[idx[j]])
            ctx.say(f"{word} OFLAG_COPIED data cluster: l2_entry={v:x} refcount={int(refs[j])}")
        res.corruptions += len(bad)
        if not repair:
            return
        sel = idx[bad]
        one = refs[bad] == 1
        e[sel[one]] |= _U64(L.QCOW_OFLAG_COPIED)
        e[sel[~one]] &= ~_U64(L.QCOW_OFLAG_COPIED)
        if ctx.l2_write_overlaps(l2_offset):
            ctx.fail(
                "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error"
            )
        if table.ndim == 2:
            table = table.copy()
            table[:, 0] = e
        else:
            table = e
        ctx.image.write_metadata(l2_offset, E.encode_l2(table), "l2")
        res.corruptions -= len(bad)
        res.corruptions_fixed += len(bad)
