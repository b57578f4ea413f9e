"""Guest-to-host mapping: L1/L2 tables, extended L2, allocation and COW.

Spec: "Cluster mapping", "Extended L2 Entries". Mapping works on whole L2
ranges at once (numpy), yielding maximal runs of one kind, so callers never
loop per cluster where a run will do.
"""

from __future__ import annotations

import bisect

import numpy as np

from qimg.driver import (  # noqa: F401  (re-exported)
    COMPRESSED,
    DATA,
    UNALLOCATED,
    ZERO,
    Extent,
    run_bytes,
)
from qimg.errors import CorruptImageError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.cache import TableCache
from qimg.formats.qcow2.entries import (  # noqa: F401  (decode_l2, encode_l2 re-exported)
    CLUSTER_COMPRESSED,
    CLUSTER_UNALLOCATED,
    CLUSTER_ZERO_ALLOC,
    CLUSTER_ZERO_PLAIN,
    cluster_types,
    compressed_clusters,
    compressed_descriptors,
    decode_l2,
    descriptors,
    encode_l2,
    has_host_cluster,
    host_offsets,
    is_allocated,
    is_compressed,
    is_copied,
    is_zero_flagged,
    subcluster_allocated,
    unit_kinds,
    writable_in_place,
)
from qimg.formats.qcow2.header import Geometry

_U64 = np.uint64
_OFFSET_MASK = _U64(L.L2E_OFFSET_MASK)
_COPIED = _U64(L.QCOW_OFLAG_COPIED)
_COMPRESSED = _U64(L.QCOW_OFLAG_COMPRESSED)
_ZERO = _U64(L.QCOW_OFLAG_ZERO)

# Where the image's file is open read-only its L2 tables cannot change:
# WINDOW entries of a table are checked and mapped at once, and each read
# inside them cuts its extents from that window's runs (one mapping of a
# 1 MiB read: ~60 us of numpy calls; a cut: a few). WINDOWS_KEPT windows
# are kept, the oldest dropped first (a window holds a run per unit at
# most: 32 Ki runs with extended L2).
WINDOW = 1024
WINDOWS_KEPT = 4


