"""The snapshot table under check: QEMU's qcow2_check_read_snapshot_table
and qcow2_check_fix_snapshot_table, and qimg's discarding (under -r all) of
snapshots whose L1 table cannot be used."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qimg.errors import ImageIOError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.check.context import CheckContext
from qimg.formats.qcow2.check.repair import EntryRepair
from qimg.formats.qcow2.check.result import FIX_ERRORS, CheckFailed, CheckResult
from qimg.formats.qcow2.snapshot import Snapshot, parse_entry, write_snapshot_table
from qimg.storage import check_request

_U64 = np.uint64

_SNAPSHOT_LIMIT_HINT = (
    "You can force-remove all {n} overhanging snapshots with qemu-img check -r all"
)


class _Reader:
    """Reads of the table as qcow2_check_read_snapshot_table makes them."""

    def __init__(self, storage, res: CheckResult):
        self.storage = storage
        self.res = res
        self.file_len = storage.size()

    def pread(self, pos: int, n: int) -> bytes:
        try:
            check_request(pos, n)
        except ImageIOError as exc:
            self.res.check_errors += 1
            self.res.messages.append(
                f"qimg: ERROR failed to read the snapshot table: "
                f"Failed to read snapshot table: {exc}"
            )
            raise CheckFailed(f"Check failed: {exc}") from None
        if n <= 0 or pos >= self.file_len:
            return bytes(max(n, 0))
        return self.storage.pread(pos, n).ljust(n, b"\0")

    def fail(self, message: str, hint: str) -> None:
        self.res.check_errors += 1
        self.res.messages.append(f"qimg: ERROR failed to read the snapshot table: {message}")
        self.res.messages.append(hint)
        raise CheckFailed("Check failed: File too large")


@dataclass
class SnapshotTable:
    """qcow2_check_read_snapshot_table's state: what was read, what to fix."""

    offset: int = 0
    size: int = 0
    snapshots: list = field(default_factory=list)
    # Corruptions that rewriting the table fixes (qcow2_check_fix_snapshot_table).
    corruptions: int = 0
    rewrite: bool = False

    @classmethod
    def check_read(cls, image, res: CheckResult, fix: int) -> SnapshotTable:
        """qcow2_check_read_snapshot_table; raises CheckFailed where QEMU's fails."""
        storage = image.storage
        repair = bool(fix & FIX_ERRORS)
        nb, offset = L.HEADER_SNAPSHOTS.unpack(
            storage.pread(L.HEADER_OFF_NB_SNAPSHOTS, L.HEADER_SNAPSHOTS.size)
        )
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
        if (1 << 63) - 1 - nb * L.SNAPSHOT_HEADER.size < offset or offset % image.geo.cluster_size:
            res.check_errors += 1
            res.messages.append("qimg: ERROR snapshot table offset invalid")
            raise CheckFailed("Check failed: Invalid argument")
        nb, more = table._read_entries(_Reader(storage, res), nb, repair, res)
        reduced += more
        h = image.header
        h.nb_snapshots = nb
        if nb:
            h.snapshots_offset = offset
        if reduced:
            # The header must say what the refcount check will count.
            h.snapshots_offset = offset
            image.rewrite_header()
            res.corruptions_fixed += reduced
        if h.version >= 3:
            table._check_incomplete(res, repair)
        return table

    def _read_entries(
        self, reader: _Reader, nb: int, repair: bool, res: CheckResult
    ) -> tuple[int, int]:
        """Read the entries; returns (how many are kept, how many overhang)."""
        pos, length, dropped = self.offset, 0, 0
        reduced = 0
        for i in range(nb):
            pre = pos
            length = (length + 7) & ~7
            pos = (pos + 7) & ~7
            start = pos
            sn, extra_len, pos = parse_entry(reader.pread, pos, L.SNAPSHOT_EXTRA_DATA_SIZE_MAX)
            if extra_len > L.SNAPSHOT_EXTRA_DATA_SIZE_MAX:
                if not repair:
                    reader.fail(
                        f"Too much extra metadata in snapshot table entry {i}",
                        "You can force-remove this extra metadata with qemu-img check -r all",
                    )
                res.messages.append(
                    f"Discarding too much extra metadata in snapshot table entry {i} "
                    f"({extra_len} > {L.SNAPSHOT_EXTRA_DATA_SIZE_MAX})"
                )
                dropped += 1
            length += pos - start - extra_len + len(sn.extra_data)
            if length > L.QCOW_MAX_SNAPSHOTS_SIZE or pos - self.offset > (1 << 31) - 1:
                if not repair:
                    reader.fail("Snapshot table is too big", _SNAPSHOT_LIMIT_HINT.format(n=nb - i))
                res.messages.append(
                    f"Discarding {nb - i} overhanging snapshots (snapshot table is too big)"
                )
                reduced = nb - i
                nb = i
                pos = pre
                break
            self.snapshots.append(sn)
        self.size = pos - self.offset if nb else 0
        res.corruptions += dropped
        self.corruptions += dropped
        return nb, reduced

    def _check_incomplete(self, res: CheckResult, repair: bool) -> None:
        """v3 entries must hold the 16 bytes of extra data the spec requires."""
        word = "Repairing" if repair else "ERROR"
        for i, sn in enumerate(self.snapshots):
            if len(sn.extra_data) < 16:
                res.corruptions += 1
                self.corruptions += 1
                res.messages.append(f"{word} snapshot table entry {i} is incomplete")

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
        """The table as repaired, through snapshot.py's writer (QEMU's
        qcow2_write_snapshots: new table first, header, old table freed
        last)."""
        # The old table is no longer metadata to protect: it is in memory,
        # and its clusters in the file keep their refcounts until freed, so
        # no allocation can take them. What a damaged header claims past the
        # end of the file is not a table at all, and new clusters (refcount
        # blocks included) may be placed there.
        image.header.nb_snapshots = 0
        written = write_snapshot_table(image, self.snapshots, old=(self.offset, self.size))
        image.flush()  # the next pass reads the refcounts from the file
        if not written.old_freed:
            messages.append("qcow2_free_clusters failed: Invalid argument")
        self.offset, self.size = written.offset, written.size


