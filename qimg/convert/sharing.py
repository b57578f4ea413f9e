"""Shared extents: data runs placed by sharing the source's host extents.

Where the source holds a data run as it is (raw data, plain qcow2
clusters) and the target's storage can share extents with the source's
(XFS with reflink, btrfs: Storage.share_from), the writer hands the run to
the target's write_shared instead of write: the target places it as usual
(a qcow2 target allocates its host clusters in guest order, so a run maps
to one host range) and shares the source's blocks there instead of writing
the bytes. The bytes were read all the same: the zero scan decides what
is data, and only what it calls data is shared; where the storage cannot
share, they are written.

The first refusal (ext4, tmpfs, another file system) ends sharing for the
rest of the copy (`active`); the first run shared confirms it (`confirmed`).
Once confirmed, or from the start where sharing is expected (`expected`:
the files lie on one file system of a kind that shares), the pipeline
hands over chunks that lie as they are in one source run, scanned where
the source's storage maps them (SourceMaps: one mapping for many
chunks), not read: those are kept and written PENDING_RUNS
(PENDING_BYTES) at a time (Driver.write_shared_runs: a qcow2 target
allocates their clusters and updates its L2 table once for all), the
order of the writes kept.
"""

from __future__ import annotations

import bisect
import weakref

from qimg.convert.source import Concat
from qimg.driver import Driver
from qimg.errors import QimgError
from qimg.storage import Mapping, Storage

# Runs written together at most, and their bytes: the target's work per
# run (allocation, table update) is paid once per batch. The runs' data
# stays mapped until they are written (resident where the scan touched
# it: peak memory grows by up to PENDING_BYTES; 64 MiB measured +57 MiB;
# raw->qcow2 of bench_reflink's 1 GiB peaks at 97 MiB with 32 MiB).
PENDING_RUNS = 256
PENDING_BYTES = 32 << 20


class SharedWrites:
    """Writes of data runs into `tgt` that share `src`'s extents where
    they can. Runs are shared in whole `grain`s of the target (what it
    allocates at once: a part would be widened by a copy-on-write)."""

    def __init__(self, src: Concat, tgt: Driver, grain: int):
        self.src = src
        self.tgt = tgt
        self.grain = grain
        self.active = True
        self.confirmed = False
        # (offset, data, storage, host) runs whose write is still to come
        # (in order, before any later write): each is a whole item, of
        # whole grains, that the source holds as it is.
        self._pending: list[tuple[int, object, Storage, int]] = []
        self._pending_bytes = 0

    def write(self, offset: int, data, source: tuple | None = None) -> None:
        """tgt.write(offset, data), sharing what the source holds as it is;
        `source`, where known, is a run of the source (source_runs) that
        holds all of it. A write may be kept for later (see flush)."""
        if source is not None and self.active:
            g, _n, storage, host = source
            runs = cut_runs([(offset, len(data), storage, host + offset - g)], self.grain)
            if len(runs) == 1 and runs[0][0] == offset and runs[0][1] == len(data):
                self._pending.append((offset, data, storage, runs[0][3]))
                self._pending_bytes += len(data)
                if len(self._pending) >= PENDING_RUNS or self._pending_bytes >= PENDING_BYTES:
                    self.flush()
                return
        self.flush()
        if not self.active:
            self.tgt.write(offset, data)
            return
        if source is None:
            runs = source_runs(self.src, offset, len(data), self.grain)
        pos = offset
        for start, length, storage, host in runs:
            if start > pos:
                self.tgt.write(pos, data[pos - offset : start - offset])
            piece = data[start - offset : start + length - offset]
            pos = start + length
            shared = self.tgt.write_shared(start, piece, storage, host)
            if shared is False:
                self.active = False
                break
            self.confirmed = self.confirmed or bool(shared)
        if pos < offset + len(data):
            self.tgt.write(pos, data[pos - offset :])

    def flush(self) -> None:
        """Write the pending runs (all of them, shared where the target
        can). An error names the first run's offset (`write_offset`)."""
        runs, self._pending, self._pending_bytes = self._pending, [], 0
        if not runs:
            return
        try:
            shared = self.tgt.write_shared_runs(runs)
        except QimgError as exc:
            exc.write_offset = runs[0][0]
            raise
        if shared is False:
            self.active = False
        self.confirmed = self.confirmed or bool(shared)


