"""Backing chains as rebase and commit see them: the images of a chain,
finding one by name (QEMU's bdrv_find_backing_image) and the guest ranges
the layers above an image hold.

Written against the driver interface: an image's backing file is
`Driver.backing`, what it holds itself is `block_status` (UNALLOCATED
falls through to the backing file).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from qimg.driver import UNALLOCATED, Driver

READ_AHEAD = 4  # pieces read ahead of the one being written (read_ahead)

# Guest bytes block status is asked for at a time (a bound on list sizes).
STATUS_STEP = 1 << 30


def backing_name(image: Driver) -> str | None:
    """The backing file name as `image` stores it (None: none)."""
    header = getattr(image, "header", None)
    return getattr(header, "backing_file", None) if header is not None else None


def layers(image: Driver) -> list[Driver]:
    """`image` and every image below it, top first."""
    out = []
    node: Driver | None = image
    while node is not None:
        out.append(node)
        node = node.backing
    return out


def node_name(image: Driver) -> str:
    """The name QEMU gives `image`'s node (bdrv_refresh_filename): its
    json: name where it was opened with a key-secret; else, where its
    backing file has a json: name other than the one it stores (the
    backing file is overridden, by backing.encrypt.key-secret), a json:
    name that repeats the backing file's; else its file name."""
    import json

    own = image.filename
    below = image.backing
    if below is None:
        return own
    lower = node_name(below)
    if not lower.startswith("json:") or lower == backing_name(image):
        return own
    if own.startswith("json:"):
        node = json.loads(own[len("json:") :])
    else:
        node = {"driver": image.format_name, "file": {"driver": "file", "filename": own}}
    # QDict's order, as qemu-img prints such a name: "backing" first.
    return "json:" + json.dumps({"backing": json.loads(lower[len("json:") :]), **node})


def find_backing_image(image: Driver, name: str) -> Driver | None:
    """QEMU's bdrv_find_backing_image: the image below `image` that `name`
    names, or None. A name matches the backing file name an image stores,
    as written; else a path (not a json: or protocol name) names the file
    it resolves to, a relative one relative to the directory of the image
    that stores the name (not the working directory)."""
    from qimg.filenames import has_protocol
    from qimg.opening import resolve_backing_path

    plain = not name.startswith("json:") and not has_protocol(name)
    for parent in layers(image)[:-1]:
        child = parent.backing
        stored = backing_name(parent)
        if (
            plain
            and stored is not None
            and not has_protocol(stored)
            and not os.path.isabs(stored)
            and node_name(parent).startswith("json:")
        ):
            # Paths are compared resolved, and a relative name stored in
            # an image with a json: name (a key-secret) does not resolve.
            continue
        if stored is not None and stored == name:
            return child
        if plain and child is not None:
            wanted = resolve_backing_path(parent.filename, name)
            if os.path.exists(wanted) and os.path.realpath(wanted) == os.path.realpath(
                child.filename
            ):
                return child
    return None


def allocated_above(top: Driver, base: Driver | None, offset: int, length: int) -> list:
    """QEMU's bdrv_is_allocated_above(top, base): the [start, end) runs of
    guest [offset, offset+length) of `top` that an image above `base`
    decides (holds data or zeros for, or ends before: past the end of a
    shorter image below the top, reads are zeros whatever lies further
    down), merged and sorted."""
    runs: list[tuple[int, int]] = []
    end = offset + length
    node: Driver | None = top
    while node is not None and node is not base:
        if node is not top and node.size < end:
            runs.append((max(offset, node.size), end))
        stop = min(end, node.size)
        pos = offset
        while pos < stop:
            n = min(STATUS_STEP, stop - pos)
            runs += [
                (e.offset, e.offset + e.length)
                for e in node.block_status(pos, n)
                if e.kind != UNALLOCATED
            ]
            pos += n
        node = node.backing
    return merge_ranges(runs)


def merge_ranges(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) ranges sorted, overlapping and adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for start, stop in sorted(runs):
        if stop <= start:
            continue
        if out and start <= out[-1][1]:
            if stop > out[-1][1]:
                out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return out


def intersect_ranges(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The [start, end) ranges both sorted, disjoint lists cover."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def unallocated(image: Driver, offset: int, length: int) -> list[tuple[int, int]]:
    """[start, end) runs of guest [offset, offset+length) that `image`
    leaves to its backing file (QEMU's !bdrv_is_allocated)."""
    runs: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        n = min(STATUS_STEP, end - pos)
        runs += [
            (e.offset, e.offset + e.length)
            for e in image.block_status(pos, n)
            if e.kind == UNALLOCATED
        ]
        pos += n
    return merge_ranges(runs)


class HostRuns:
    """A chain's host_extents runs (sorted, disjoint), asked for the
    source of ranges in increasing order."""

    def __init__(self, runs: list[tuple]):
        self.runs = runs
        self.i = 0

    def source(self, start: int, end: int) -> tuple | None:
        """(storage, host) of guest [start, end) if one run holds it all."""
        runs = self.runs
        while self.i < len(runs) and runs[self.i][0] + runs[self.i][1] <= start:
            self.i += 1
        if self.i == len(runs):
            return None
        guest, n, storage, host = runs[self.i]
        if guest <= start and end <= guest + n:
            return storage, host + start - guest
        return None


def read_host(source: tuple, view: memoryview) -> None:
    """The bytes at `source` (storage, host offset) into `view`, zeros past
    the end of the file (as the image's own read gives them there)."""
    storage, host = source
    storage.pread_padded(host, view)


def read_padded(image: Driver, offset: int, view: memoryview) -> None:
    """Guest bytes of `image` into `view`; past its size (inside the last
    sector QEMU counts) they read as zeros."""
    n = max(0, min(len(view), image.size - offset))
    if n:
        image.readinto(offset, view[:n])
    if n < len(view):
        view[n:] = bytes(len(view) - n)


def read_ahead(pieces: Iterable, start_reads: Callable, depth: int = READ_AHEAD) -> Iterator:
    """(piece, start_reads(piece)) for each piece in order, with the reads
    of up to `depth` pieces started ahead of the one handed out (so they
    run while the caller writes it): the one pipeline commit and rebase
    run their chains through. Reads start in the caller's thread;
    `start_reads` submits them to its pool."""
    ahead: deque = deque()
    queued = iter(pieces)
    while True:
        while len(ahead) < depth:
            piece = next(queued, None)
            if piece is None:
                break
            ahead.append((piece, start_reads(piece)))
        if not ahead:
            return
        yield ahead.popleft()
