"""One check pass, in QEMU's order: qcow2_co_check_locked (the snapshot
table, then qcow2_check_refcounts, then the snapshot table's repair).

qcow2_check_refcounts: every reference the image makes is counted in
memory (calculate_refcounts: header, active and snapshot L1 tables, each
L2 table once per L1 entry naming it, data and compressed clusters,
snapshot table, refcount table, encryption header, bitmaps, refcount
blocks), then compared with the refcounts on disk; under -r all a broken
refcount structure is rebuilt; last, OFLAG_COPIED is checked.
"""

from __future__ import annotations

import numpy as np

from qimg.errors import QimgError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.check.bitmaps import count_bitmaps
from qimg.formats.qcow2.check.context import CheckContext
from qimg.formats.qcow2.check.copied import CopiedCheck
from qimg.formats.qcow2.check.refcounts import (
    Comparison,
    check_refblocks,
    rebuild_refcount_structure,
)
from qimg.formats.qcow2.check.result import FIX_ERRORS, FIX_LEAKS, CheckFailed, CheckResult
from qimg.formats.qcow2.check.snapshots import SnapshotTable, discard_unusable
from qimg.formats.qcow2.check.tally import Tally
from qimg.formats.qcow2.check.walk import L1Walk, Walk


def check_once(image, fix: int) -> CheckResult:
    """QEMU's qcow2_co_check_locked."""
    res = CheckResult(filename=image.filename)
    ctx = CheckContext(image, res, fix)
    try:
        table = SnapshotTable.check_read(image, res, fix)
        check = RefcountCheck(ctx, table)
        if fix & FIX_ERRORS:
            check.discard_unusable_snapshots()
        check.run()
        table.fix(image, res, fix)
    except CheckFailed as exc:
        exc.result = res
        raise
    if fix and not res.check_errors and not res.corruptions:
        mark_clean(image)
    return res


def mark_clean(image) -> None:
    """qcow2_mark_clean + qcow2_mark_consistent: clear the dirty and corrupt bits."""
    h = image.header
    bits = L.QCOW2_INCOMPAT_DIRTY | L.QCOW2_INCOMPAT_CORRUPT
    if h.version >= 3 and h.incompatible_features & bits:
        image.flush()
        h.incompatible_features &= ~bits
        image._write_incompatible_features()
    image._marked_dirty = False