def source_runs(src: Concat, offset: int, length: int, grain: int) -> list[tuple]:
    """(offset, length, storage, host) runs of guest [offset,
    offset+length) that the source images hold as they are, cut to whole
    multiples of `grain` in the guest and merged where they continue each
    other in one storage.

    The source's runs are looked up a WINDOW at a time and kept (the
    source does not change during a copy): a chunk's runs are the window's
    cut to the chunk, not a lookup (SEEK_DATA/SEEK_HOLE, L2 tables) each."""
    end = offset + length
    window = _windows.get(src)
    if window is None or not window[0] <= offset <= end <= window[1]:
        stop = min(max(end, offset + WINDOW), src.size)
        runs = _host_runs(src, offset, stop - offset)
        window = _windows[src] = (offset, stop, [run[0] for run in runs], runs)
    _lo, _hi, starts, runs = window
    out: list[tuple[int, int, Storage, int]] = []
    for g, n, storage, host in runs[max(0, bisect.bisect_right(starts, offset) - 1) :]:
        if g >= end:
            break
        a, b = max(g, offset), min(g + n, end)
        if a < b:
            out.append((a, b - a, storage, host + a - g))
    return cut_runs(out, grain)


# Guest bytes of the source whose runs are looked up at once (source_runs).
WINDOW = 64 << 20
# Each source's last window: (start, end, run starts, runs).
_windows: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _host_runs(src: Concat, offset: int, length: int) -> list[tuple[int, int, Storage, int]]:
    """The source images' host_extents of guest [offset, offset+length),
    in guest order."""
    runs: list[tuple[int, int, Storage, int]] = []
    end = offset + length
    for start, stop, image in src.spans():
        lo, hi = max(offset, start), min(end, stop, start + image.size)
        if lo < hi:
            runs += [(g + start, n, s, h) for g, n, s, h in image.host_extents(lo - start, hi - lo)]
    return runs


def cut_runs(runs: list[tuple], grain: int) -> list[tuple]:
    """(offset, length, storage, host) runs cut to whole multiples of
    `grain` in the guest, merged where they continue each other."""
    out: list[tuple[int, int, Storage, int]] = []
    for g, n, storage, host in runs:
        a = -(-g // grain) * grain
        b = (g + n) // grain * grain
        if b <= a:
            continue
        host += a - g
        last = out[-1] if out else None
        if last and last[2] is storage and last[0] + last[1] == a and last[3] + last[1] == host:
            out[-1] = (last[0], last[1] + b - a, storage, last[3])
        else:
            out.append((a, b - a, storage, host))
    return out


def expected(src: Concat, tgt: Driver) -> bool:
    """Whether `tgt`'s data is expected to share the extents of every
    source image's data (Storage.may_share_with): the copy then maps what
    it scans from its first chunk on instead of reading it until a first
    run is shared. Never for a driver that cannot share (the default
    write_shared)."""
    target = _data_storage(tgt)
    if target is None or type(tgt).write_shared is Driver.write_shared:
        return False
    for _start, image in src.parts:
        source = _data_storage(image)
        if source is None or not target.may_share_with(source):
            return False
    return True


def _data_storage(image: Driver) -> Storage | None:
    """The storage holding an image's guest data (a qcow2 image's data
    file, a raw image's file), where it has one."""
    storage = getattr(image, "data_storage", None) or getattr(image, "storage", None)
    return storage if isinstance(storage, Storage) else None


# Host bytes of a source's storage mapped at once (SourceMaps). The pages
# scanned stay resident while the mapping lives (until the last chunk's
# data cut from it is written): peak memory grows by up to this much.
MAP_WINDOW = 32 << 20


class SourceMaps:
    """Views of the sources' storages for the chunks the producer scans
    where they lie, cut from one mapping (Storage.mapping) of MAP_WINDOW
    bytes at a time per storage instead of one mmap (and the file size
    check) per chunk. A mapping goes with the last view of it."""

    def __init__(self):
        self._last: dict[int, tuple[Storage, Mapping]] = {}  # id(storage) -> its mapping

    def view(self, storage: Storage, host: int, length: int) -> memoryview | None:
        """[host, host+length) of `storage`, mapped; None where it cannot
        be (the caller reads it instead)."""
        last = self._last.get(id(storage))
        if last is not None:
            view = last[1].view(host, length)
            if view is not None:
                return view
        size = max(length, min(MAP_WINDOW, storage.size() - host))
        mapping = storage.mapping(host, size)
        if mapping is None:
            return None
        self._last[id(storage)] = (storage, mapping)
        return mapping.view(host, length)
