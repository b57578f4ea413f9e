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
"""

from __future__ import annotations

from qimg.convert.source import Concat
from qimg.driver import Driver
from qimg.storage import Storage


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

    def write(self, offset: int, data, source: tuple | None = None) -> None:
        """tgt.write(offset, data), sharing what the source holds as it is;
        `source`, where known, is a run of the source (source_runs) that
        holds all of it."""
        if not self.active:
            self.tgt.write(offset, data)
            return
        if source is not None:
            g, _n, storage, host = source
            runs = cut_runs([(offset, len(data), storage, host + offset - g)], self.grain)
        else:
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


def source_runs(src: Concat, offset: int, length: int, grain: int) -> list[tuple]:
    """(offset, length, storage, host) runs of guest [offset,
    offset+length) that the source images hold as they are, cut to whole
    multiples of `grain` in the guest and merged where they continue each
    other in one storage."""
    runs: list[tuple[int, int, Storage, int]] = []
    end = offset + length
    for start, stop, image in src.spans():
        lo, hi = max(offset, start), min(end, stop, start + image.size)
        if lo < hi:
            runs += [(g + start, n, s, h) for g, n, s, h in image.host_extents(lo - start, hi - lo)]
    return cut_runs(runs, grain)


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
