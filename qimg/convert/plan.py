"""What one conversion copies, and in what units.

The plan walks the sources' extents window by window and gives
[start, end, kind] runs: DATA to read (rounded out to what the target
allocates at once), ZERO, and SKIP (left to the target's backing file).
Its units:
- grain: what the target allocates at once; data runs are read and written
  in whole grains (a partial cluster would be copied on write anyway);
- block: the zero-detection granularity, qemu-img's alignment: -S rounded
  down to a power of two, at least a grain. Like qemu-img, a data run is
  rounded out to grains but never to blocks beyond what the source holds,
  and a zero gap after data shorter than -S (min_zero) is written as data
  (qemu-img's is_allocated_sectors_min).
"""

from __future__ import annotations

from collections.abc import Iterator

from qimg.convert import sharing
from qimg.convert.options import ConvertOptions
from qimg.convert.scan import DATA, ZERO, allocation_runs, merge_runs
from qimg.convert.source import Concat, block_status
from qimg.driver import Driver

PLAN_WINDOW = 1 << 30  # guest bytes whose extents are asked for at once
MAX_PLAN_WINDOW = 1 << 50  # the same, across stretches without data (Plan.runs)


class Plan:
    """The runs to copy from `src` into `tgt` and the units they come in."""

    def __init__(
        self,
        src: Concat,
        tgt: Driver,
        o: ConvertOptions,
        backing: Driver | None = None,
        skip_same_backing: bool = False,
    ):
        self.src = src
        self.total = src.size
        self.salvage = o.salvage
        self.compress = o.compress
        self.sparse = o.sparse_size > 0
        # -C copies data as it is (qemu-img's copy_range): zero blocks in
        # data are written, only holes are skipped.
        self.detect_zeros = self.sparse and not o.copy_range
        # -B: only what differs from the target's backing file (opened as
        # `backing`) is written; with `skip_same_backing` the source's own
        # backing file is that file, and what it leaves there is SKIP.
        self.backing = backing
        self.skip_same_backing = skip_same_backing
        # A fresh target without a backing file already reads zeros.
        fresh = not o.skip_create and tgt.has_zero_init
        self.zero_init = (fresh or o.target_is_zero) and backing is None
        self.cluster_size, self.grain = target_units(tgt, o)
        s = o.sparse_size or 512
        self.min_zero = s
        self.block = max(self.grain, 1 << (s.bit_length() - 1))
        if self.compress:
            self.block = self.cluster_size
        # Data runs share the source's extents where the storages can
        # (sharing.py), except with -c (the target holds compressed
        # clusters) and --salvage (what is written may not be what the
        # source's storage holds); the writer clears it once the target's
        # storage refuses. (An encrypted target's driver never shares.)
        self.share = not o.compress and not o.salvage
        self.share_confirmed = False  # set by the writer once a run was shared
        # Expected to share from the first run (files on one file system
        # of a kind that shares): data is then scanned where it lies.
        self.share_expected = self.share and sharing.expected(src, tgt)

    def runs(self) -> Iterator[list[int]]:
        """[start, end, kind] runs covering the source, window by window.

        A window that holds no data makes the next one twice as large (up
        to MAX_PLAN_WINDOW), so a sparse image of petabytes takes a few
        dozen calls, not one per GiB; data is planned in PLAN_WINDOW
        windows, which bounds the runs held at once."""
        lo, window = 0, PLAN_WINDOW
        while lo < self.total:
            hi = min(self.total, lo + window)
            if not self.sparse and self.backing is None:
                yield [lo, hi, DATA]
                lo = hi
                continue
            runs = self._extent_runs(lo, hi)
            first_data = next((r[0] for r in runs if r[2] == DATA), None)
            if first_data is not None and window > PLAN_WINDOW:
                # Only the data-free head of a large window is kept; the
                # data is planned again in small windows.
                cut = max(lo, first_data // PLAN_WINDOW * PLAN_WINDOW)
                yield from clip_runs(runs, lo, cut)
                lo, window = cut, PLAN_WINDOW
                continue
            yield from align_data(runs, self.grain, lo, hi)
            lo = hi
            window = PLAN_WINDOW if first_data is not None else min(2 * window, MAX_PLAN_WINDOW)

    def _extent_runs(self, lo: int, hi: int) -> list[list[int]]:
        if self.skip_same_backing:
            runs = merge_runs(self.src.top_extents(lo, hi - lo))
        else:
            runs = allocation_runs(block_status(self.src, lo, hi - lo, self.salvage))
        if not self.sparse:
            runs = [[s, e, DATA if k == ZERO else k] for s, e, k in runs]
        return runs

    def zero_items(self, s: int, e: int) -> Iterator[tuple[int, int, None | bool]]:
        """What a ZERO run [s, e) asks of the target: (offset, length, None)
        to be written as zeros, (offset, length, False) to be left alone.
        Zeros hide backing data only where the backing file has some."""
        if self.backing is None:
            yield s, e - s, None
            return
        bsize = self.backing.size
        pos = s
        if s < bsize:
            for bs, bn, is_data, _z in self.backing.allocated_extents(s, min(e, bsize) - s):
                yield bs, bn, None if is_data else False
            pos = min(e, bsize)
        if pos < e:
            yield pos, e - pos, False


def target_units(tgt: Driver, o: ConvertOptions) -> tuple[int, int]:
    """(cluster size, grain) of the target: 512 for raw."""
    cs = tgt.cluster_bytes
    if o.compress:
        return cs, cs
    if o.skip_create or o.create_options.get("preallocation", "off") != "off":
        # Clusters may exist already (-n) or do (preallocation): written
        # in place, at qemu-img's alignment (the target's request
        # alignment), so what lies past -S's data in a cluster is kept.
        return cs, 512
    return cs, tgt.grain_bytes


def clip_runs(runs: list[list[int]], lo: int, hi: int) -> list[list[int]]:
    """The parts of [start, end, kind] runs inside [lo, hi)."""
    return [[max(s, lo), min(e, hi), k] for s, e, k in runs if s < hi and e > lo]


def align_data(runs: list[list[int]], align: int, lo: int, hi: int) -> list[list[int]]:
    """Grow DATA runs outwards to `align` (clipped to [lo, hi)); what they
    swallow is read too (it reads as what the source holds there)."""
    if align <= 1:
        return runs
    out: list[list[int]] = []
    for s, e, kind in runs:
        if kind == DATA:
            s = max(lo, s // align * align)
            e = min(hi, -(-e // align) * align)
        if out and s < out[-1][1]:
            s = _overlap(out, s, e, kind)
            if s is None:
                continue
        if out and out[-1][2] == kind and out[-1][1] == s:
            out[-1][1] = e
        else:
            out.append([s, e, kind])
    return out


def _overlap(out: list[list[int]], s: int, e: int, kind: int) -> int | None:
    """A run [s, e) that starts inside the last run of `out`: where it
    starts once they no longer overlap, or None when nothing is left of it.
    A data run takes over the tail of a zero run; a run after a data run
    loses its head to it."""
    prev = out[-1]
    if kind != DATA:
        return prev[1] if prev[1] < e else None
    if prev[2] == DATA:
        prev[1] = max(prev[1], e)
        return None
    prev[1] = s
    if prev[1] <= prev[0]:
        out.pop()
    return s
