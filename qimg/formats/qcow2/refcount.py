"""Refcount table and blocks of any width, the cluster allocator, and free.

Spec: "Host cluster management". A refcount block holds
`cluster_size * 8 / refcount_bits` entries; widths below 8 bits are packed
least significant bits first within each byte, wider ones are big-endian.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from qimg.errors import CorruptImageError, QimgError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.cache import TableCache
from qimg.formats.qcow2.header import Geometry
from qimg.storage import MAX_REQUEST_END

_U64 = np.uint64
_WIDE_DTYPES = {3: ">u1", 4: ">u2", 5: ">u4", 6: ">u8"}
# Refcounts in memory, by refcount_order: the smallest native dtype that
# holds refcount_max (sub-byte widths widened to uint8).
REFCOUNT_DTYPES = {0: np.uint8, 1: np.uint8, 2: np.uint8, 3: np.uint8}
REFCOUNT_DTYPES.update({4: np.uint16, 5: np.uint32, 6: np.uint64})


def decode_refcount_block(buf: bytes, refcount_order: int) -> np.ndarray:
    """A refcount block's entries as a native uint64 array."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if refcount_order >= 3:
        return np.frombuffer(buf, dtype=_WIDE_DTYPES[refcount_order]).astype(np.uint64)
    width = 1 << refcount_order
    per_byte = 8 // width
    shifts = np.arange(per_byte, dtype=np.uint8) * width
    values = (raw[:, None] >> shifts) & ((1 << width) - 1)
    return values.reshape(-1).astype(np.uint64)


def encode_refcount_block(values: np.ndarray, refcount_order: int) -> bytes:
    """Inverse of decode_refcount_block."""
    if refcount_order >= 3:
        return values.astype(_WIDE_DTYPES[refcount_order]).tobytes()
    width = 1 << refcount_order
    per_byte = 8 // width
    shifts = np.arange(per_byte, dtype=np.uint64) * np.uint64(width)
    packed = (values.reshape(-1, per_byte) << shifts).sum(axis=1)
    return packed.astype(np.uint8).tobytes()


