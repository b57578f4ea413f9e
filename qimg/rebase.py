"""Changing an image's backing file (qemu-img rebase).

Safe mode keeps what the guest reads: every range the overlay leaves to its
backing file and where the old and the new backing chains read differently
is first copied into the overlay (the old chain's bytes), then the header
names the new backing file. Unsafe mode (-u) rewrites the header only.
An empty new name removes the backing file (safe mode: the overlay then
holds everything the old chain gave it).

Written against the driver interface (block status, reads through the
chain, writes); the header change is the qcow2 header writer's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from qimg.chain import READ_AHEAD, read_ahead, read_host, read_padded
from qimg.driver import Driver
from qimg.errors import BadOptionError, ImageLockedError, QimgError

# Guest bytes compared per step (one buffer of each chain), reader
# threads, steps read ahead.
CHUNK = 4 << 20
READERS = 2
# The unit compared and copied: QEMU compares 512-byte sectors.
SECTOR = 512
# QEMU's limit on a backing file name (qcow2_change_backing_file).
MAX_BACKING_NAME = 1023

Progress = Callable[[int, int], None]


class RebaseError(QimgError):
    """Raised when: the backing file cannot be changed as asked (qemu-img's
    "Could not change the backing file to ..." messages)."""


def rebase_image(
    image: Driver,
    backing: str | None,
    backing_fmt: str | None = None,
    *,
    unsafe: bool = False,
    force_share: bool = False,
    cache=None,
    progress: Progress | None = None,
    secrets: Mapping[str, bytes] | None = None,
) -> None:
    """Make `backing` the backing file of `image` (opened writable; with its
    backing chain unless `unsafe`). `backing` is the name as the header is
    to store it (relative names are relative to the image's directory);
    None or "" removes the backing file. `backing_fmt` is -F: qemu-img 7.2
    refuses a new backing file without it. `cache` is -T, the new backing
    chain's cache mode (qimg.cachemode; writeback when None). `secrets`
    (the --object secrets by id) serve the new backing chain's names.

    Everything refused is refused before anything is written (qemu-img 7.2
    copies the differing data first and fails on the header change)."""
    if backing_fmt is not None:
        from qimg.opening import FORMATS

        if backing_fmt not in FORMATS:
            raise BadOptionError(f"Invalid format name: '{backing_fmt}'")
    new: Driver | None = None
    opened = False
    try:
        if not unsafe and backing:
            new, opened = _new_backing(image, backing, backing_fmt, force_share, cache, secrets)
        _check_header_change(image, backing, backing_fmt)
        if not unsafe:
            copy_differences(image, new, progress)
            image.flush()
        _change_backing_file(image, backing, backing_fmt)
    finally:
        if opened and new is not None:
            new.close()


def _new_backing(
    image: Driver,
    backing: str,
    backing_fmt: str | None,
    force_share: bool,
    cache,
    secrets: Mapping[str, bytes] | None,
) -> tuple[Driver, bool]:
    """The new backing image: the image of the old chain that `backing`
    names (QEMU reuses it), else the file opened with its own chain;
    and whether it was opened here."""
    from qimg.api import open_image
    from qimg.chain import find_backing_image, node_name
    from qimg.filenames import has_protocol
    from qimg.opening import resolve_backing_path

    named = node_name(image)
    if named.startswith("json:") and not (
        os.path.isabs(backing) or backing.startswith("json:") or has_protocol(backing)
    ):
        # bdrv_get_full_backing_filename_from_filename: a json: name (an
        # image or its backing file opened with a key-secret) has no
        # directory to resolve in.
        raise RebaseError(
            "Could not resolve backing filename: "
            f"Cannot use relative backing file names for '{named}'"
        )
    real = resolve_backing_path(image.filename, backing)
    found = find_backing_image(image, os.path.abspath(real) if "://" not in real else real)
    if found is not None:
        return found, False
    try:
        opened = open_image(
            real, backing_fmt, force_share=force_share, cache=cache, secrets=secrets
        )
    except QimgError as exc:
        text = str(exc)
        own = f"Could not open '{real}': "
        if isinstance(exc, ImageLockedError) and text.startswith(own):
            text = text[len(own) :]  # QEMU's lock errors name no file here
        exc.args = (f"Could not open new backing file '{backing}': {text}",)
        raise
    try:
        _refuse_loop(image, opened, backing, force_share)
    except BaseException:
        opened.close()
        raise
    return opened, True


def _refuse_loop(image: Driver, new: Driver, backing: str, force_share: bool) -> None:
    """A new backing chain that holds the overlay would make a loop. QEMU
    meets its own lock on the overlay there (opened read-write), unless -U
    lets it share the file: then it writes the loop. qimg refuses both, in
    the lock's words without -U."""
    from qimg.chain import layers

    mine = os.path.realpath(image.filename)
    for depth, node in enumerate(layers(new)):
        if os.path.realpath(node.filename) != mine:
            continue
        prefix = f"Could not open new backing file '{backing}': " + (
            "Could not open backing file: " * depth
        )
        if force_share:
            raise RebaseError(prefix + f"Backing file '{node.filename}' creates an infinite loop.")
        raise ImageLockedError(
            prefix + 'Failed to get shared "write" lock\n'
            f"Is another process using the image [{node.filename}]?"
        )


def _check_header_change(image: Driver, backing: str | None, backing_fmt: str | None) -> None:
    """bdrv_change_backing_file's refusals, in qemu-img's words."""
    shown = "(null)" if backing is None else backing
    if image.format_name != "qcow2":
        raise RebaseError(
            f"Could not change the backing file to '{shown}': Operation not supported"
        )
    if backing and not backing_fmt:
        raise RebaseError(
            f"Could not change the backing file to '{backing}': backing format must be specified"
        )
    if backing and len(backing.encode()) > MAX_BACKING_NAME:
        raise RebaseError(f"Could not change the backing file to '{backing}': Invalid argument")
    header = _new_header(image, backing, backing_fmt)
    try:
        header.pack(image.cluster_bytes)
    except QimgError:
        raise RebaseError(
            f"Could not change the backing file to '{shown}': No space left in the file header"
        ) from None


def _new_header(image: Driver, backing: str | None, backing_fmt: str | None):
    header = image.header.copy()
    header.backing_file = backing or None
    header.backing_format = backing_fmt if backing else None
    return header


def _change_backing_file(image: Driver, backing: str | None, backing_fmt: str | None) -> None:
    """Ordering: the copied data is durable (flushed) before the header,
    one write in cluster 0, names the new backing file."""
    image.header.backing_file = backing or None
    image.header.backing_format = backing_fmt if backing else None
    image.rewrite_header()


def copy_differences(image: Driver, new: Driver | None, progress: Progress | None = None) -> int:
    """Copy into `image` the old chain's bytes (image.backing) wherever
    `image` leaves a range to its backing file and `new` (None: no backing
    file) reads differently; returns the bytes written. Where `new` is an
    image of the old chain, only what the images above it hold can differ.
    Past the end of a backing file its bytes are zeros; where the old chain
    has ended, the copy is a zero write (as QEMU writes it).

    Only ranges where either chain holds data (block status) are read;
    READERS threads read both chains ahead of the comparison and the
    writes (this thread; the reads never touch `image` itself)."""
    old = image.backing
    size = image.size
    pieces = _plan(image, old, new)
    written = 0
    image.stream_writes()  # rebase_image flushes `image` after the copy
    # Buffers of each piece's exact length (compared as a whole, in one
    # memcmp), reused: fresh memory costs a page fault per page.
    spare: dict[int, list[tuple[bytearray, bytearray]]] = {}
    with ThreadPoolExecutor(READERS) as pool:

        def start_reads(piece: _Piece):
            n = piece.end - piece.start
            kept = spare.get(n)
            bufs = kept.pop() if kept else (bytearray(n), bytearray(n))
            return bufs, [
                pool.submit(_read, node, piece, buf, source)
                for node, buf, source in zip((old, new), bufs, piece.sources)
            ]

        for (lo, hi, done, _sources), (bufs, reads) in read_ahead(pieces, start_reads):
            mine, theirs = (r.result() for r in reads)
            if mine != theirs:
                written += _write_differences(image, old, lo, mine, theirs)
            if sum(map(len, spare.values())) <= READ_AHEAD:
                spare.setdefault(hi - lo, []).append(bufs)
            if progress is not None:
                progress(done, size)
    return written


class _Piece(NamedTuple):
    """A range to compare, at most CHUNK long; `done`: the guest bytes of
    the image dealt with after it; `sources`: for the old and the new
    chain, (storage, host offset) where one image of it holds the range
    as plain data at following host offsets (read there, not mapped again
    through the chain), else None."""

    start: int
    end: int
    done: int
    sources: tuple


def _plan(image: Driver, old: Driver | None, new: Driver | None) -> list[_Piece]:
    """The ranges to compare: what `image` leaves to its backing file
    (with `new` in the old chain, what the images above it decide), where
    either chain holds data. Block status and host extents are asked once
    per window of each chain."""
    from qimg.chain import (
        STATUS_STEP,
        HostRuns,
        allocated_above,
        intersect_ranges,
        merge_ranges,
        unallocated,
    )

    size = image.size
    targets = unallocated(image, 0, size)
    if new is not None and _in_chain(image, new):
        above = allocated_above(old, new, 0, size) if old is not None else []
        targets = intersect_ranges(targets, above)
    out: list[_Piece] = []
    for w in range(0, size, STATUS_STEP):
        inside = intersect_ranges(targets, [(w, min(size, w + STATUS_STEP))])
        if not inside:
            continue
        lo, hi = inside[0][0], inside[-1][1]
        data = merge_ranges(_data_runs(old, lo, hi) + _data_runs(new, lo, hi))
        hosts = [HostRuns(_host_runs(node, lo, hi)) for node in (old, new)]
        for a, b in intersect_ranges(data, inside):
            for p in range(a, b, CHUNK):
                e = min(b, p + CHUNK)
                out.append(_Piece(p, e, e, tuple(h.source(p, e) for h in hosts)))
    return out


def _host_runs(node: Driver | None, lo: int, hi: int) -> list[tuple]:
    """host_extents of `node`'s chain in guest [lo, hi) (inside its size)."""
    if node is None or lo >= node.size:
        return []
    return node.host_extents(lo, min(hi, node.size) - lo)


def _data_runs(node: Driver | None, lo: int, hi: int) -> list[tuple[int, int]]:
    """[start, end) runs of guest [lo, hi) where `node`'s chain holds data
    (anything else reads as zeros: zero clusters, nothing, past its end)."""
    if node is None or lo >= node.size:
        return []
    hi = min(hi, node.size)
    return [(s, s + n) for s, n, is_data, _z in node.allocated_extents(lo, hi - lo) if is_data]


def _in_chain(image: Driver, node: Driver) -> bool:
    below = image.backing
    while below is not None:
        if below is node:
            return True
        below = below.backing
    return False


def _write_differences(
    image: Driver, old: Driver | None, pos: int, mine: bytearray, theirs: bytearray
) -> int:
    """Write into `image` the 512-byte sectors of guest [pos, pos+len)
    where the old chain's bytes `mine` differ from the new one's."""
    import numpy as np

    from qimg.convert.scan import Blocks, differing_blocks, state_runs

    n = len(mine)
    blocks = Blocks.cut(pos, n, SECTOR)
    a = np.frombuffer(mine, dtype=np.uint8)
    b = np.frombuffer(theirs, dtype=np.uint8)
    differ = differing_blocks(a, b, blocks).astype(np.int8)
    old_end = old.size if old is not None else 0
    written = 0
    for lo, hi, state in state_runs(blocks, differ):
        if not state:
            continue
        # Past the old chain's end QEMU writes zeros (blk_pwrite_zeroes).
        split = min(max(pos + lo, old_end), pos + hi)
        if split > pos + lo:
            image.write(pos + lo, memoryview(mine)[lo : split - pos])
        if pos + hi > split:
            image.write_zeroes(split, pos + hi - split)
        written += hi - lo
    return written


def _read(node: Driver | None, piece: _Piece, buf: bytearray, source: tuple | None) -> bytearray:
    """Guest [start, end) of `node`'s chain into `buf` (as long), zeros
    past its end; read at `source` where the piece has one there."""
    view = memoryview(buf)
    if source is not None:
        read_host(source, view)
    elif node is None:
        view[:] = bytes(len(view))
    else:
        read_padded(node, piece.start, view)
    return buf