# --- snapshots whose L1 table cannot be used ---------------------------------------


def unusable_snapshot(ctx: CheckContext, sn: Snapshot) -> str | None:
    """Why the snapshot's L1 table cannot be used at all (None: it can)."""
    if ctx.has_data_file:
        return "in image with data file"
    if sn.l1_table_offset % ctx.cs:
        return f"l1_offset={sn.l1_table_offset:#x}: L1 table is not cluster aligned"
    if sn.l1_size > L.QCOW_MAX_L1_SIZE // 8:
        return f"l1_size={sn.l1_size:#x}: L1 table is too large"
    if sn.l1_table_offset + sn.l1_size * 8 - ctx.file_len >= ctx.cs:
        return f"l1_size={sn.l1_size:#x}: L1 table lies past the end of the file"
    return None


def discard_unusable(
    ctx: CheckContext, table: SnapshotTable, count: Callable[[list], object | None]
) -> set[int]:
    """Under -r all, snapshots whose L1 table cannot be used are discarded
    (qimg's addition: QEMU reports them and keeps them), so that their
    clusters are freed by this very pass. Returns the active L2 tables
    whose L1 entries must be dropped (see misplaced_l1_tables)."""
    why = {id(sn): unusable_snapshot(ctx, sn) for sn in table.snapshots}
    kept = [sn for sn in table.snapshots if why[id(sn)] is None]
    misplaced, misplaced_active = misplaced_l1_tables(ctx, kept, count)
    for sn in misplaced:
        why[id(sn)] = (
            f"l1_offset={sn.l1_table_offset:#x}: damaged L1 table shares clusters with other data"
        )
    for sn in table.snapshots:
        if why[id(sn)] is not None:
            ctx.say(f"Repairing snapshot {sn.id_str} ({sn.name}) {why[id(sn)]}; snapshot discarded")
            ctx.res.corruptions_fixed += 1
            table.rewrite = True
    table.snapshots = [sn for sn in table.snapshots if why[id(sn)] is None]
    return misplaced_active


def misplaced_l1_tables(
    ctx: CheckContext, kept: list, count: Callable[[list], object | None]
) -> tuple[list, set]:
    """(snapshots of `kept`, active L2 table offsets) whose tables need
    repair where those tables share a cluster with anything else the image
    references: the entry points at the wrong place (often at data in use),
    and repairing "its" L1 or L2 tables would overwrite what lies there.
    Found by a counting pass that writes nothing (`count(kept)`: its Tally,
    None if it fails), run only when some table needs repair.

    An L1 table is referenced by itself only; an L2 table once per L1
    entry naming it. More references mean the clusters are shared.
    """
    entries = EntryRepair(ctx, None, set())
    mask = _U64(L.L1E_OFFSET_MASK)
    l1 = ctx.image.clusters.l1
    active = l1 & mask
    usable = l1[l1 != 0]
    usable = usable[~entries.unusable_l1_entries(usable)] & mask
    active_repaired = [t for t in np.unique(usable).tolist() if entries.l2_table_is_garbage(t)]
    named = [active[active != 0]]
    damaged = []
    for sn in kept:
        if not sn.l1_size:
            continue
        l1s = ctx.read_l1(sn.l1_table_offset, sn.l1_size)
        l1s = l1s[l1s != 0]
        bad = entries.unusable_l1_entries(l1s)
        l2s = l1s[~bad] & mask
        named.append(l2s)
        repaired = [t for t in np.setdiff1d(l2s, active).tolist() if entries.l2_table_is_garbage(t)]
        if bad.any() or repaired:
            damaged.append((sn, repaired))
    if not damaged and not active_repaired:
        return [], set()
    probe = count(kept)
    if probe is None:
        return [], set()
    tables, naming = np.unique(np.concatenate(named), return_counts=True)
    times = dict(zip(tables.tolist(), naming.tolist()))
    out = []
    for sn, repaired in damaged:
        first = sn.l1_table_offset >> ctx.cb
        last = (sn.l1_table_offset + sn.l1_size * 8 - 1) >> ctx.cb
        shared = int(probe.counts[first : last + 1].max(initial=0)) > 1
        shared |= any(probe.count_of(t >> ctx.cb) > times[t] for t in repaired)
        if shared:
            out.append(sn)
    shared_active = {t for t in active_repaired if probe.count_of(t >> ctx.cb) > times[t]}
    return out, shared_active
