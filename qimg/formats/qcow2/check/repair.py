"""Repairs of L1 and L2 entries under -r all.

QEMU's fix_l2_entry_by_zero (unaligned preallocated clusters), and qimg's
additions where QEMU 7.2's repair leaves an image broken: an L2 entry that
is unaligned, has reserved bits or points past the end of the file, an L1
entry pointing at refcount metadata or past the end, an extended L2
subcluster bitmap QEMU cannot read. Such an entry is made unallocated
(zero in v3 images) and the lost cluster reported, so that the repaired
image checks clean. No table is written where it would land on other
metadata (the image's overlap map).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qimg.formats.qcow2 import entries as E
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.check.context import CheckContext
from qimg.formats.qcow2.check.messages import L2_FLAGS, L2_LAYOUT, L2_RESERVED
from qimg.formats.qcow2.check.result import FIX_ERRORS, CheckFailed

_U64 = np.uint64


class EntryRepair:
    """`note(t, i, check, line, once)`: a message about entry i of table t
    of the walk's batch; `misplaced_active`: active L2 tables whose L1
    entries are dropped (they share clusters with other data)."""

    def __init__(self, ctx: CheckContext, note: Callable | None, misplaced_active: set[int]):
        self.ctx = ctx
        self.note = note
        self.misplaced_active = misplaced_active

    # --- which entries cannot be used ---------------------------------------------

    def unusable_l1_entries(self, entries: np.ndarray) -> np.ndarray:
        """Mask of the (non-zero) L1 entries whose L2 table cannot be used:
        reserved bits, unaligned, past EOF, or refcount metadata that is no
        L2 table."""
        ctx = self.ctx
        offs = entries & _U64(L.L1E_OFFSET_MASK)
        bad = (entries & _U64(L.L1E_RESERVED_MASK)) != 0
        bad |= (offs & _U64(ctx.cs - 1)) != 0
        bad |= (offs.astype(np.int64) + ctx.cs - ctx.file_len) >= ctx.cs
        if not len(entries):
            return bad
        meta = self.refcount_metadata_clusters()
        on_meta = np.isin(offs >> _U64(ctx.cb), meta) & ~bad
        for j in np.flatnonzero(on_meta).tolist():
            bad[j] = self.l2_table_is_garbage(int(offs[j]))
        return bad

    def refcount_metadata_clusters(self) -> np.ndarray:
        """Cluster indices of the header, refcount table and blocks, active L1."""
        img, cb = self.ctx.image, self.ctx.cb
        parts = [np.array([0], dtype=np.uint64)]
        t0 = img.refcounts.table_offset >> cb
        parts.append(np.arange(t0, t0 + img.refcounts.table_clusters, dtype=np.uint64))
        rb = img.refcounts.table & _U64(L.REFT_OFFSET_MASK)
        parts.append(rb[rb != 0] >> _U64(cb))
        if img.clusters.l1_size:
            a = img.clusters.l1_offset >> cb
            b = (img.clusters.l1_offset + img.clusters.l1_size * 8 - 1) >> cb
            parts.append(np.arange(a, b + 1, dtype=np.uint64))
        return np.concatenate(parts)

    def l2_table_is_garbage(self, offset: int) -> bool:
        raw = self.ctx.image.storage.pread(offset, self.ctx.cs)
        table = E.decode_l2(raw, self.ctx.geo.extended_l2)
        return bool(self.lost_entries(E.descriptors(table)).any())

    def lost_entries(self, e: np.ndarray) -> np.ndarray:
        """Mask of the descriptors (any shape) qimg's repair makes
        unallocated: reserved bits, unaligned data clusters, data past the
        end of file (with a data file: compressed clusters, which cannot
        exist there; its data clusters are not bounded by this file)."""
        ctx = self.ctx
        types = E.cluster_types(e, ctx.geo.extended_l2, ctx.has_data_file)
        compressed = types == E.CLUSTER_COMPRESSED
        off = E.host_offsets(e)
        std = E.has_host_cluster(types)
        lost = ~compressed & ((e & _U64(L.L2E_STD_RESERVED_MASK)) != 0)
        lost |= std & ((off & _U64(ctx.cs - 1)) != 0)
        if ctx.has_data_file:
            return lost | compressed
        lost |= std & ((off.astype(np.int64) + ctx.cs - ctx.file_len) >= ctx.cs)
        coff = E.compressed_spans(e[compressed], ctx.geo)[0]
        lost[compressed] |= (coff + 512 - ctx.file_len) >= ctx.cs
        return lost

    # --- L1 entries ---------------------------------------------------------------------

    def l1_table(self, l1: np.ndarray, walk) -> np.ndarray:
        """qimg's addition: clear L1 entries whose L2 table cannot be used
        (reserved bits, unaligned, past EOF, or metadata that is no L2
        table) or, in the active table, is shared with other data."""
        ctx = self.ctx
        nz = np.flatnonzero(l1)
        entries = l1[nz]
        bad = self.unusable_l1_entries(entries)
        shared = np.zeros(len(entries), dtype=bool)
        if walk.active and self.misplaced_active:
            offs = entries & _U64(L.L1E_OFFSET_MASK)
            shared = np.isin(offs, list(self.misplaced_active)) & ~bad
        if not (bad.any() or shared.any()):
            return l1
        l1 = l1.copy()
        kind = "l1" if walk.active else "inactive-l1"
        for j in np.flatnonzero(bad | shared).tolist():
            index = int(nz[j])
            why = "shares clusters with other data" if shared[j] else "unusable"
            ctx.messages.say_at(
                (walk.w, index, 0),
                f"Repairing L1 entry {index} (l1_entry={int(entries[j]):x}): "
                f"L2 table {why}; made unallocated",
            )
            l1[index] = 0
            ctx.image.write_metadata(walk.offset + index * 8, b"\0" * 8, kind)
            if walk.active:
                ctx.image.clusters.l1[index] = 0
            ctx.res.corruptions_fixed += 1
        ctx.image.flush_file()
        return l1

    # --- L2 entries ---------------------------------------------------------------------

    def _write_entry(self, l2_offset: int, i: int, data: bytes, within: int = 0) -> None:
        esize = self.ctx.geo.l2_entry_size
        self.ctx.image.write_metadata(l2_offset + i * esize + within, data, "l2")

    def l2_batch(self, offsets: list[int], e: np.ndarray, bitmap) -> None:
        """Entries whose cluster is lost (see lost_entries) become zero (v3)
        or unallocated (v2), where the table may be written."""
        ctx, res = self.ctx, self.ctx.res
        if bitmap is not None:
            self.subcluster_bitmaps(offsets, e, bitmap)
        lost = self.lost_entries(e)
        if not lost.any():
            return
        zero = _U64(L.QCOW_OFLAG_ZERO if ctx.v3 and not ctx.geo.extended_l2 else 0)
        for t in np.flatnonzero(lost.any(axis=1)).tolist():
            l2_offset = offsets[t]
            if ctx.l2_write_overlaps(l2_offset):
                continue
            for i in np.flatnonzero(lost[t]).tolist():
                old = int(e[t, i])
                self.note(
                    t,
                    i,
                    L2_RESERVED,
                    f"Repairing offset={old & L.L2E_OFFSET_MASK:x}: cluster lost "
                    f"(l2_entry={old:x}, L2 offset {l2_offset:#x}, index {i}); "
                    "made unallocated",
                    True,
                )
                e[t, i] = zero
                data = int(zero).to_bytes(8, "big")
                if bitmap is not None:
                    b = int(bitmap[t, i])
                    b = (b | (b << 32)) & L.QCOW_L2_BITMAP_ALL_ZEROES if ctx.v3 else 0
                    bitmap[t, i] = b
                    data += b.to_bytes(8, "big")
                self._write_entry(l2_offset, i, data)
                res.corruptions_fixed += 1
        ctx.image.clusters.l2_cache.invalidate()
        ctx.image.flush_file()

    def subcluster_bitmaps(self, offsets: list[int], e: np.ndarray, bitmap: np.ndarray) -> None:
        """qimg's addition (QEMU only reports these): subcluster bitmaps
        that QEMU cannot read are made valid, keeping what can be kept.
        An allocated subcluster also marked zero stays allocated (its data
        was written); an unallocated cluster loses its allocation bits; a
        compressed cluster's bitmap becomes 0 (the spec's only value)."""
        ctx = self.ctx
        types = E.cluster_types(e, True, ctx.has_data_file)
        compressed = types == E.CLUSTER_COMPRESSED
        alloc = bitmap & _U64(L.QCOW_L2_BITMAP_ALL_ALLOC)
        normal = ~compressed & (E.host_offsets(e) != 0)
        both = normal & (((bitmap >> _U64(32)) & bitmap) != 0)
        stray = ~compressed & ~normal & (alloc != 0)
        cbad = compressed & (bitmap != 0)
        if not (both.any() or stray.any() or cbad.any()):
            return
        fixed = bitmap.copy()
        fixed[both] &= ~(alloc[both] << _U64(32))
        fixed[stray] &= ~_U64(L.QCOW_L2_BITMAP_ALL_ALLOC)
        fixed[cbad] = 0
        for t, i in zip(*(a.tolist() for a in np.nonzero(both | stray | cbad))):
            l2_offset = offsets[t]
            if ctx.l2_write_overlaps(l2_offset):
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
            self.note(t, i, L2_FLAGS, line, True)
            bitmap[t, i] = fixed[t, i]
            self._write_entry(l2_offset, i, int(fixed[t, i]).to_bytes(8, "big"), within=8)
            ctx.res.corruptions_fixed += 1
        ctx.image.clusters.l2_cache.invalidate()
        ctx.image.flush_file()

    def prealloc(self, offsets, e, bitmap, prealloc, weights, fix: int) -> np.ndarray:
        """Unaligned preallocated clusters: reported, or under -r all
        fix_l2_entry_by_zero. Returns the mask of the repaired entries."""
        ctx, res = self.ctx, self.ctx.res
        skip = np.zeros_like(prealloc)
        off = E.host_offsets(e)
        for t, i in zip(*(a.tolist() for a in np.nonzero(prealloc))):
            v = int(off[t, i])
            what = (
                f"offset={v:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
            )
            res.corruptions += 1
            if not fix & FIX_ERRORS:
                self.note(t, i, L2_LAYOUT, f"ERROR {what}")
                res.corruptions += int(weights[t]) - 1
                continue
            self.note(t, i, L2_LAYOUT, f"Repairing {what}", True)
            l2_offset = offsets[t]
            if ctx.l2_write_overlaps(l2_offset):
                self.note(t, i, L2_LAYOUT, "ERROR: Overlap check failed", True)
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
            self._write_entry(l2_offset, i, data)
            ctx.image.flush_file()
            res.corruptions -= 1
            res.corruptions_fixed += 1
            skip[t, i] = True
        ctx.image.clusters.l2_cache.invalidate()
        return skip
