"""The in-memory refcounts: every reference the image makes, counted.

QEMU's qcow2_inc_refcounts_imrt over arrays of byte ranges at once. Counts
are kept in the image's refcount width (uint8 for widths below 8); a count
above the dtype's maximum is kept exactly, aside, in `big`. A reference
reaching a cluster or more past the end of the file is a corruption,
reported where it is made.

Overflow (a count above refcount_max) is rare; QEMU reports it at each
reference made after the count reached the maximum. References of the
L1/L2 walk are counted whole tables at a time, so overflows found there
are placed afterwards (`trace`: a second walk records the references to
the overflowing clusters); references after the walk (`checked`) are
checked one by one.
"""

from __future__ import annotations

import numpy as np

from qimg.formats.qcow2.check.messages import Messages
from qimg.formats.qcow2.check.result import CheckResult
from qimg.formats.qcow2.refcount import REFCOUNT_DTYPES

_U64 = np.uint64

OVERFLOW_HINT = (
    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to "
    "create a clean copy if the image cannot be opened for writing"
)


def past_end_line(offset: int, size: int) -> str:
    return (
        "ERROR: counting reference for region exceeding the end of the file by "
        f"one cluster or more: offset {offset:#x} size {size:#x}"
    )


class Tally:
    """Computed refcounts of clusters [0, nb_clusters] (one cluster of
    slack: a reference may run up to a cluster past the end of file).

    Invariant: counts[c] == cap exactly where c is in `big`, which holds
    the true count (>= cap); `bound` >= counts.max().
    """

    def __init__(self, geo, file_len: int, res: CheckResult, messages: Messages):
        self.cs = geo.cluster_size
        self.cb = geo.cluster_bits
        self.rmax = geo.refcount_max
        self.file_len = file_len
        self.nb_clusters = -(-file_len // self.cs)
        self.res = res
        self.messages = messages
        dtype = REFCOUNT_DTYPES[geo.refcount_order]
        self.counts = np.zeros(self.nb_clusters + 1, dtype=dtype)
        self.cap = int(np.iinfo(dtype).max)
        self.big: dict[int, int] = {}
        self.bound = 0
        # Set after the walk: each reference checks for overflow.
        self.checked = False
        # Sorted clusters whose references are recorded in `traced` as
        # (key, cluster); None: no tracing.
        self.trace: np.ndarray | None = None
        self.traced: list[tuple[tuple, int]] = []

    def past_end(self, ends: np.ndarray) -> np.ndarray:
        """Mask of ranges ending a cluster or more past the end of file."""
        return (ends.astype(np.int64) - self.file_len) >= self.cs

    # --- references ------------------------------------------------------------

    def inc_range(self, offset: int, size: int, key: tuple | None = None) -> None:
        """qcow2_inc_refcounts_imrt for one byte range (`key`: see messages)."""
        if size <= 0:
            return
        if offset + size - self.file_len >= self.cs:
            self.messages.say_at(key, past_end_line(offset, size))
            self.res.corruptions += 1
            return
        first, last = offset >> self.cb, (offset + size - 1) >> self.cb
        if self.trace is not None and key is not None:
            self.trace_ref(first, last, key)
        if self.checked and int(self.counts[first : last + 1].max()) >= self.rmax:
            self._inc_checked(first, last)
            return
        self.bump_range(first, last - first + 1, 1)

    def inc_clusters(self, offsets: np.ndarray, sizes, weight: int = 1, keys=None) -> None:
        """qcow2_inc_refcounts_imrt for many ranges at once (uint64 offsets);
        `keys`, one per range, place the messages of a walk."""
        if not len(offsets) or weight <= 0:
            return
        ends = offsets + _U64(sizes) if np.isscalar(sizes) else offsets + sizes
        past = self.past_end(ends)
        if self.checked and self._may_overflow(offsets, ends, past, weight):
            self._inc_each(offsets, ends, past, weight)
            return
        if self.trace is not None and keys is not None:
            first, last = self._cluster_spans(offsets, ends)
            for j in self.trace_hits(first, last, ~past):
                self.trace_ref(int(first[j]), int(last[j]), keys[j])
        if past.any():
            self._report_past_end(offsets, sizes, past, weight, keys)
            keep = ~past
            offsets, ends = offsets[keep], ends[keep]
        first, last = self._cluster_spans(offsets, ends)
        self.add(first, weight)
        two = last != first
        if two.any():
            self.add(last[two], weight)
            more = last - first > 1
            if more.any():  # compressed data longer than a cluster: rare
                for a, b in zip(first[more].tolist(), last[more].tolist()):
                    self.bump_range(a + 1, b - a - 1, weight)

    def inc_weighted(self, offsets: np.ndarray, sizes, weights: np.ndarray) -> None:
        """inc_clusters with a weight per range."""
        if not len(offsets):
            return
        if np.all(weights == weights[0]):
            self.inc_clusters(offsets, sizes, int(weights[0]))
            return
        sz = np.broadcast_to(np.asarray(sizes, dtype=np.uint64), offsets.shape)
        for w in np.unique(weights).tolist():
            sel = weights == w
            self.inc_clusters(offsets[sel], sz[sel], w)

    def _cluster_spans(self, offsets, ends) -> tuple[np.ndarray, np.ndarray]:
        first = (offsets >> _U64(self.cb)).astype(np.int64)
        last = ((ends - _U64(1)) >> _U64(self.cb)).astype(np.int64)
        return first, last

    def _report_past_end(self, offsets, sizes, past, weight: int, keys) -> None:
        sz = np.broadcast_to(np.asarray(sizes, dtype=np.uint64), offsets.shape)
        for j in np.flatnonzero(past).tolist():
            line = past_end_line(int(offsets[j]), int(sz[j]))
            for _ in range(weight):
                self.messages.say_at(None if keys is None else keys[j], line)
        self.res.corruptions += int(past.sum()) * weight

    # --- counting ----------------------------------------------------------------

    def add(self, idx: np.ndarray, weight: int) -> None:
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
                self.bump_at(idx[starts], times * weight)
                return
        self.bump_at(idx, weight)

    def bump_at(self, idx, add) -> None:
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

    def bump_runs(self, runs: list[tuple[int, int]], add: int) -> None:
        """counts[lo:hi] += add for disjoint runs [lo, hi) (so that the
        bound grows by `add` only)."""
        if self.bound + add >= self.cap:
            self.bound = int(self.counts.max())
        if self.bound + add >= self.cap:
            for lo, hi in runs:
                self.bump_at(slice(lo, hi), add)
            return
        value = self.counts.dtype.type(add)
        for lo, hi in runs:
            self.counts[lo:hi] += value
        self.bound += add

    def bump_range(self, first: int, n: int, add: int) -> None:
        """counts[first:first+n] += add."""
        if n > 0:
            self.bump_at(slice(first, first + n), add)

    def count_of(self, c: int) -> int:
        """The exact count of cluster c (before finish)."""
        v = int(self.counts[c])
        return self.big[c] if v == self.cap and c in self.big else v

    # --- overflow ------------------------------------------------------------------

    def say_overflow(self, key: tuple | None, c: int) -> None:
        for line in (f"ERROR: overflow cluster offset={c << self.cb:#x}", OVERFLOW_HINT):
            self.messages.say_at(key, line)

    def inc_refblock(self, cluster: int) -> None:
        """One reference to a refcount block's cluster (after the walk)."""
        if self.count_of(cluster) >= self.rmax:
            self.say_overflow(None, cluster)
            self.res.corruptions += 1
        else:
            self.bump_range(cluster, 1, 1)

    def _may_overflow(self, offsets, ends, past, weight: int) -> bool:
        keep = ~past
        first, last = self._cluster_spans(offsets[keep], ends[keep])
        if not len(first):
            return False
        top = int(np.maximum(self.counts[first], self.counts[last]).max())
        return top + weight * (2 * len(first)) > self.rmax

    def _inc_each(self, offsets, ends, past, weight: int) -> None:
        """inc_clusters reference by reference, as QEMU (after the walk)."""
        for j in range(len(offsets)):
            off, end = int(offsets[j]), int(ends[j])
            for _ in range(weight):
                if past[j]:
                    self.messages.say(past_end_line(off, end - off))
                    self.res.corruptions += 1
                else:
                    self._inc_checked(off >> self.cb, (end - 1) >> self.cb)

    def _inc_checked(self, first: int, last: int) -> None:
        """One reference to clusters first..last, reporting overflow."""
        for c in range(first, last + 1):
            self.inc_refblock(c)

    def overflowing(self) -> np.ndarray:
        """Clusters whose count exceeds refcount_max."""
        if self.bound < min(self.rmax + 1, self.cap):  # bound >= counts.max()
            return np.zeros(0, dtype=np.int64)
        over = np.flatnonzero(self.counts >= min(self.rmax + 1, self.cap))
        return np.array([c for c in over.tolist() if self.count_of(c) > self.rmax], np.int64)

    def report_overflows(self, over: np.ndarray, refs: list[tuple[tuple, int]]) -> None:
        """Report the overflows of clusters `over` at their excess
        references `refs` (key, cluster; those not found are reported
        after the walk), then clamp their counts to refcount_max."""
        rmax = self.rmax
        excess = {c: self.count_of(c) - rmax for c in over.tolist()}
        seen = dict.fromkeys(excess, 0)
        if 0 in seen:
            seen[0] = 1  # the header, counted before the walk
        refs.sort(key=lambda r: r[0])
        for key, c in refs:
            seen[c] += 1
            if seen[c] > rmax and excess[c] > 0:
                self.say_overflow(key, c)
                excess[c] -= 1
        for c, n in excess.items():  # not found again: after the walk
            for _ in range(n):
                self.say_overflow((float("inf"),), c)
        self.res.corruptions += sum(self.count_of(c) - rmax for c in over.tolist())
        self.counts[over] = min(rmax, self.cap)
        for c in over.tolist():
            self.big.pop(c, None)

    def finish(self) -> np.ndarray:
        """Clamp to refcount_max. Overflows were reported at their
        references (report_overflows, `checked`); any left here are
        reported after everything else."""
        counts = self.counts
        rmax = self.rmax
        if self.bound < min(rmax + 1, self.cap):  # the usual case: nothing to clamp
            self.big = {}
            return counts
        over = np.flatnonzero(counts >= min(rmax + 1, self.cap))
        for c in over.tolist():
            n = self.count_of(c) - rmax
            for _ in range(n):
                self.say_overflow(None, c)
            self.res.corruptions += max(n, 0)
        if len(over) and rmax < self.cap:
            np.minimum(counts, counts.dtype.type(rmax), out=counts)
        self.big = {}
        self.bound = min(self.bound, rmax)
        return counts

    def in_use_limit(self) -> int:
        """QEMU's array covers the file, plus a partly referenced cluster past it."""
        limit = self.nb_clusters
        if len(self.counts) > limit and self.counts[limit]:
            limit += 1
        return limit

    # --- tracing (see the module docstring) -----------------------------------------

    def trace_hits(self, first: np.ndarray, last: np.ndarray, keep=None) -> list[int]:
        """Indices j whose range [first[j], last[j]] holds a traced cluster."""
        pos = np.searchsorted(self.trace, first)
        hit = pos < len(self.trace)
        hit[hit] = self.trace[pos[hit]] <= last[hit]
        if keep is not None:
            hit &= keep
        return np.flatnonzero(hit).tolist()

    def trace_ref(self, first: int, last: int, key: tuple) -> None:
        t = self.trace
        for c in t[(t >= first) & (t <= last)].tolist():
            self.traced.append(((*key, c), c))
