"""QEMU's qcow2_check_bitmaps_refcounts: the bitmap directory, tables and
data clusters are counted. The open checked the directory and the tables
of consistent bitmaps; an in-use bitmap's table is read first here, and
one QEMU cannot read fails the check."""

from __future__ import annotations

import numpy as np

from qimg.formats.qcow2 import bitmap as B
from qimg.formats.qcow2.check.context import CheckContext
from qimg.formats.qcow2.check.result import FIX_ERRORS, CheckFailed
from qimg.formats.qcow2.check.tally import Tally


def count_bitmaps(ctx: CheckContext, tally: Tally, fix: int) -> None:
    bitmaps = B.read_bitmap_directory(ctx.image)
    if not bitmaps:
        return
    _nb, dir_size, dir_offset = ctx.image.header.bitmaps_ext
    tally.inc_range(dir_offset, dir_size)
    for bm in bitmaps:
        tally.inc_range(bm.table_offset, bm.table_size * 8)
        table = B.read_bitmap_table(ctx.image, bm)
        if B.invalid_table_entries(table, ctx.cs).any():
            ctx.res.corruptions += 1
            raise CheckFailed("Check failed: Invalid argument", ctx.res)
        offs = B.table_data_offsets(table)
        past = (offs != 0) & ((offs.astype(np.int64) - ctx.file_len) >= 0)
        if (fix & FIX_ERRORS) and past.any():
            offs = B.table_data_offsets(_repair_table(ctx, bm, table, past))
        tally.inc_clusters(offs[offs != 0], ctx.cs)


def _repair_table(ctx: CheckContext, bm, table: np.ndarray, lost: np.ndarray) -> np.ndarray:
    """qimg's addition: a bitmap cluster that cannot be read becomes 'all
    ones' (every granule dirty: safe for incremental backups)."""
    for i in np.flatnonzero(lost).tolist():
        ctx.say(
            f"Repairing bitmap '{bm.name}' table entry {i} ({int(table[i]):#x}): "
            "cluster lost; marked all dirty"
        )
        ctx.res.corruptions_fixed += 1
    return B.mark_all_ones(ctx.image, bm, table, lost)