def expand_runs(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The indices of runs [starts[i], starts[i]+counts[i]), in order, as one array."""
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    # Each run's first output position, then a ramp restarting at each run.
    firsts = np.cumsum(counts) - counts
    return np.repeat(starts - firsts, counts) + np.arange(total, dtype=np.int64)


def read_tables(storage, offsets: np.ndarray, size: int, buf, skip_zero: bool) -> None:
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


def read_refcount_blocks(storage, offsets: np.ndarray, geo: Geometry) -> np.ndarray:
    """The refcounts of the blocks at `offsets` (0: no block, all zero), one
    block after another, in the image's native width (REFCOUNT_DTYPES)."""
    cs, order = geo.cluster_size, geo.refcount_order
    if order < 3:
        values = np.zeros(len(offsets) * geo.refcount_block_size, dtype=np.uint8)
        per = geo.refcount_block_size
        for bi in np.flatnonzero(offsets).tolist():
            raw = storage.pread(int(offsets[bi]), cs)
            values[bi * per : (bi + 1) * per] = decode_refcount_block(raw, order)
        return values
    # A numpy buffer, not a bytearray: large ones get huge pages.
    buf = np.zeros(len(offsets) * cs, dtype=np.uint8)  # zeros where there is no block
    read_tables(storage, offsets, cs, buf, skip_zero=True)
    values = buf.view(REFCOUNT_DTYPES[order])
    if order > 3:
        values.byteswap(inplace=True)
    return values


class BlockUnreadable(Exception):
    """Raised when: a refcount block cannot be read (QEMU's
    qcow2_get_refcount fails: unaligned, or refused by the block layer)."""

    def __init__(self, offset: int):
        self.offset = offset


class StoredRefcounts:
    """Refcounts as stored, read past a damaged refcount table (for the
    check): a block that cannot be read (`BlockUnreadable`) leaves its
    counts unknown, marked in `unreadable`, rather than failing the read.

    `full(n)` holds every refcount of clusters [0, n) in one native array,
    read in runs of adjacent refcount blocks; clusters past it go through
    `block()` (bounded cache).
    """

    def __init__(self, storage, geo: Geometry, table: np.ndarray, max_bytes: int = 32 << 20):
        self.storage = storage
        self.geo = geo
        self.table = table
        self.dtype = REFCOUNT_DTYPES[geo.refcount_order]
        self.cache: dict[int, np.ndarray] = {}
        self.limit = max(8, max_bytes // geo.cluster_size)
        self.values: np.ndarray | None = None
        self.unreadable: np.ndarray | None = None  # per block, where full() read
        self.any_unreadable = False

    def block_offset(self, index: int) -> int:
        if index >= len(self.table):
            return 0
        return int(self.table[index]) & L.REFT_OFFSET_MASK

    def _cannot_read(self, offsets: np.ndarray) -> np.ndarray:
        cs = self.geo.cluster_size
        return ((offsets & _U64(cs - 1)) != 0) | (offsets > _U64(MAX_REQUEST_END - cs))

    def block(self, index: int) -> np.ndarray | None:
        """Decoded refcount block `index`; None where there is none."""
        cached = self.cache.get(index)
        if cached is not None:
            return cached
        offset = self.block_offset(index)
        if not offset:
            return None
        if self._cannot_read(np.array([offset], dtype=np.uint64))[0]:
            raise BlockUnreadable(offset)
        raw = self.storage.pread(offset, self.geo.cluster_size)
        values = decode_refcount_block(raw, self.geo.refcount_order).astype(self.dtype)
        if len(self.cache) >= self.limit:
            self.cache.pop(next(iter(self.cache)))
        self.cache[index] = values
        return values

    def full(self, n: int) -> np.ndarray:
        """Refcounts of clusters [0, n) at least (whole blocks), native dtype."""
        if self.values is not None and len(self.values) >= n:
            return self.values
        nb = max(1, -(-n // self.geo.refcount_block_size))
        offs = np.zeros(nb, dtype=np.uint64)
        k = min(nb, len(self.table))
        offs[:k] = self.table[:k] & _U64(L.REFT_OFFSET_MASK)
        unreadable = self._cannot_read(offs)
        offs[unreadable] = 0
        self.values = read_refcount_blocks(self.storage, offs, self.geo)
        self.unreadable = unreadable
        self.any_unreadable = bool(unreadable.any())
        return self.values

    def lookup(self, clusters: np.ndarray, runs: list[tuple[int, int]] | None = None):
        """(refcounts, ok) of cluster indices; ok is False where the
        refcount cannot be read. `runs`, when given, are `clusters` as runs
        [lo, hi) of adjacent clusters."""
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
            sel = order[s:e]
            try:
                block = self.block(int(sorted_blocks[s]))
            except BlockUnreadable:
                ok[sel] = False
                continue
            if block is not None:
                out[sel] = block[(clusters[sel] & mask).astype(np.intp)]
        return out, ok

    def invalidate(self, table: np.ndarray) -> None:
        """Forget what was read: the refcounts (or `table`) changed."""
        self.cache.clear()
        self.values = None
        self.unreadable = None
        self.any_unreadable = False
        self.table = table


def _long_disjoint_runs(starts: np.ndarray, counts: np.ndarray) -> bool:
    """Whether the runs are sorted, disjoint, non-empty and 16 clusters
    long on average (slices then beat arrays of indexes)."""
    return bool(
        len(starts)
        and np.all(counts > 0)
        and np.all(starts[1:] >= starts[:-1] + counts[:-1])
        and int(counts.sum()) >= 16 * len(starts)
    )


class MetadataIO(Protocol):
    """What the refcount layer needs from the image that owns it."""

    def read_metadata(self, offset: int, length: int) -> bytes: ...

    def write_metadata(self, offset: int, data: bytes, kind: str) -> None: ...

    def flush_file(self) -> None: ...

    def set_refcount_table(self, offset: int, clusters: int) -> None: ...

    def commit_frees(self) -> None:
        """Make every dropped reference durable (flush L2, refcounts, file)."""
        ...


class Refcounts:
    """The refcount table (held in memory) and a cache of refcount blocks."""

    def __init__(self, io: MetadataIO, geo: Geometry, table_offset: int, table_clusters: int):
        self.io = io
        self.geo = geo
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        raw = io.read_metadata(table_offset, table_clusters * geo.cluster_size)
        self.table = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        self.generation = 0  # bumped whenever a table entry gets a new block
        self.blocks = TableCache(
            "refcount-block",
            geo.cluster_size,
            self._read_block,
            self._write_block,
            io.flush_file,
        )
        # Clusters below this index are known to be in use (QEMU's
        # free_cluster_index); the search for free clusters starts here.
        self.free_cluster_index = 0
        # Sub-cluster allocation for compressed data (QEMU's free_byte_offset).
        self.free_byte_offset = 0
        # [lo, hi) bounds every cluster whose refcount fell to 0 since the
        # last flush; see _reuses_pending_free.
        self.pending_free = (1 << 63, 0)

    # --- block I/O -----------------------------------------------------------

    def _read_block(self, offset: int) -> np.ndarray:
        raw = self.io.read_metadata(offset, self.geo.cluster_size)
        return decode_refcount_block(raw, self.geo.refcount_order)

    def _write_block(self, offset: int, values: np.ndarray) -> None:
        data = encode_refcount_block(values, self.geo.refcount_order)
        self.io.write_metadata(offset, data, "refcount-block")

    def _block_offset(self, block_index: int) -> int:
        if block_index >= len(self.table):
            return 0
        offset = int(self.table[block_index]) & L.REFT_OFFSET_MASK
        if offset and offset % self.geo.cluster_size:
            raise CorruptImageError(
                f"Refblock offset {offset:#x} in refcount table entry {block_index} is unaligned",
                offset,
            )
        return offset

    # --- queries -------------------------------------------------------------

    def get(self, cluster_index: int) -> int:
        """The refcount of host cluster `cluster_index` (0 where uncovered)."""
        bits = self.geo.refcount_block_bits
        block = self._block_offset(cluster_index >> bits)
        if not block:
            return 0
        return int(self.blocks.get(block)[cluster_index & ((1 << bits) - 1)])

    def get_range(self, start: int, count: int) -> np.ndarray:
        """Refcounts of clusters [start, start+count) as one array."""
        out = np.zeros(count, dtype=np.uint64)
        for pos, bi, first, n in self._spans(start, count):
            block = self._block_offset(bi)
            if block:
                out[pos - start : pos - start + n] = self.blocks.get(block)[first : first + n]
        return out

    def get_many(self, clusters: np.ndarray) -> np.ndarray:
        """The refcount of each cluster index in `clusters`, in their order
        (0 where no refcount block covers it); each block is read once."""
        clusters = np.asarray(clusters, dtype=np.int64)
        out = np.zeros(len(clusters), dtype=np.uint64)
        if not len(clusters):
            return out
        bits = self.geo.refcount_block_bits
        mask = (1 << bits) - 1
        block_index = clusters >> bits
        order = None
        if np.any(block_index[1:] < block_index[:-1]):
            order = np.argsort(block_index, kind="stable")
            block_index = block_index[order]
        cuts = np.flatnonzero(np.diff(block_index)) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(clusters)]):
            offset = self._block_offset(int(block_index[a]))
            if not offset:
                continue
            block = self.blocks.get(offset)
            if order is None:  # already in block order: slices, no gather of indexes
                out[a:b] = block[clusters[a:b] & mask]
            else:
                where = order[a:b]
                out[where] = block[clusters[where] & mask]
        return out

    def _spans(self, start: int, count: int):
        """(cluster, block index, index in block, length) for each refcount
        block's share of clusters [start, start+count)."""
        bits = self.geo.refcount_block_bits
        per_block = 1 << bits
        pos, end = start, start + count
        while pos < end:
            first = pos & (per_block - 1)
            n = min(per_block - first, end - pos)
            yield pos, pos >> bits, first, n
            pos += n

    def covered_clusters(self) -> int:
        """Clusters the refcount table can describe without growing."""
        return len(self.table) << self.geo.refcount_block_bits

    def last_used_cluster(self) -> int:
        """Index one past the highest cluster with a non-zero refcount."""
        bits = self.geo.refcount_block_bits
        nonzero = np.nonzero(self.table & np.uint64(L.REFT_OFFSET_MASK))[0]
        for bi in nonzero[::-1]:
            block = self.blocks.get(self._block_offset(int(bi)))
            used = np.nonzero(block)[0]
            if len(used):
                return (int(bi) << bits) + int(used[-1]) + 1
        return 0

    def all_counts(self) -> np.ndarray:
        """Every refcount at once: an array indexed by cluster, covering the
        clusters up to the end of the last refcount block that exists (every
        cluster past it has refcount 0), zeros under missing blocks."""
        present = np.flatnonzero(self.table & np.uint64(L.REFT_OFFSET_MASK))
        if not len(present):
            return np.zeros(0, dtype=np.uint64)
        return self.get_range(0, (int(present[-1]) + 1) << self.geo.refcount_block_bits)

    # --- updates -------------------------------------------------------------

    def update(self, start: int, count: int, delta: int) -> None:
        """Add `delta` to the refcounts of clusters [start, start+count).

        Every block covering the range must exist (allocation creates them).
        Ordering: a caller dropping references first makes the refcount cache
        depend on the L2 cache (see cache.py).
        """
        for pos, bi, first, n in self._spans(start, count):
            block_offset = self._block_offset(bi)
            if not block_offset:
                if delta < 0:
                    raise CorruptImageError(
                        f"Cannot free cluster {pos:#x}: it has no refcount block"
                    )
                block_offset = self._create_block(bi)
            block = self.blocks.get(block_offset)
            seg = block[first : first + n]
            if delta < 0:
                if np.any(seg < np.uint64(-delta)):
                    raise CorruptImageError(
                        "Cannot decrease refcount below zero "
                        f"(cluster {pos + int(np.argmax(seg < np.uint64(-delta)))})"
                    )
                seg -= np.uint64(-delta)
                zeros = np.flatnonzero(seg == 0)
                fbo_cluster = self.free_byte_offset >> self.geo.cluster_bits
                if self.free_byte_offset and pos <= fbo_cluster < pos + n:
                    if seg[fbo_cluster - pos] == 0:
                        # The cluster compressed data was being packed into
                        # is free now and may become anything: never pack
                        # into it again.
                        self.free_byte_offset = 0
                if len(zeros):
                    # The hint is lowered only once the free is durable
                    # (frees_committed): see _reuses_pending_free.
                    lo, hi = self.pending_free
                    self.pending_free = (
                        min(lo, pos + int(zeros[0])),
                        max(hi, pos + int(zeros[-1]) + 1),
                    )
            else:
                if np.any(seg > np.uint64(self.geo.refcount_max - delta)):
                    raise QimgError("Reference count overflow")
                seg += np.uint64(delta)
            self.blocks.mark_dirty(block_offset)

    def change_many(self, clusters: np.ndarray, delta: int) -> None:
        """Add `delta` to the refcount of each cluster index in `clusters`; an
        index given k times changes by k * delta.

        Each refcount block touched is visited once. Every count is checked
        before any changes: an overflow, or a count that would fall below
        zero or has no block, raises with nothing changed. Raising counts
        under a missing block creates the block first (as update does).
        Ordering: as for update; counts falling to 0 join pending_free.
        """
        clusters = np.asarray(clusters, dtype=np.int64)
        if delta == 0 or not len(clusters):
            return
        if np.all(clusters[1:] > clusters[:-1]):
            # Already sorted without repeats (an L2 table's worth of a
            # sequential allocation): no need to sort.
            index = clusters
            steps = np.broadcast_to(np.uint64(abs(delta)), len(index))
        else:
            index, repeats = np.unique(clusters, return_counts=True)
            steps = repeats.astype(np.uint64) * np.uint64(abs(delta))
        groups = self._block_groups(index, create=delta > 0)
        for block_offset, a, b in groups:
            self._check_change(block_offset, index[a:b], steps[a:b], delta)
        for block_offset, a, b in groups:
            block = self.blocks.get(block_offset)
            local = self._positions(index[a:b])
            if delta > 0:
                block[local] += steps[a:b]
            else:
                block[local] -= steps[a:b]
                self._note_freed(index[a:b][block[local] == 0])
            self.blocks.mark_dirty(block_offset)

    def change_runs(self, starts: np.ndarray, counts: np.ndarray, delta: int) -> None:
        """change_many over the clusters of runs [starts[i], starts[i]+counts[i]).

        Sorted, disjoint runs of some length are changed as slices of each
        refcount block (no array of cluster indexes); otherwise as
        change_many. Either way nothing changes if any count would overflow
        or fall below zero.
        """
        starts = np.asarray(starts, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        if delta == 0 or not len(starts):
            return
        if not _long_disjoint_runs(starts, counts):
            self.change_many(expand_runs(starts, counts), delta)
            return
        pieces = self._run_pieces(starts, counts, create=delta > 0)
        for block_offset, lo, hi, _pos in pieces:
            if not block_offset:
                raise CorruptImageError(f"Cannot free cluster {_pos:#x}: it has no refcount block")
            seg = self.blocks.get(block_offset)[lo:hi]
            if delta > 0 and np.any(seg > np.uint64(self.geo.refcount_max - delta)):
                raise QimgError("Reference count overflow")
            if delta < 0 and np.any(seg < np.uint64(-delta)):
                first = _pos + int(np.argmax(seg < np.uint64(-delta)))
                raise CorruptImageError(f"Cannot decrease refcount below zero (cluster {first})")
        for block_offset, lo, hi, pos in pieces:
            seg = self.blocks.get(block_offset)[lo:hi]
            if delta > 0:
                seg += np.uint64(delta)
            else:
                seg -= np.uint64(-delta)
                self._note_freed(pos + np.flatnonzero(seg == 0))
            self.blocks.mark_dirty(block_offset)

    def get_runs(self, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The refcounts of the clusters of the runs, in order (as get_many
        of their indexes)."""
        starts = np.asarray(starts, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        if not _long_disjoint_runs(starts, counts):
            return self.get_many(expand_runs(starts, counts))
        out = np.zeros(int(counts.sum()), dtype=np.uint64)
        at = 0
        for block_offset, lo, hi, _pos in self._run_pieces(starts, counts, create=False):
            if block_offset:
                out[at : at + hi - lo] = self.blocks.get(block_offset)[lo:hi]
            at += hi - lo
        return out

    def _run_pieces(self, starts: np.ndarray, counts: np.ndarray, create: bool) -> list:
        """(block offset, first, end, cluster) of each refcount block's share
        [first, end) of the runs, in order; a missing block is created when
        `create`, else raises unless the pieces are only read (offset 0)."""
        bits = self.geo.refcount_block_bits
        per_block = 1 << bits
        pieces = []
        for start, count in zip(starts.tolist(), counts.tolist()):
            pos, end = start, start + count
            while pos < end:
                bi, lo = pos >> bits, pos & (per_block - 1)
                n = min(per_block - lo, end - pos)
                offset = self._block_offset(bi)
                if not offset and create:
                    offset = self._create_block(bi)
                pieces.append((offset, lo, lo + n, pos))
                pos += n
        return pieces

    def free_runs(self, starts: np.ndarray, counts: np.ndarray) -> None:
        """Drop one reference to every cluster of the runs (see change_many)."""
        self.change_runs(starts, counts, -1)

    def _block_groups(self, index: np.ndarray, create: bool) -> list[tuple[int, int, int]]:
        """(block offset, a, b) for each refcount block's share index[a:b] of
        the sorted cluster indices `index`."""
        bits = self.geo.refcount_block_bits
        # Sorted: each block's share starts where its first cluster would.
        first, last = int(index[0]) >> bits, int(index[-1]) >> bits
        starts = np.arange(first + 1, last + 1, dtype=np.int64) << bits
        bounds = [0, *np.searchsorted(index, starts).tolist(), len(index)]
        groups = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a == b:
                continue  # no cluster in this block
            bi = int(index[a]) >> bits
            block_offset = self._block_offset(bi)
            if not block_offset:
                if not create:
                    raise CorruptImageError(
                        f"Cannot free cluster {int(index[a]):#x}: it has no refcount block"
                    )
                block_offset = self._create_block(bi)
            groups.append((block_offset, a, b))
        return groups

    def _check_change(
        self, block_offset: int, index: np.ndarray, steps: np.ndarray, delta: int
    ) -> None:
        """Raise if changing the counts of `index` (one block) by +/-steps
        would overflow or fall below zero."""
        block = self.blocks.get(block_offset)
        values = block[self._positions(index)]
        if delta > 0:
            room = np.uint64(self.geo.refcount_max) - values  # never negative
            if np.any(steps > room):
                raise QimgError("Reference count overflow")
            return
        under = np.flatnonzero(values < steps)
        if len(under):
            raise CorruptImageError(
                f"Cannot decrease refcount below zero (cluster {int(index[under[0]])})"
            )

    def _positions(self, index: np.ndarray):
        """Where the sorted, distinct cluster indices `index` (of one block)
        lie in their block: a slice where they form one run (a table's
        worth of a sequential allocation), else an index array."""
        mask = (1 << self.geo.refcount_block_bits) - 1
        if int(index[-1]) - int(index[0]) == len(index) - 1:
            first = int(index[0]) & mask
            return slice(first, first + len(index))
        return index & mask

    def _note_freed(self, freed: np.ndarray) -> None:
        """Clusters `freed` (sorted) have just fallen to refcount 0."""
        if not len(freed):
            return
        fbo_cluster = self.free_byte_offset >> self.geo.cluster_bits
        if self.free_byte_offset and fbo_cluster in freed:
            # As in update: never pack compressed data into a freed cluster.
            self.free_byte_offset = 0
        # The hint is lowered only once the free is durable (frees_committed).
        lo, hi = self.pending_free
        self.pending_free = (min(lo, int(freed[0])), max(hi, int(freed[-1]) + 1))

    def drop_unused_blocks(self) -> None:
        """QEMU's qcow2_shrink_reftable: refcount blocks that count nothing
        but (maybe) their own cluster leave the refcount table.

        Ordering: the table without them is written and flushed first; only
        then is a block that another block counts released there (QEMU
        leaks those; a self-counting block goes with its own count).
        """
        mask = (1 << self.geo.refcount_block_bits) - 1
        cb = self.geo.cluster_bits
        offsets = self.table & np.uint64(L.REFT_OFFSET_MASK)
        dropped: list[tuple[int, int]] = []  # (block index, block offset)
        for bi in np.flatnonzero(offsets).tolist():
            offset = int(offsets[bi])
            used = np.flatnonzero(self.blocks.get(offset))
            own = offset >> cb
            if own >> self.geo.refcount_block_bits == bi:
                used = used[used != (own & mask)]
            if not len(used):
                dropped.append((bi, offset))
        if not dropped:
            return
        self.blocks.flush()
        for bi, _offset in dropped:
            self.table[bi] = 0
        self.generation += 1  # the image's overlap map is stale
        data = self.table.astype(">u8").tobytes()
        self.io.write_metadata(self.table_offset, data, "refcount-table")
        self.io.flush_file()
        for bi, offset in dropped:
            self.blocks.drop(offset)
            if (offset >> cb) >> self.geo.refcount_block_bits != bi:
                self.free(offset, self.geo.cluster_size)

    def set_range(self, start: int, count: int, value: int) -> None:
        """Set clusters [start, start+count) to `value` (creating blocks)."""
        for _pos, bi, first, n in self._spans(start, count):
            block_offset = self._block_offset(bi) or self._create_block(bi)
            self.blocks.get(block_offset)[first : first + n] = value
            self.blocks.mark_dirty(block_offset)

    # --- allocation ----------------------------------------------------------

    def _find_free(self, count: int) -> int:
        """First run of `count` clusters with refcount 0, from free_cluster_index.

        Clusters past the covered range, or under a missing refcount block,
        count as free (QEMU's alloc_clusters_noref).
        """
        bits = self.geo.refcount_block_bits
        per_block = 1 << bits
        pos = self.free_cluster_index
        run_start = pos
        covered = self.covered_clusters()
        while pos < covered:
            bi = pos >> bits
            first = pos & (per_block - 1)
            block_offset = self._block_offset(bi)
            if not block_offset:
                # A missing block covers only free clusters.
                if pos - run_start + (per_block - first) >= count:
                    return run_start
                pos = (bi + 1) << bits
                continue
            block = self.blocks.get(block_offset)[first:]
            if pos == self.free_cluster_index and block[0]:
                # Clusters in use right at the index: move it past them
                # (keeps "below the index is in use"), so that sequential
                # allocation finds its run with the fast path below.
                zeros = np.flatnonzero(block == 0)
                skip = int(zeros[0]) if len(zeros) else len(block)
                self.free_cluster_index = pos = run_start = pos + skip
                continue
            # Fast path for sequential allocation (convert): the run starts
            # right here and this block holds all of it, free.
            if run_start == pos and len(block) >= count and not block[:count].any():
                return pos
            used = np.flatnonzero(block)
            if len(used) == 0:
                if pos - run_start + len(block) >= count:
                    return run_start
                pos += len(block)
                continue
            # Look for a gap of `count` in this block between used entries.
            edges = np.concatenate(([-1], used, [len(block)]))
            starts = edges[:-1] + 1
            gaps = edges[1:] - starts
            # The first gap continues a run begun in earlier blocks.
            if gaps[0] + (pos - run_start) >= count:
                return run_start
            big = np.flatnonzero(gaps[1:] >= count)
            if len(big):
                return pos + int(starts[1 + big[0]])
            run_start = pos + int(used[-1]) + 1
            pos += len(block)
        return run_start

    def _missing_blocks(self, start: int, count: int) -> list[int]:
        """Indices of the refcount blocks absent for clusters [start, start+count)."""
        bits = self.geo.refcount_block_bits
        last = (start + count - 1) >> bits
        return [bi for bi in range(start >> bits, last + 1) if not self._block_offset(bi)]

    def alloc(self, count: int) -> int:
        """Allocate `count` contiguous clusters with refcount 1; their offset.

        QEMU's qcow2_alloc_clusters. Where the run lies under missing refcount
        blocks, those blocks are placed just before it, in one free run with
        the data: every cluster of that run is then described by a block that
        exists or is created with it, so placement never needs to recurse
        (QEMU gets the same from alloc_refcount_block's -EAGAIN retries).
        """
        if count <= 0:
            raise ValueError("count must be positive")
        while True:
            nblocks = 0
            while True:
                start = self._find_free(count + nblocks)
                missing = self._missing_blocks(start, count + nblocks)
                if len(missing) <= nblocks:
                    break
                nblocks = len(missing)
            if missing and missing[-1] >= len(self.table):
                self._grow_table(missing[-1])
                continue  # the new table's area took clusters: search again
            data = start + len(missing)
            if self._reuses_pending_free(start, data + count):
                continue
            if missing:
                self._create_blocks(start, missing)
            self.update(data, count, 1)
            if start == self.free_cluster_index:
                self.free_cluster_index = data + count
            return data << self.geo.cluster_bits

    def _reuses_pending_free(self, start: int, end: int) -> bool:
        """Ordering: a cluster freed since the last flush is reused only after
        the L2 tables that stopped pointing at it are durable; otherwise a
        crash could leave an old L2 entry pointing at someone else's new data.
        Returns True (after making those frees durable) when the run
        [start, end) touches such a cluster; the caller then searches again.
        """
        lo, hi = self.pending_free
        if start >= hi or end <= lo:
            return False
        self.io.commit_frees()
        self.pending_free = (1 << 63, 0)
        return True

    def frees_committed(self) -> None:
        """Called after a flush: every freed cluster may be reused now."""
        lo, _hi = self.pending_free
        if lo < self.free_cluster_index:
            self.free_cluster_index = lo
        self.pending_free = (1 << 63, 0)

    def alloc_bytes_many(self, sizes: list[int]) -> list[int]:
        """Offsets of `sizes` bytes each (at most one cluster), allocated one
        after another for compressed data.

        QEMU's qcow2_alloc_bytes, once per size: compressed clusters are
        packed one after another; one may run on into the next host cluster
        when that is the next one allocated. Every host cluster a descriptor
        touches counts one reference per descriptor. The extra references to
        clusters already in use are added together at the end: every such
        cluster has a refcount of at least 1 already, so no allocation in
        between can take it.
        """
        cs = self.geo.cluster_size
        cb = self.geo.cluster_bits
        refcount_max = self.geo.refcount_max
        extra: dict[int, int] = {}  # cluster -> references to add
        known: dict[int, int] = {}  # cluster -> refcount before `extra`
        out = []
        offset = self.free_byte_offset
        for size in sizes:
            if offset:
                c = offset >> cb
                base = known.get(c)
                if base is None:
                    base = known[c] = self.get(c)
                if base + extra.get(c, 0) >= refcount_max:
                    offset = 0
            if offset and cs - (offset % cs) >= size:
                extra[c] = extra.get(c, 0) + 1  # one more descriptor in this cluster
            else:
                new = self.alloc(1)
                known[new >> cb] = 1
                if offset and -(-offset // cs) * cs == new:
                    extra[c] = extra.get(c, 0) + 1  # straddles into `new`
                else:
                    offset = new
            out.append(offset)
            end = offset + size
            offset = end if end % cs else 0
        self.free_byte_offset = offset
        self._add_references(extra)
        return out

    def _add_references(self, extra: dict[int, int]) -> None:
        """Add extra[c] to the refcount of each cluster c (blocks exist)."""
        bits = self.geo.refcount_block_bits
        mask = (1 << bits) - 1
        by_block: dict[int, list[tuple[int, int]]] = {}
        for c, k in extra.items():
            by_block.setdefault(c >> bits, []).append((c & mask, k))
        for bi, pairs in by_block.items():
            block_offset = self._block_offset(bi)
            if not block_offset:
                raise CorruptImageError(f"Refcount block {bi} is missing")
            block = self.blocks.get(block_offset)
            idx = np.fromiter((i for i, _k in pairs), dtype=np.intp, count=len(pairs))
            add = np.fromiter((k for _i, k in pairs), dtype=np.uint64, count=len(pairs))
            if np.any(block[idx] > np.uint64(self.geo.refcount_max) - add):
                raise QimgError("Reference count overflow")
            block[idx] += add
            self.blocks.mark_dirty(block_offset)

    def free(self, offset: int, length: int) -> None:
        """Drop one reference to every cluster touched by [offset, offset+length)."""
        bits = self.geo.cluster_bits
        start = offset >> bits
        end = (offset + length + self.geo.cluster_size - 1) >> bits
        self.update(start, end - start, -1)

    def _create_blocks(self, start: int, indices: list[int]) -> None:
        """Create refcount blocks `indices` in clusters start, start+1, ...

        Each new block counts the new block clusters it covers; a block
        cluster covered by an existing block is counted there. Ordering: the
        new blocks and the counts in existing blocks are durable before the
        refcount table entries point at the new blocks, and those entries are
        durable before anything allocated under them can be referenced.
        """
        bits = self.geo.refcount_block_bits
        mask = (1 << bits) - 1
        cb = self.geo.cluster_bits
        new = {bi: np.zeros(1 << bits, dtype=np.uint64) for bi in indices}
        for i in range(len(indices)):
            cluster = start + i
            values = new.get(cluster >> bits)
            if values is not None:
                values[cluster & mask] = 1
            else:
                self.update(cluster, 1, 1)
        for i, bi in enumerate(indices):
            self._write_block((start + i) << cb, new[bi])
        self.blocks.flush()
        self.io.flush_file()
        for i, bi in enumerate(indices):
            offset = (start + i) << cb
            self.table[bi] = offset
            self.generation += 1  # the image's overlap map is stale
            self.blocks.put_new(offset, new[bi])
            self.blocks.dirty.discard(offset)
            self._write_table_entry(bi)
        self.io.flush_file()

    def _create_block(self, block_index: int) -> int:
        """Create refcount block `block_index` somewhere free; its offset."""
        bits = self.geo.refcount_block_bits
        if block_index >= len(self.table):
            self._grow_table(block_index)
            if self._block_offset(block_index):
                return self._block_offset(block_index)
        while True:
            start = self._find_free(1)
            missing = self._missing_blocks(start, 1)
            if missing and missing[0] >= len(self.table):
                self._grow_table(missing[0])
                continue
            if self._reuses_pending_free(start, start + 1):
                continue
            break
        if missing and missing[0] != block_index:
            # The free cluster lies under another missing block: make the
            # block for our index describe a cluster of its own range instead.
            start = block_index << bits
        self._create_blocks(start, [block_index])
        return self._block_offset(block_index)

    def _write_table_entry(self, index: int) -> None:
        entry = self.table[index : index + 1].astype(">u8").tobytes()
        self.io.write_metadata(self.table_offset + index * 8, entry, "refcount-table")

    def _next_table_clusters(self, min_entries: int) -> int:
        """QEMU's next_refcount_table_size: grow by half until big enough."""
        min_clusters = -(-min_entries * 8 // self.geo.cluster_size)
        clusters = max(1, self.table_clusters)
        while min_clusters > clusters:
            clusters = (clusters * 3 + 1) // 2
        return clusters

    def _grow_table(self, needed_index: int) -> None:
        """Move the refcount table to a larger one placed after all data.

        QEMU's qcow2_refcount_area: the new table and the refcount blocks
        covering it are placed together past the highest covered cluster,
        aligned to a refcount block's span so that no existing block covers
        them. Ordering: new blocks and table are written and flushed, then
        the header points at the new table, then the old table is freed.
        """
        geo = self.geo
        bits = geo.refcount_block_bits
        per_block = 1 << bits
        entries_per_cluster = geo.cluster_size // 8
        # QEMU's blocks_used: the area starts past the block being created,
        # which nothing covers yet, so no existing block describes the area.
        area_start_block = max(len(self.table), needed_index + 1)
        area_start = area_start_block << bits  # cluster index
        # Fixed point: the area holds `area_blocks` blocks and `table_clusters`
        # table clusters, and those blocks cover the whole area.
        area_blocks, table_clusters = 1, 1
        while True:
            table_clusters = self._next_table_clusters(area_start_block + area_blocks)
            blocks_needed = -(-(area_blocks + table_clusters) // per_block)
            if blocks_needed <= area_blocks:
                break
            area_blocks = blocks_needed
        area_clusters = area_blocks + table_clusters
        new_table = np.zeros(table_clusters * entries_per_cluster, dtype=np.uint64)
        new_table[: len(self.table)] = self.table
        # Layout of the area: refcount blocks first, then the table.
        for i in range(area_blocks):
            new_table[area_start_block + i] = (area_start + i) << geo.cluster_bits
        for i in range(area_blocks):
            values = np.zeros(per_block, dtype=np.uint64)
            lo = i * per_block
            hi = min(area_clusters, lo + per_block)
            values[: max(0, hi - lo)] = 1
            self._write_block((area_start + i) << geo.cluster_bits, values)
        table_offset = (area_start + area_blocks) << geo.cluster_bits
        self.io.write_metadata(table_offset, new_table.astype(">u8").tobytes(), "refcount-table")
        self.io.flush_file()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.io.set_refcount_table(table_offset, table_clusters)
        self.table = new_table
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.free(old_offset, old_clusters * geo.cluster_size)


# --- changing the refcount width (QEMU's qcow2_change_refcount_order) ---------

# Clusters whose counts are handled per step of a width rewrite: bounds the
# memory a rewrite takes (a few arrays of this many entries).
_REWRITE_CHUNK = 1 << 20


class NewRefcountStructure:
    """Refcount blocks and table of another width for the clusters an image
    uses, placed past its last used cluster (`start`, a cluster index):
    `blocks` new blocks first, then the `table_clusters` of the table.

    The structure counts every cluster in use now (the old blocks and table
    too: they are released through it once the header points at it) and
    itself. `present` holds the indices of the blocks it has (a block whose
    clusters are all free is left out).
    """

    def __init__(self, refcounts: Refcounts, refcount_order: int):
        self.old = refcounts
        self.order = refcount_order
        geo = refcounts.geo
        self.cluster_bits = geo.cluster_bits
        self.block_bits = geo.cluster_bits + 3 - refcount_order
        self.used = refcounts.last_used_cluster()
        self.start = self.used
        present = self._nonzero_blocks()
        # Fixed point: the blocks and the table must cover themselves.
        n_blocks, table_clusters = len(present), 1
        while True:
            end = self.start + n_blocks + table_clusters
            own = np.arange(self.start >> self.block_bits, ((end - 1) >> self.block_bits) + 1)
            all_present = np.union1d(present, own)
            entries = int(all_present[-1]) + 1
            need = -(-(entries * L.REFCOUNT_TABLE_ENTRY_SIZE) // geo.cluster_size)
            if len(all_present) == n_blocks and need == table_clusters:
                break
            n_blocks, table_clusters = len(all_present), need
        self.present = all_present
        self.blocks = n_blocks
        self.table_clusters = table_clusters
        self.end = self.start + n_blocks + table_clusters
        self.table_offset = (self.start + n_blocks) << self.cluster_bits

    def _counts(self, first: int, count: int) -> np.ndarray:
        """Counts of clusters [first, first+count) in the new structure."""
        if first < self.used:
            values = self._old_counts(first, count)
        else:
            values = np.zeros(count, dtype=np.uint64)
        lo, hi = max(first, self.start), min(first + count, self.end)
        if hi > lo:
            values[lo - first : hi - first] = 1
        return values

    def _old_counts(self, first: int, count: int) -> np.ndarray:
        """Refcounts of clusters [first, first+count) in the old structure,
        read past its cache (a rewrite reads every block once per pass and
        keeps none: memory stays bounded on large images)."""
        old = self.old
        out = np.zeros(count, dtype=np.uint64)
        for pos, bi, start, n in old._spans(first, count):
            offset = old._block_offset(bi)
            if offset:
                block = old.blocks.tables.get(offset)
                if block is None:
                    block = old._read_block(offset)
                out[pos - first : pos - first + n] = block[start : start + n]
        return out

    def _nonzero_blocks(self) -> np.ndarray:
        """Indices of the new blocks over [0, used) holding a non-zero count;
        raises if a count does not fit the new width."""
        per_block = 1 << self.block_bits
        limit = (1 << (1 << self.order)) - 1
        out = []
        step = max(per_block, _REWRITE_CHUNK // per_block * per_block)
        for first in range(0, self.used, step):
            values = self._old_counts(first, min(step, self.used - first))
            big = np.flatnonzero(values > np.uint64(limit))
            if len(big):
                cluster = first + int(big[0])
                raise QimgError(
                    f"Cannot decrease refcount entry width to {1 << self.order} bits: Cluster at "
                    f"offset {cluster << self.cluster_bits:#x} has a refcount of "
                    f"{int(values[big[0]])}"
                )
            padded = np.zeros(-(-len(values) // per_block) * per_block, dtype=np.uint64)
            padded[: len(values)] = values
            hit = np.flatnonzero(padded.reshape(-1, per_block).any(axis=1))
            out.append(hit + (first >> self.block_bits))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def write(self, write_metadata, progress=None) -> None:
        """Write every new block, then the table (no flush: the caller's).
        `progress(done, total)` hears of each step."""
        per_block = 1 << self.block_bits
        cs = 1 << self.cluster_bits
        total_blocks = ((self.end - 1) >> self.block_bits) + 1
        step_blocks = max(1, _REWRITE_CHUNK // per_block)
        slot = np.full(total_blocks, -1, dtype=np.int64)
        slot[self.present] = np.arange(len(self.present))
        for b0 in range(0, total_blocks, step_blocks):
            b1 = min(total_blocks, b0 + step_blocks)
            here = self.present[(self.present >= b0) & (self.present < b1)]
            if not len(here):
                continue
            values = self._counts(b0 * per_block, (b1 - b0) * per_block).reshape(-1, per_block)
            data = encode_refcount_block(values[here - b0].reshape(-1), self.order)
            write_metadata((self.start + int(slot[here[0]])) * cs, data, "new-refcount")
            if progress is not None:
                progress(b1, total_blocks)
        table = np.zeros(self.table_clusters * cs // L.REFCOUNT_TABLE_ENTRY_SIZE, dtype=np.uint64)
        table[self.present] = (
            np.uint64(self.start) + np.arange(len(self.present), dtype=np.uint64)
        ) << np.uint64(self.cluster_bits)
        write_metadata(self.table_offset, table.astype(">u8").tobytes(), "new-refcount")

    def old_structure(self) -> tuple[np.ndarray, np.ndarray]:
        """(first cluster, count) runs of the old table and blocks, to be
        released once the header points at the new structure."""
        old = self.old
        blocks = (old.table & np.uint64(L.REFT_OFFSET_MASK)) >> np.uint64(self.cluster_bits)
        blocks = blocks[blocks != 0].astype(np.int64)
        starts = np.concatenate(([old.table_offset >> self.cluster_bits], blocks))
        counts = np.concatenate(([old.table_clusters], np.ones(len(blocks), dtype=np.int64)))
        return starts.astype(np.int64), counts.astype(np.int64)