class RefcountCheck:
    """qcow2_check_refcounts over one image, with the snapshot table the
    check read (`snapshots`: those whose L1 tables are walked)."""

    def __init__(self, ctx: CheckContext, table: SnapshotTable, snapshots: list | None = None):
        self.ctx = ctx
        self.table = table
        self.snapshots = table.snapshots if snapshots is None else snapshots
        self.compare = Comparison(ctx)
        self.copied: CopiedCheck | None = None
        # Active L2 tables whose L1 entries -r all drops (see snapshots.py).
        self.misplaced_active: set[int] = set()
        # Whether overflows found by the walk are placed at their references
        # (not for counting passes whose messages are not printed).
        self.locate_overflows = True

    def run(self) -> None:
        ctx, res, fix = self.ctx, self.ctx.res, self.ctx.fix
        res.total_clusters = -(-ctx.image.size // ctx.cs)
        tally = self.calculate_refcounts(fix)
        before = res.counts()
        highest = self.compare.compare(tally, 0)
        if ctx.rebuild and fix & FIX_ERRORS:
            highest = self.rebuild(tally)
        elif fix:
            if ctx.rebuild:
                ctx.fail("ERROR need to rebuild refcount structures")
            if res.leaks or res.corruptions:
                res.set_counts(before)
                highest = self.compare.compare(tally, fix)
        self.copied.run()
        res.image_end_offset = (highest + 1) * ctx.cs

    def rebuild(self, tally: Tally) -> int:
        """Rebuild the refcount structure, count again, and free the old
        structure; returns the highest cluster in use."""
        ctx, res = self.ctx, self.ctx.res
        old = res.counts()
        ctx.say("Rebuilding refcount structure")
        rebuild_refcount_structure(ctx, tally, self.uncounted_tables())
        res.corruptions = 0
        res.leaks = 0
        ctx.rebuild = False
        tally = self.calculate_refcounts(0)
        # The old structure is leaked now: fix that, as QEMU does, in a
        # comparison whose counts are dropped except the leaks it could not
        # fix (those the rebuild itself introduced).
        saved = res.counts()
        res.set_counts((0, 0, 0, 0, 0))
        highest = self.compare.compare(tally, FIX_LEAKS)
        if ctx.rebuild:
            ctx.say("ERROR rebuilt refcount structure is still broken")
        fresh_leaks = res.leaks
        res.set_counts(saved)
        if res.corruptions < old[1]:
            res.corruptions_fixed += old[1] - res.corruptions
        if res.leaks < old[2]:
            res.leaks_fixed += old[2] - res.leaks
        res.leaks += fresh_leaks
        return highest

    def uncounted_tables(self) -> list[tuple[int, int]]:
        """(first, last) clusters of the tables the header names (active L1,
        snapshot table, bitmap directory) that lie a cluster or more past
        the end of the file: inc_range did not count them."""
        ctx, img = self.ctx, self.ctx.image
        regions = [(img.clusters.l1_offset, img.clusters.l1_size * 8)]
        regions.append((self.table.offset, self.table.size))
        ext = img.header.bitmaps_ext
        if ext is not None:
            regions.append((ext[2], ext[1]))
        return sorted(
            (off >> ctx.cb, (off + size - 1) >> ctx.cb)
            for off, size in regions
            if size > 0 and off + size - ctx.file_len >= ctx.cs
        )

    # --- counting ----------------------------------------------------------------

    def calculate_refcounts(self, fix: int, copied: bool = True) -> Tally:
        """QEMU's calculate_refcounts, with every reference counted at once."""
        ctx, img = self.ctx, self.ctx.image
        ctx.measure_file()
        tally = Tally(ctx.geo, ctx.file_len, ctx.res, ctx.messages)
        tally.inc_range(0, ctx.cs)  # header
        self.copied = CopiedCheck(ctx) if copied else None
        walks = self.l1_walks()
        try:
            walk = Walk(ctx, tally, fix, self._copied_during_walk(), self.misplaced_active)
            walk.run(walks)
            self.report_walk_overflows(tally, walks)
        finally:
            ctx.messages.end_walk()
        tally.checked = True
        if self.snapshots or self.table.size:
            tally.inc_range(self.table.offset, self.table.size)
        tally.inc_range(img.refcounts.table_offset, img.refcounts.table_clusters * ctx.cs)
        h = img.header
        if h.crypto_ext is not None and h.crypto_ext[1]:
            tally.inc_range(h.crypto_ext[0], h.crypto_ext[1])
        count_bitmaps(ctx, tally, fix)
        check_refblocks(ctx, tally, fix)
        tally.finish()
        return tally

    def _copied_during_walk(self) -> CopiedCheck | None:
        if self.copied is not None and self.copied.during is not None:
            return self.copied
        return None

    def l1_walks(self) -> list[L1Walk]:
        """The L1 tables to walk: the active one, then each usable
        snapshot's (QEMU's order); starts the walk's keyed messages with
        those about the snapshot table's entries."""
        ctx, res = self.ctx, self.ctx.res
        walks = [L1Walk(ctx.image.clusters.l1_offset, ctx.image.clusters.l1_size, True, 0)]
        ctx.messages.begin_walk()
        say_at = ctx.messages.say_at
        if ctx.has_data_file and self.snapshots:
            say_at((1, -3), f"ERROR {len(self.snapshots)} snapshots in image with data file")
            res.corruptions += 1
        for i, sn in enumerate(self.snapshots):
            where = f"ERROR snapshot {sn.id_str} ({sn.name})"
            if sn.l1_table_offset % ctx.cs:
                say_at(
                    (i + 1, -2),
                    f"{where} l1_offset={sn.l1_table_offset:#x}: "
                    "L1 table is not cluster aligned; snapshot table entry corrupted",
                )
                res.corruptions += 1
            elif sn.l1_size > L.QCOW_MAX_L1_SIZE // 8:
                say_at(
                    (i + 1, -2),
                    f"{where} l1_size={sn.l1_size:#x}: "
                    "L1 table is too large; snapshot table entry corrupted",
                )
                res.corruptions += 1
            else:
                walks.append(L1Walk(sn.l1_table_offset, sn.l1_size, False, i + 1))
        return walks

    # --- overflow -------------------------------------------------------------------

    def report_walk_overflows(self, tally: Tally, walks: list[L1Walk]) -> None:
        """QEMU reports an overflow at each reference found after a
        cluster's count reached refcount_max, during the walk. For the
        (rare) overflowing clusters a second walk, which writes nothing,
        lists their references in walk order, and the excess ones get the
        messages (see tally.py)."""
        over = tally.overflowing()
        if not len(over):
            return
        refs = self.trace_walk(tally, over, walks) if self.locate_overflows else []
        tally.report_overflows(over, refs)

    def trace_walk(self, tally: Tally, clusters: np.ndarray, walks) -> list[tuple[tuple, int]]:
        """(key, cluster) of the walk's references to `clusters` (sorted)."""
        ctx = CheckContext(self.ctx.image, CheckResult(), 0)
        probe = Tally(ctx.geo, tally.file_len, ctx.res, ctx.messages)
        probe.trace = clusters
        ctx.messages.begin_walk()
        Walk(ctx, probe, 0).run(walks)
        return probe.traced

    # --- snapshots ------------------------------------------------------------------

    def discard_unusable_snapshots(self) -> None:
        """Under -r all, snapshots whose L1 table cannot be used are
        discarded before the walk (see snapshots.discard_unusable)."""
        self.misplaced_active = discard_unusable(self.ctx, self.table, self._count_with)
        self.snapshots = self.table.snapshots

    def _count_with(self, snapshots: list) -> Tally | None:
        """A counting pass over the image with `snapshots`, writing nothing."""
        probe = RefcountCheck(CheckContext(self.ctx.image, CheckResult(), 0), self.table, snapshots)
        probe.locate_overflows = False  # its messages are not printed
        try:
            return probe.calculate_refcounts(0, copied=False)
        except QimgError:
            return None