class ClusterMap:
    """The active L1 table and the L2 cache of one image.

    `owner` is the Qcow2Image: it provides metadata I/O (with the overlap
    check), the refcounts, the data file and the backing reader.
    """

    def __init__(self, owner, geo: Geometry, l1_offset: int, l1_size: int, has_data_file: bool):
        self.owner = owner
        self.geo = geo
        self.l1_offset = l1_offset
        self.l1_size = l1_size
        self.has_data_file = has_data_file
        self._entry_ramp: np.ndarray | None = None  # see _ramp
        # (L2 offset, guest start) -> _Window, where the tables are fixed.
        self._windows: dict[tuple[int, int], _Window] | None = (
            None if owner.storage.writable else {}
        )
        raw = owner.read_metadata(l1_offset, l1_size * L.L1_ENTRY_SIZE) if l1_size else b""
        self.l1 = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        self.l2_cache = TableCache(
            "l2",
            geo.cluster_size,
            self._read_l2,
            self._write_l2,
            owner.flush_file,
        )

    # --- table I/O -------------------------------------------------------------

    def _read_l2(self, offset: int) -> np.ndarray:
        return decode_l2(
            self.owner.read_metadata(offset, self.geo.cluster_size), self.geo.extended_l2
        )

    def _write_l2(self, offset: int, table: np.ndarray) -> None:
        self.owner.write_metadata(offset, encode_l2(table), "l2")

    def l2_offset(self, l1_index: int, guest: int | None = None) -> int:
        """The L2 table of L1 entry `l1_index` (0: none). An unaligned one is
        a corruption (QEMU's get_cluster_table): signalled, then an EIO at
        guest offset `guest` (by default where the entry's range starts)."""
        if l1_index >= len(self.l1):
            return 0
        offset = int(self.l1[l1_index]) & L.L1E_OFFSET_MASK
        if offset % self.geo.cluster_size:
            self.owner.signal_corruption(
                f"L2 table offset {_hex(offset)} unaligned (L1 index: {_hex(l1_index)})"
            )
            if guest is None:
                guest = l1_index << (self.geo.cluster_bits + self.geo.l2_bits)
            raise CorruptImageError("Input/output error", offset, guest_offset=guest)
        return offset

    def write_l1_entry(self, index: int) -> None:
        """Ordering: the L2 table it points at is already on disk."""
        data = self.l1[index : index + 1].astype(">u8").tobytes()
        self.owner.write_metadata(self.l1_offset + index * 8, data, "l1")

    # --- mapping ---------------------------------------------------------------

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Maximal runs of one kind covering guest [offset, offset+length)."""
        out: list[Extent] = []
        geo = self.geo
        end = offset + length
        pos = offset
        span = 1 << (geo.cluster_bits + geo.l2_bits)
        while pos < end:
            l1_index = pos >> (geo.cluster_bits + geo.l2_bits)
            chunk_end = min(end, (l1_index + 1) * span)
            l2 = self.l2_offset(l1_index, pos)
            if not l2:
                _append(out, Extent(UNALLOCATED, pos, chunk_end - pos, 0))
            elif self._windows is not None:
                self._cut_windows(l2, pos, chunk_end, out)
            else:
                table = self.l2_cache.get(l2)
                self._check_entries(l2, table, pos, chunk_end)
                self._map_l2(table, pos, chunk_end, out)
            pos = chunk_end
        return out

    def checked_table(self, start: int, end: int) -> np.ndarray | None:
        """The L2 table mapping guest [start, end) (inside one L1 entry's
        range), its entries there checked as extents() checks them; None
        where no L2 table is allocated."""
        l2 = self.l2_offset(start >> (self.geo.cluster_bits + self.geo.l2_bits), start)
        if not l2:
            return None
        table = self.l2_cache.get(l2)
        self._check_entries(l2, table, start, end)
        return table

    def _check_entries(self, l2: int, table: np.ndarray, start: int, end: int) -> None:
        """The entry checks of QEMU's qcow2_get_host_offset over the clusters
        of guest [start, end): the first entry that fails one is a
        corruption (signalled once), and its mapping an EIO at that cluster."""
        hits = self._bad_entries(table, start, end)
        if len(hits):
            self._raise_bad_entry(l2, table, start, int(hits[0]))

    def _bad_entries(self, table: np.ndarray, start: int, end: int) -> np.ndarray:
        """Indices in `table` of the entries mapping guest [start, end) (in
        one L2 table's range) that fail a check, in order:

        - a zero flag in a version 2 image;
        - a compressed cluster in an image with an external data file;
        - an allocated (normal or zero) cluster whose host offset is not
          cluster-aligned, or, with an external data file, not the guest
          offset (data files map guest offsets 1:1).
        """
        geo = self.geo
        first = geo.offset_to_l2_index(start)
        rows = table[first : geo.offset_to_l2_index(end - 1) + 1]
        entries = descriptors(rows)
        types = cluster_types(entries, geo.extended_l2, self.has_data_file)
        host = host_offsets(entries)
        allocated = has_host_cluster(types)
        bad = allocated & ((host & _U64(geo.cluster_size - 1)) != 0)
        if self.owner.header.version < 3:
            bad |= (types == CLUSTER_ZERO_PLAIN) | (types == CLUSTER_ZERO_ALLOC)
        if self.has_data_file:
            guest = (np.arange(len(entries), dtype=np.uint64) + _U64(first)) << _U64(
                geo.cluster_bits
            )
            guest += _U64(
                start >> (geo.cluster_bits + geo.l2_bits) << (geo.cluster_bits + geo.l2_bits)
            )
            bad |= (types == CLUSTER_COMPRESSED) | (allocated & (host != guest))
        return np.flatnonzero(bad) + first

    def _raise_bad_entry(self, l2: int, table: np.ndarray, start: int, index: int) -> None:
        """Signal the corruption of entry `index` of `table` (one that
        _bad_entries names, met by a request from guest `start`) and raise
        its EIO."""
        geo = self.geo
        entry = descriptors(table[index : index + 1])
        kind = int(cluster_types(entry, geo.extended_l2, self.has_data_file)[0])
        cluster_host = int(host_offsets(entry)[0])
        span_bits = geo.cluster_bits + geo.l2_bits
        guest_cluster = (start >> span_bits << span_bits) + (index << geo.cluster_bits)
        where = f"(L2 offset: {_hex(l2)}, L2 index: {_hex(index)})"
        zero = kind in (CLUSTER_ZERO_PLAIN, CLUSTER_ZERO_ALLOC)
        if kind == CLUSTER_COMPRESSED:
            message = f"Compressed cluster entry found in image with external data file {where}"
        elif zero and self.owner.header.version < 3:
            message = f"Zero cluster entry found in pre-v3 image {where}"
        elif cluster_host % geo.cluster_size:
            message = f"Cluster allocation offset {_hex(cluster_host)} unaligned {where}"
        else:
            message = (
                f"External data file host cluster offset {_hex(cluster_host)} does not match "
                f"guest cluster offset: {_hex(guest_cluster)}, L2 index: {_hex(index)})"
            )
        self.owner.signal_corruption(message)
        raise CorruptImageError("Input/output error", l2, guest_offset=max(start, guest_cluster))

    def _cut_windows(self, l2: int, start: int, end: int, out: list[Extent]) -> None:
        """extents() of guest [start, end), inside the range of the L2 table
        at `l2`, cut from the runs of its windows (fixed tables only)."""
        geo = self.geo
        span = min(WINDOW, geo.l2_size) << geo.cluster_bits
        pos = start
        while pos < end:
            base = pos - pos % span
            stop = min(end, base + span)
            window = self._window(l2, base, span)
            first = geo.offset_to_l2_index(pos)
            k = bisect.bisect_left(window.bad, first)
            if k < len(window.bad) and window.bad[k] <= geo.offset_to_l2_index(stop - 1):
                self._raise_bad_entry(l2, self.l2_cache.get(l2), pos, window.bad[k])
            window.cut(pos, stop, out)
            pos = stop

    def _window(self, l2: int, base: int, span: int) -> _Window:
        """The checked and mapped window of guest [base, base+span) in the
        table at `l2`."""
        windows = self._windows
        key = (l2, base)
        window = windows.get(key)
        if window is None:
            table = self.l2_cache.get(l2)
            runs: list[Extent] = []
            self._map_l2(table, base, base + span, runs)
            window = _Window(runs, self._bad_entries(table, base, base + span).tolist())
            if len(windows) >= WINDOWS_KEPT:
                del windows[next(iter(windows))]
            windows[key] = window
        return window

    def _map_l2(self, table: np.ndarray, start: int, end: int, out: list[Extent]) -> None:
        geo = self.geo
        unit_bits = geo.cluster_bits if not geo.extended_l2 else geo.cluster_bits - 5
        first_cluster = geo.offset_to_l2_index(start)
        last_cluster = geo.offset_to_l2_index(end - 1)
        rows = table[first_cluster : last_cluster + 1]
        kinds, hosts = unit_kinds(rows, geo, self.has_data_file)
        # Units (clusters or subclusters) covering [start, end).
        base = (start >> geo.cluster_bits) << geo.cluster_bits
        u0 = (start - base) >> unit_bits
        u1 = ((end - 1 - base) >> unit_bits) + 1
        kinds = kinds[u0:u1]
        hosts = hosts[u0:u1]
        unit = 1 << unit_bits
        brk = kinds[1:] != kinds[:-1]
        brk |= (kinds[1:] == DATA) & (hosts[1:] != hosts[:-1] + _U64(unit))
        # QEMU's count_contiguous_subclusters: zero or unallocated units
        # with a host cluster (ZERO_ALLOC, UNALLOCATED_ALLOC) and without
        # (_PLAIN) are apart, and _ALLOC runs need contiguous host
        # clusters, as data runs do.
        if unit_bits != geo.cluster_bits:  # subclusters: their cluster's host
            within = np.arange(u0, u1, dtype=np.uint64) % _U64(1 << (geo.cluster_bits - unit_bits))
            hosts = np.where(hosts - within * _U64(unit) != 0, hosts, _U64(0))
        alloc = (kinds != DATA) & (kinds != COMPRESSED) & (hosts != 0)
        brk |= alloc[1:] != alloc[:-1]
        brk |= alloc[1:] & alloc[:-1] & (hosts[1:] != hosts[:-1] + _U64(unit))
        brk |= kinds[1:] == COMPRESSED
        edges = np.flatnonzero(brk) + 1
        starts = np.concatenate(([0], edges))
        # Guest bounds of the runs; only the first starts before `start`
        # and only the last ends after `end`.
        bounds = (base + (u0 + np.append(starts, len(kinds))) * unit).tolist()
        bounds[-1] = min(end, bounds[-1])
        host_list = hosts[starts].tolist()
        kind_list = kinds[starts].tolist()
        if kind_list[0] != COMPRESSED and host_list[0]:
            host_list[0] += max(start, bounds[0]) - bounds[0]
        bounds[0] = max(start, bounds[0])
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        runs = list(map(Extent, kind_list, bounds, lengths, host_list))
        # Runs inside one table never continue each other (the breaks
        # above): only the first may merge with what `out` ends with.
        _append(out, runs[0])
        out.extend(runs[1:])

    # --- L2 allocation -----------------------------------------------------------

    def l2_for_write(self, l1_index: int) -> tuple[int, np.ndarray]:
        """The L2 table for `l1_index`, made writable (QEMU's get_cluster_table).

        Allocates a table where there is none, and copies one shared with a
        snapshot (L1 entry without OFLAG_COPIED). Ordering (l2_allocate): the
        refcount of the new table is flushed, the table is written and
        flushed, then the L1 entry points at it, and only then is the old
        table's refcount dropped.
        """
        if l1_index >= len(self.l1):
            self.grow_l1(l1_index + 1)
        entry = int(self.l1[l1_index])
        old = self.l2_offset(l1_index)
        if old and entry & L.QCOW_OFLAG_COPIED:
            return old, self.l2_cache.get(old)
        owner = self.owner
        new = owner.refcounts.alloc(1)
        if old:
            table = self.l2_cache.get(old).copy()
        else:
            shape = (self.geo.l2_size, 2) if self.geo.extended_l2 else (self.geo.l2_size,)
            table = np.zeros(shape, dtype=np.uint64)
        owner.refcounts.blocks.flush()
        owner.flush_file()
        self._write_l2(new, table)
        owner.flush_file()
        self.l2_cache.put_new(new, table)
        self.l2_cache.dirty.discard(new)
        self.l1[l1_index] = _U64(new | L.QCOW_OFLAG_COPIED)
        owner.overlap_map.l2_moved(self.l1, old, new)
        self.write_l1_entry(l1_index)
        if old:
            owner.flush_file()
            owner.refcounts.blocks.set_dependency(self.l2_cache)
            owner.refcounts.free(old, self.geo.cluster_size)
            self.l2_cache.drop(old)
        return new, table

    def grow_l1(self, min_size: int, exact_size: bool = False) -> None:
        """Make the active L1 table at least `min_size` entries long (QEMU's
        qcow2_grow_l1_table); `exact_size` (resize) takes `min_size` as it
        is, otherwise the table grows by half until it is large enough.

        Ordering: the new table is allocated (its refcounts flushed), written
        and flushed; then the header's l1_size and l1_table_offset change in
        one write, flushed; only then is the old table freed. A crash before
        the header write leaks the new table, never loses the old one.
        """
        if min_size <= self.l1_size:
            return
        from qimg.errors import FileTooLargeError

        if min_size > L.INT_MAX // L.L1_ENTRY_SIZE:
            raise FileTooLargeError("File too large")
        new_size = min_size
        if not exact_size:
            new_size = max(1, self.l1_size)
            while new_size < min_size:
                new_size = (new_size * 3 + 1) // 2
        if new_size > L.QCOW_MAX_L1_SIZE // L.L1_ENTRY_SIZE:
            raise FileTooLargeError("File too large")
        owner = self.owner
        table = np.zeros(new_size, dtype=np.uint64)
        table[: self.l1_size] = self.l1[: self.l1_size]
        nbytes = new_size * L.L1_ENTRY_SIZE
        new_offset = owner.refcounts.alloc(-(-nbytes // self.geo.cluster_size))
        try:
            owner.refcounts.blocks.flush()
            owner.flush_file()
            # The table is not yet live: nothing, not even the old L1, may lie there.
            owner.write_metadata(new_offset, table.astype(">u8").tobytes(), "new-l1")
            owner.flush_file()
            header = new_size.to_bytes(4, "big") + new_offset.to_bytes(8, "big")
            owner.storage.pwrite(L.HEADER_OFF_L1_SIZE, header)
            owner.storage.flush()
        except BaseException:
            owner.refcounts.free(new_offset, nbytes)
            raise
        old_offset, old_size = self.l1_offset, self.l1_size
        owner.header.l1_size, owner.header.l1_table_offset = new_size, new_offset
        self.l1, self.l1_offset, self.l1_size = table, new_offset, new_size
        owner.overlap_map.l1_moved(table)
        if old_size:
            owner.refcounts.free(old_offset, old_size * L.L1_ENTRY_SIZE)

    # --- writes ------------------------------------------------------------------

    def write(self, offset: int, data) -> None:
        """Write guest data, allocating and copying on write as QEMU does."""
        view = memoryview(data).cast("B")
        for l1_index, start, end in self._chunks(offset, len(view)):
            self._write_chunk(l1_index, start, end, view[start - offset : end - offset])

    def _chunks(self, offset: int, length: int):
        """(l1_index, start, end) per L2 table covering [offset, offset+length)."""
        shift = self.geo.cluster_bits + self.geo.l2_bits
        pos, end = offset, offset + length
        while pos < end:
            l1_index = pos >> shift
            stop = min(end, (l1_index + 1) << shift)
            yield l1_index, pos, stop
            pos = stop

    def _write_chunk(self, l1_index: int, start: int, end: int, data: memoryview) -> None:
        geo = self.geo
        cb = geo.cluster_bits
        c0, c1 = start >> cb, ((end - 1) >> cb) + 1
        l2_offset, table = self.l2_for_write(l1_index)
        i0 = c0 & (geo.l2_size - 1)
        rows = table[i0 : i0 + (c1 - c0)]
        entries = descriptors(rows)
        fresh = not entries.any()
        if not fresh:
            types = cluster_types(entries, geo.extended_l2, self.has_data_file)
            in_place = writable_in_place(entries, types)
            flips = np.flatnonzero(in_place[1:] != in_place[:-1]) + 1
            bounds = np.concatenate(([0], flips, [len(in_place)])).tolist()
        else:  # all unallocated (a new image): one allocating run
            in_place = (False,)
            bounds = [0, len(entries)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            # Ordering: the table is dirty before each run changes entries
            # (QEMU marks the slice dirty before linking) and again after
            # the last (a flush inside a run, e.g. the allocator's, cleans
            # it). A run that makes the L2 cache depend on refcounts first
            # flushes refcount blocks holding an earlier run's frees; those
            # must wait on this table, and set_dependency writes it first
            # only if it is dirty. Marked only at the end, a crash could
            # keep a lowered refcount (a cluster shared with a snapshot:
            # refcount 1, two references) with the old entry.
            self.l2_cache.mark_dirty(l2_offset)
            run = rows[a:b]
            if in_place[a]:
                self._write_in_place(run, c0 + a, c0 + b, start, end, data)
            else:
                self._write_allocating(run, c0 + a, c0 + b, start, end, data, fresh)
        self.l2_cache.mark_dirty(l2_offset)

    # --- runs of fresh clusters placed together -----------------------------------

    @property
    def can_place_runs(self) -> bool:
        """Whether place_runs may place runs: plain L2 entries, host
        clusters allocated in the image file."""
        return not self.geo.extended_l2 and not self.has_data_file

    def table_groups(self, runs: list[tuple]) -> list[list[tuple]]:
        """(offset, data, ...) runs (data: bytes, or their length, see
        run_bytes), in order, grouped by the L2 table that maps them (a run
        over two tables is a group)."""
        shift = self.geo.cluster_bits + self.geo.l2_bits
        groups: list[list[tuple]] = []
        table = None
        for run in runs:
            first = run[0] >> shift
            last = (run[0] + run_bytes(run[1]) - 1) >> shift
            if first == table and first == last:
                groups[-1].append(run)
            else:
                groups.append([run])
                table = first if first == last else None
        return groups

    def place_runs(self, runs: list[tuple], put) -> list[tuple]:
        """Place the (offset, data, ...) runs (sorted, disjoint, in one L2
        table) that are whole clusters all unallocated there, in host
        clusters allocated together in guest order (as one write per run
        would place them), the bytes put there by `put(host, placed)` (the
        placed runs' data one after another from `host` on); one L2 update
        for all. Returns the runs it did not place, in order, for the
        caller to write.

        Ordering as _write_allocating: the data is placed before the L2
        entries point at it, and the table depends on the refcounts that
        allocated its clusters.
        """
        geo = self.geo
        cb, cs, size = geo.cluster_bits, geo.cluster_size, geo.l2_size
        # Each run's first entry of the table, its end and its whole
        # clusters (0: not all whole, or it crosses into the next table).
        spans = []
        end = 0
        for run in runs:
            n = run_bytes(run[1])
            first = (run[0] >> cb) & (size - 1)
            if first < end:
                return runs  # overlaps the run before it
            whole = n >> cb if not (run[0] % cs or n % cs) else 0
            end = first + whole
            spans.append((first, end, whole if end <= size else 0))
        if not any(whole for _first, _end, whole in spans):
            return runs
        # The table first (allocated or copied where it must be), then the
        # data clusters: the order one write per run allocates them in.
        l2_offset, table = self.l2_for_write(runs[0][0] >> (cb + geo.l2_bits))
        # Clusters in use before each index of the runs' span [lo, hi) of
        # the table: a run is fresh where none of its clusters is. The
        # span, not the whole table: a batch's span is small, and numpy
        # lets go of the GIL over a whole table.
        lo, hi = spans[0][0], min(max(end for _first, end, _whole in spans), size)
        used = [0, *np.cumsum(descriptors(table[lo:hi]) != 0).tolist()]
        fresh = [
            whole > 0 and used[min(end, hi) - lo] == used[first - lo] for first, end, whole in spans
        ]
        if not any(fresh):
            return runs
        placed = [run for run, f in zip(runs, fresh) if f]
        count = sum(whole for (_first, _end, whole), f in zip(spans, fresh) if f)
        owner = self.owner
        self.l2_cache.mark_dirty(l2_offset)
        host = owner.refcounts.alloc(count)
        owner.check_overlap(host, count << cb, "data")
        put(host, placed)
        self.l2_cache.set_dependency(owner.refcounts.blocks)
        ramp = self._ramp(count)
        entry = host | L.QCOW_OFLAG_COPIED
        for (first, _end, whole), f in zip(spans, fresh):
            if f:
                table[first : first + whole] = ramp[:whole] + _U64(entry)
                entry += whole << cb
        self.l2_cache.mark_dirty(l2_offset)
        return [run for run, f in zip(runs, fresh) if not f]

    def _ramp(self, count: int) -> np.ndarray:
        """0, cluster_size, 2 * cluster_size, ... (at least `count` of
        them): the L2 entries of consecutive host clusters, less the
        first one's."""
        ramp = self._entry_ramp
        if ramp is None or len(ramp) < count:
            ramp = np.arange(max(count, 64), dtype=np.uint64) * _U64(self.geo.cluster_size)
            self._entry_ramp = ramp
        return ramp

    def place_shared(self, runs: list[tuple], share) -> list[tuple]:
        """place_runs of (offset, data, source, source_offset) runs, the
        bytes of each span of runs that continue each other in one source
        put there by `share(host, pieces, source, source_offset)` (pieces:
        the runs' data, or their lengths)."""

        def put(host: int, runs: list[tuple]) -> None:
            for pieces, source, source_offset in _source_contiguous(runs):
                share(host, pieces, source, source_offset)
                host += sum(map(run_bytes, pieces))

        return self.place_runs(runs, put)

    def _write_span(self, delta: int, lo: int, hi: int, span, start: int, data) -> None:
        """Write guest [lo, hi) (data[lo - start : hi - start]) to host
        `guest + delta`, widened to guest `span` = (a, b): the bytes of the
        widening are what the guest reads there now (backing data, zeros),
        read before the write. A cipher's sector alignment widens it further.

        Ordering: the caller changes no mapping of [a, b) before this runs.
        """
        a, b = span
        align = self.owner.dataio.write_align
        a, b = a // align * align, -(-b // align) * align
        bufs = []
        if a < lo:
            bufs.append(self._guest_bytes(a, lo))
        bufs.append(data[lo - start : hi - start])
        if hi < b:
            bufs.append(self._guest_bytes(hi, b))
        self.owner.dataio.write(a, a + delta, bufs)

    def _guest_bytes(self, a: int, b: int) -> bytearray:
        """What the guest reads at [a, b) now; zeros past the disk's end
        (the last cluster may lie partly past it)."""
        buf = bytearray(b - a)
        avail = min(b, self.owner.size) - a
        if avail > 0:
            self.owner.readinto(a, memoryview(buf)[:avail])
        return buf

    def _write_in_place(self, rows, ca, cb_, start, end, data) -> None:
        """Clusters [ca, cb_) writable in place: overwrite their host clusters.

        Only the bytes written reach the disk, widened where what lies
        beside them does not read from the host cluster now: a zero-flagged
        cluster is written whole, an unallocated (or zero) subcluster
        whole. Ordering: no metadata is allocated; data goes straight to
        clusters this image alone owns, and only zero flags / subcluster
        bits change in the cached L2 table, which a crash can only leave
        stale (the old flags then hide the new data: QEMU has the same
        window).
        """
        geo = self.geo
        cb, cs = geo.cluster_bits, geo.cluster_size
        entries = descriptors(rows)
        hosts = host_offsets(entries).tolist()
        zero = None if geo.extended_l2 else is_zero_flagged(entries)
        # Runs of host-contiguous clusters become one write each.
        run_start = 0
        for k in range(1, len(hosts) + 1):
            if k < len(hosts) and hosts[k] == hosts[k - 1] + cs:
                continue
            ga, gb = ca + run_start, ca + k
            lo, hi = max(start, ga << cb), min(end, gb << cb)
            if geo.extended_l2:
                span = self._subcluster_widening(rows, run_start, k - 1, ga, lo, hi)
            else:
                span = (ga << cb if zero[run_start] else lo, gb << cb if zero[k - 1] else hi)
            self._write_span(hosts[run_start] - (ga << cb), lo, hi, span, start, data)
            run_start = k
        if geo.extended_l2:
            rows[:, 1] = self._touched_bitmaps(rows[:, 1], ca, cb_, start, end)
        else:
            rows &= ~_ZERO

    def _subcluster_widening(self, rows, first: int, last: int, ga: int, lo: int, hi: int):
        """Guest [lo, hi) (within clusters rows[first..last], the first at
        guest cluster `ga`) widened to whole subclusters at either end that
        are not allocated (their other bytes do not read from the host)."""
        geo = self.geo
        sub = geo.subcluster_size
        base = ga << geo.cluster_bits
        head = (lo - base) // sub
        tail = (hi - 1 - base - ((last - first) << geo.cluster_bits)) // sub
        bitmaps = rows[[first, last], 1]
        allocated = subcluster_allocated(bitmaps, [head, tail]).tolist()
        a = lo if allocated[0] else lo // sub * sub
        b = hi if allocated[1] else -(-hi // sub) * sub
        return a, b

    def _subcluster_span(self, ca: int, cb_: int, start: int, end: int) -> tuple[int, int]:
        """Guest bytes of clusters [ca, cb_) that the write [start, end)
        touches, rounded out to subclusters."""
        geo = self.geo
        sub = geo.subcluster_size
        lo = max(start, ca << geo.cluster_bits) // sub * sub
        hi = min(-(-end // sub) * sub, cb_ << geo.cluster_bits)
        return lo, hi

    def _touched_bitmaps(self, bitmaps, ca: int, cb_: int, start: int, end: int):
        """Extended L2 bitmaps of clusters [ca, cb_) with the subclusters
        [start, end) touches allocated (and no longer zero)."""
        geo = self.geo
        bases = np.arange(ca, cb_, dtype=np.int64) << geo.cluster_bits
        lo = np.maximum(start, bases) - bases
        hi = np.minimum(end, bases + geo.cluster_size) - bases
        s0 = (lo // geo.subcluster_size).astype(np.uint64)
        s1 = (-(-hi // geo.subcluster_size)).astype(np.uint64)
        mask = ((_U64(1) << (s1 - s0)) - _U64(1)) << s0
        return (bitmaps | mask) & ~(mask << _U64(32))

    def _write_allocating(self, rows, ca, cb_, start, end, data, fresh: bool = False) -> None:
        """Clusters [ca, cb_) that need new host clusters: write, then relink.

        The new clusters hold the guest's bytes in full (COW: the parts not
        written are read from what the guest reads there now), except with
        extended L2 in place of clusters without data: only the touched
        subclusters are allocated (below), so only they are written and
        the rest of the host clusters stays a hole.
        Ordering (perform_cow / qcow2_alloc_cluster_link_l2): data is written
        to the new clusters, the L2 table depends on the refcounts that
        allocated them, and references to old clusters are dropped only once
        the L2 table no longer points at them. `fresh`: every descriptor of
        `rows` is 0 (unallocated, holding no reference), known to the caller.
        """
        geo = self.geo
        cb, cs = geo.cluster_bits, geo.cluster_size
        n = cb_ - ca
        owner = self.owner
        if self.has_data_file:
            host = ca << cb  # external data files map guest offsets 1:1
        else:
            host = owner.refcounts.alloc(n)
        entries = descriptors(rows).copy()
        if fresh:  # what cluster_types says of descriptors that are all 0
            types = np.full(n, CLUSTER_UNALLOCATED, dtype=np.int8)
        else:
            types = cluster_types(entries, geo.extended_l2, self.has_data_file)
        lo, hi = max(start, ca << cb), min(end, cb_ << cb)
        if geo.extended_l2 and not self.has_data_file and (types == CLUSTER_UNALLOCATED).all():
            span = self._subcluster_span(ca, cb_, start, end)
        else:
            span = (ca << cb, cb_ << cb)
        self._write_span(host - (ca << cb), lo, hi, span, start, data)
        self.l2_cache.set_dependency(owner.refcounts.blocks)
        new_entries = _U64(host | L.QCOW_OFLAG_COPIED) + np.arange(n, dtype=np.uint64) * _U64(cs)
        if geo.extended_l2:
            # A compressed cluster's data is copied whole; a cluster without
            # a host cluster keeps only its zero bits.
            bitmaps = rows[:, 1].copy()
            bitmaps[types == CLUSTER_COMPRESSED] = _U64(L.QCOW_L2_BITMAP_ALL_ALLOC)
            bitmaps[types == CLUSTER_UNALLOCATED] &= ~_U64(L.QCOW_L2_BITMAP_ALL_ALLOC)
            rows[:, 1] = self._touched_bitmaps(bitmaps, ca, cb_, start, end)
            rows[:, 0] = new_entries
        else:
            rows[:] = new_entries
        if not fresh:
            self._free_entries(entries)

    def _free_entries(self, entries: np.ndarray) -> None:
        """Drop the references old L2 entries held (QEMU's qcow2_free_any_cluster)."""
        self._free_runs([self._held_runs(entries)])

    def _held_runs(self, entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first host cluster, count) runs of the references `entries` hold:
        a normal or allocated zero cluster its host cluster, a compressed one
        every host cluster its bytes touch; none with an external data file
        (its clusters have no refcounts)."""
        empty = np.zeros(0, dtype=np.int64)
        if self.has_data_file or not entries.any():
            return empty, empty
        compressed = is_compressed(entries)
        any_compressed = bool(compressed.any())
        plain = host_offsets(entries)
        if any_compressed:
            plain = plain[~compressed]
        # Host offsets are below 2^56: the shifted values fit int64 as they are.
        clusters = (plain[plain != 0] >> _U64(self.geo.cluster_bits)).view(np.int64)
        cuts = np.flatnonzero(clusters[1:] != clusters[:-1] + 1) + 1
        starts = clusters[np.concatenate(([0], cuts))] if len(clusters) else empty
        counts = np.diff(np.concatenate(([0], cuts, [len(clusters)]))) if len(clusters) else empty
        if any_compressed:
            first, count = compressed_clusters(entries[compressed], self.geo)
            starts, counts = np.concatenate((starts, first)), np.concatenate((counts, count))
        return starts, counts

    def _free_runs(self, runs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Drop one reference to each host cluster of the (starts, counts) runs.

        Ordering: the caller has already changed the L2 entries in the cache;
        the refcount cache now depends on the L2 cache, so no lowered count
        reaches the disk before the L2 table that stopped pointing at the
        cluster (a crash leaks, never frees a cluster in use), and the freed
        clusters are not reused before a flush (refcount.py's pending_free).
        """
        starts = np.concatenate([s for s, _c in runs])
        if not len(starts):
            return
        counts = np.concatenate([c for _s, c in runs])
        self.owner.refcounts.blocks.set_dependency(self.l2_cache)
        self.owner.refcounts.change_runs(starts, counts, -1)

    def write_compressed_many(self, offset: int, compressed: list[bytes]) -> None:
        """Store compressed clusters for consecutive guest clusters from
        `offset` (cluster aligned) on.

        QEMU's qcow2_alloc_compressed_cluster_offset, once per cluster: only
        an unallocated cluster may be written compressed, and the bytes are
        placed by qcow2_alloc_bytes in order (Refcounts.alloc_bytes_many).
        Ordering: data, then the L2 entries, which depend on the refcounts
        of the bytes they point at.
        """
        geo = self.geo
        cb = geo.cluster_bits
        done = 0
        for l1_index, start, end in self._chunks(offset, len(compressed) << cb):
            n = (end - start) >> cb
            self._write_compressed_run(l1_index, start, compressed[done : done + n])
            done += n

    def _write_compressed_run(self, l1_index: int, start: int, compressed: list[bytes]) -> None:
        """write_compressed_many for clusters within one L2 table."""
        geo = self.geo
        owner = self.owner
        l2_offset, table = self.l2_for_write(l1_index)
        i0 = geo.offset_to_l2_index(start)
        n = len(compressed)
        rows = table[i0 : i0 + n]
        entries = descriptors(rows)
        # Compression never overwrites an allocated cluster (QEMU's
        # qcow2_alloc_compressed_cluster_offset).
        taken = np.flatnonzero(is_allocated(entries, geo.extended_l2, self.has_data_file))
        if len(taken):
            guest = start + (int(taken[0]) << geo.cluster_bits)
            raise CorruptImageError(
                f"Compressed write to an allocated cluster at guest offset {guest:#x}"
            )
        sizes = [len(c) for c in compressed]
        hosts = owner.refcounts.alloc_bytes_many(sizes)
        # One data write per run of back-to-back placements.
        a = 0
        for b in range(1, n + 1):
            if b == n or hosts[b] != hosts[b - 1] + sizes[b - 1]:
                pieces = compressed[a:b]
                owner.dataio.write_compressed(
                    hosts[a], pieces[0] if len(pieces) == 1 else b"".join(pieces)
                )
                a = b
        new = compressed_descriptors(hosts, sizes, geo)
        self.l2_cache.set_dependency(owner.refcounts.blocks)
        if geo.extended_l2:
            rows[:, 0] = new
            rows[:, 1] = _U64(0)
        else:
            rows[:] = new
        self.l2_cache.mark_dirty(l2_offset)

    # --- zeroes and discard ------------------------------------------------------

    def zero_clusters(self, offset: int, length: int, unmap: bool, backing: bool) -> None:
        """Mark whole clusters [offset, offset+length) as reading zeros (v3).

        QEMU's zero_in_l2_slice: with `unmap`, or where the cluster is shared,
        the host cluster is released and the entry becomes a plain zero
        cluster; otherwise the allocation is kept with the zero flag.
        """
        self._retype(offset, length, unmap=unmap, zero=True)

    def discard_clusters(self, offset: int, length: int, backing: bool) -> None:
        """Release whole clusters; afterwards they read as zeros.

        QEMU 7.2's discard_in_l2_slice for a discard request: an allocated
        cluster (data, compressed, or zero with an allocation), or any
        cluster over a backing file, becomes a zero cluster (version 3;
        extended L2: entry 0, every subcluster zero) or unallocated
        (version 2), and its reference is dropped; an unallocated or plain
        zero cluster without a backing file is left as it is.
        Ordering: as _rewrite_rows.
        """
        geo = self.geo
        v3 = self.owner.header.version >= 3

        def rewrite(rows: np.ndarray, entries: np.ndarray) -> np.ndarray | None:
            change = is_allocated(entries, geo.extended_l2, self.has_data_file)
            if backing:
                change[:] = True
            if not change.any():
                return None
            if geo.extended_l2:
                rows[change, 0] = _U64(0)
                rows[change, 1] = _U64(L.QCOW_L2_BITMAP_ALL_ZEROES)
            else:
                rows[change] = _ZERO if v3 else _U64(0)
            return change

        self._rewrite_rows(offset, length, backing, rewrite)

    def discard_full(self, offset: int, length: int) -> None:
        """QEMU's qcow2_cluster_discard with full_discard (a shrink): whole
        clusters [offset, offset+length) become unallocated, whatever they
        were, and their references are dropped. Ordering: as _rewrite_rows."""
        self._retype(offset, length, unmap=True, zero=False)

    def _retype(self, offset: int, length: int, unmap: bool, zero: bool) -> None:
        """Make whole clusters zero or unallocated, releasing their hosts.

        Ordering: as _rewrite_rows.
        """
        geo = self.geo

        def rewrite(rows: np.ndarray, entries: np.ndarray) -> np.ndarray:
            keep = np.zeros(len(entries), dtype=bool)
            if not unmap and not self.has_data_file:
                types = cluster_types(entries, geo.extended_l2, False)
                keep = writable_in_place(entries, types)
            if self.has_data_file and not unmap:
                keep = is_copied(entries)
            if geo.extended_l2:
                rows[:, 0] = np.where(keep, entries, _U64(0))
                rows[:, 1] = _U64(L.QCOW_L2_BITMAP_ALL_ZEROES if zero else 0)
            else:
                flag = _ZERO if zero else _U64(0)
                rows[:] = np.where(keep, (entries & (_OFFSET_MASK | _COPIED)) | flag, flag)
            return ~keep

        self._rewrite_rows(offset, length, zero, rewrite)

    def _rewrite_rows(self, offset: int, length: int, all_tables: bool, rewrite) -> None:
        """Apply `rewrite(rows, entries)` to the L2 rows of the whole clusters
        of [offset, offset+length): it changes `rows` in place and returns
        the mask of the old `entries` whose references go (None: it changed
        nothing). Unallocated L2 tables are skipped unless `all_tables`.

        Ordering: the new entries go into the cached L2 table first; the
        references are dropped after, all together (_free_runs), with the
        refcount cache depending on the L2 cache.
        """
        geo = self.geo
        dropped = []
        for l1_index, start, end in self._chunks(offset, length):
            if not all_tables and not self.l2_offset(l1_index):
                continue  # nothing mapped, nothing to change
            l2_offset, table = self.l2_for_write(l1_index)
            i0 = geo.offset_to_l2_index(start)
            rows = table[i0 : i0 + ((end - start) >> geo.cluster_bits)]
            entries = descriptors(rows).copy()
            gone = rewrite(rows, entries)
            if gone is None:
                continue
            self.l2_cache.mark_dirty(l2_offset)
            dropped.append(self._held_runs(entries[gone]))
        if dropped:
            self._free_runs(dropped)


class _Window:
    """The runs (_map_l2) of a window of an L2 table's range, and the
    table indices of its entries that fail a check (_bad_entries)."""

    __slots__ = ("runs", "starts", "bad")

    def __init__(self, runs: list[Extent], bad: list[int]):
        self.runs = runs
        self.starts = [run.offset for run in runs]
        self.bad = bad

    def cut(self, start: int, end: int, out: list[Extent]) -> None:
        """Append the runs of guest [start, end) (inside the window), as
        _map_l2 maps that range: the first clipped (a host offset moves
        with it, a compressed cluster's descriptor does not), the last cut
        short, the first merged with what `out` ends with if it continues it."""
        runs = self.runs
        i = bisect.bisect_right(self.starts, start) - 1
        run = runs[i]
        if run.offset < start:
            host = run.host
            if host and run.kind != COMPRESSED:
                host += start - run.offset
            run = Extent(run.kind, start, run.offset + run.length - start, host)
        append = _append  # the first run only may continue `out`'s last
        while run.offset + run.length < end:
            append(out, run)
            append = list.append
            i += 1
            run = runs[i]
        append(out, run._replace(length=end - run.offset))


def _append(out: list[Extent], ext: Extent) -> None:
    """Append, merging with the previous run where the two continue each other."""
    if out:
        prev = out[-1]
        if (
            prev.kind == ext.kind
            and prev.offset + prev.length == ext.offset
            and ext.kind != COMPRESSED
        ):
            if ext.kind != DATA or prev.host + prev.length == ext.host:
                if (
                    ext.kind == DATA
                    or prev.host == ext.host == 0
                    or (prev.host and prev.host + prev.length == ext.host)
                ):
                    out[-1] = Extent(prev.kind, prev.offset, prev.length + ext.length, prev.host)
                    return
    out.append(ext)


def _hex(value: int) -> str:
    """C's "%#x": 0 prints as "0"."""
    return f"{value:#x}" if value else "0"


def _source_contiguous(runs: list[tuple]) -> list[tuple[list, object, int]]:
    """(pieces, source, source_offset): (offset, data, source,
    source_offset) runs merged where one continues the last in the same
    source (their host clusters continue each other too: place_shared
    allocates them in one run)."""
    out: list[tuple[list, object, int]] = []
    end = None
    for _o, data, source, source_offset in runs:
        if out and out[-1][1] is source and end == source_offset:
            out[-1][0].append(data)
        else:
            out.append(([data], source, source_offset))
        end = source_offset + run_bytes(data)
    return out
