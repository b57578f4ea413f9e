"""`qemu-img bitmap`: add, remove, clear, enable, disable and merge persistent
dirty bitmaps (QEMU's block-dirty-bitmap-* commands on a qcow2 image), and
the list of an image's bitmaps with their dirty byte counts.

- `plan_actions`: the actions replayed on a model of the bitmap, checked
  in qemu-img's order and words; nothing is written while any can fail.
- `apply_plan`: the one write of the result, crash-safe as QEMU stores
  bitmaps: new data clusters, then the new bitmap table, then a new
  directory, each durable before the next; then the header extension;
  only then are the old directory, table and data freed. A crash leaks
  clusters at worst; the image keeps the old bitmaps or has the new ones.
- `list_bitmaps`: name, granularity, flags and dirty bytes of each bitmap.

Bits are handled in windows of guest bytes, whole-array (numpy): a window
maps to whole bytes of every bitmap involved and to at most a few MiB of
bits, so memory stays bounded whatever the bitmap's size.

Unlike qemu-img 7.2, which applies each action as it comes (the ones before
a failing action stay applied) and rewrites every bitmap of the image on
close, qimg writes only the bitmap that changes, and only if all succeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qimg.errors import QimgError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.bitmap import (
    BitmapEntry,
    _bitmap_bytes,
    _dir_entry_size,
    _granules,
    _loaded,
    _pack_directory,
    _table_size,
    has_bitmaps,
    load_bitmap_table,
    pread_padded,
    read_bitmap_directory,
    storing_refused,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ACTIONS",
    "Action",
    "BitmapPlan",
    "apply_plan",
    "default_granularity",
    "list_bitmaps",
    "plan_actions",
]

ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")

# Bits of the finest bitmap handled in one window (2 MiB of bytes; 16 MiB
# once unpacked to convert between granularities).
_WINDOW_BITS = 1 << 24


@dataclass(frozen=True)
class Action:
    """One action of qemu-img bitmap: `kind` is one of ACTIONS; `source`
    names the bitmap a merge reads (in the source image)."""

    kind: str
    source: str | None = None


@dataclass
class _Target:
    """The bitmap named by the command, as the actions leave it."""

    entry: BitmapEntry | None  # its directory entry on disk; None: added by the actions
    granularity_bits: int
    enabled: bool
    inconsistent: bool
    reset: bool = False  # bits start from zero, not from the entry's data
    sources: list[tuple[object, BitmapEntry]] = field(default_factory=list)  # ORed in


@dataclass
class BitmapPlan:
    """What `apply_plan` writes: the target's final state (None: removed),
    and the on-disk entry it replaces (None: none)."""

    name: str
    old: BitmapEntry | None
    new: _Target | None
    directory: list[BitmapEntry] = field(default_factory=list)  # as read when planned

    @property
    def changes(self) -> bool:
        t, e = self.new, self.old
        if t is None or e is None:
            return t is not None or e is not None
        if t.entry is not e:
            return True  # removed, then added again
        return t.reset or bool(t.sources) or t.enabled != bool(e.flags & L.BME_FLAG_AUTO)


def default_granularity(image) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity: the cluster size, within 4 KiB..64 KiB."""
    cs = getattr(getattr(image, "geo", None), "cluster_size", 0)
    return min(65536, max(4096, cs)) if cs else 65536


def _can_store(image) -> bool:
    return image.format_name == "qcow2"


def _directory(image) -> list[BitmapEntry]:
    if image.format_name != "qcow2" or not has_bitmaps(image):
        return []
    return read_bitmap_directory(image)


def _by_name(entries: list[BitmapEntry]) -> dict[str, BitmapEntry]:
    """The bitmaps QEMU loads (in-use ones too), by name."""
    return {e.name: e for e in _loaded(entries)}


def _fail(op: str, name: str, message: str) -> QimgError:
    return QimgError(f"Operation {op} on bitmap {name} failed: {message}")


def _not_found(name: str) -> str:
    return f"Dirty bitmap '{name}' not found"


def _inconsistent(name: str) -> str:
    return (
        f"Bitmap '{name}' is inconsistent and cannot be used\n"
        "Try block-dirty-bitmap-remove to delete this bitmap from disk"
    )


def plan_actions(
    image,
    name: str,
    actions: list[Action],
    granularity: int = 0,
    source_image=None,
) -> BitmapPlan:
    """Replay `actions` on bitmap `name` of `image` (opened read-write),
    checking each as QEMU does (qmp_block_dirty_bitmap_*), in order; the
    first failure raises with qemu-img's message. `granularity` is -g as
    given (0: QEMU's default); merges read `source_image` (default `image`)."""
    directory = _directory(image)
    loaded = _by_name(directory)
    entry = loaded.get(name)
    target = None if entry is None else _entry_target(entry)
    others = loaded if source_image is None else _by_name(_directory(source_image))
    for act in actions:
        if act.kind == "add":
            _check_add(image, name, granularity, target, [n for n in loaded if n != name])
            gb = _granularity_bits(image, granularity)
            target = _Target(None, gb, enabled=True, inconsistent=False, reset=True)
            continue
        if target is None:
            raise _fail(act.kind, name, _not_found(name))
        if act.kind == "remove":
            target = None
        elif act.kind == "merge":
            _merge_into(image, name, target, act.source, others, source_image)
        elif target.inconsistent:
            raise _fail(act.kind, name, _inconsistent(name))
        elif act.kind == "clear":
            target.reset, target.sources = True, []
        else:
            target.enabled = act.kind == "enable"
    return BitmapPlan(name, entry, target, directory)


def _entry_target(e: BitmapEntry) -> _Target:
    return _Target(
        e, e.granularity_bits, bool(e.flags & L.BME_FLAG_AUTO), bool(e.flags & L.BME_FLAG_IN_USE)
    )


def _granularity_bits(image, granularity: int) -> int:
    g = granularity & 0xFFFFFFFF if granularity else default_granularity(image)
    return g.bit_length() - 1


def _check_add(image, name: str, granularity: int, target, others: list[str]) -> None:
    """qmp_block_dirty_bitmap_add with persistent=on, its checks in order."""

    def fail(message: str) -> QimgError:
        return _fail("add", name, message)

    if not name:
        raise fail("Bitmap name cannot be empty")
    # qemu-img passes -g as uint32: 4 GiB + 512 is 512, 4 GiB is 0 (refused).
    g = granularity & 0xFFFFFFFF if granularity else default_granularity(image)
    if g < 512 or g & (g - 1):
        raise fail("Granularity must be power of 2 and at least 512")
    if not _can_store(image):
        raise fail(f"Can't store persistent bitmaps to {image.filename}: Operation not supported")
    if target is not None:
        raise fail(f"Bitmap already exists: {name}")
    reason = _cannot_store(image, name, g.bit_length() - 1, others)
    if reason:
        raise fail(f"Can't make bitmap '{name}' persistent in '{image.filename}': {reason}")


def _cannot_store(image, name: str, gb: int, others: list[str]) -> str | None:
    """qcow2_co_can_store_new_dirty_bitmap (`others`: the names of the
    image's other bitmaps)."""
    if image.header.version < 3:
        return "Cannot store dirty bitmaps in qcow2 v2 files"
    dir_size = sum(_dir_entry_size(n.encode(), b"") for n in others)
    return storing_refused(image, name, gb, len(others), dir_size)


def _merge_into(image, name, target, source, others, source_image) -> None:
    """block_dirty_bitmap_merge's checks, in the order qemu-img 7.2 reports
    them: the source exists, the target is consistent, the source is, the
    sizes agree."""
    same = source_image is None
    if same and source == name:
        src = None  # the target itself: ORing it in changes nothing
    else:
        src = others.get(source)
        if src is None:
            raise _fail("merge", name, _not_found(source))
    if target.inconsistent:
        raise _fail("merge", name, _inconsistent(name))
    if src is None:
        return
    if src.flags & L.BME_FLAG_IN_USE:
        raise _fail("merge", name, _inconsistent(source))
    src_image = image if same else source_image
    if src_image.size != image.size:
        raise _fail(
            "merge",
            name,
            f"Bitmaps are of different sizes (destination size is {image.size}, source size "
            f"is {src_image.size}) and can't be merged",
        )
    target.sources.append((src_image, src))


# --- bits, window by window -------------------------------------------------------------


class _Reader:
    """Bytes of one consistent bitmap's bits, read by byte range."""

    def __init__(self, image, e: BitmapEntry):
        import numpy as np

        self.image = image
        self.gb = e.granularity_bits
        self.nbytes = _bitmap_bytes(image.size, e.granularity_bits)
        table = load_bitmap_table(image, e)
        self.offsets = table & np.uint64(L.BME_TABLE_ENTRY_OFFSET_MASK)
        self.ones = (self.offsets == 0) & (
            (table & np.uint64(L.BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0
        )

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Bytes [lo, hi) of the bits (zeros past the bitmap's end)."""
        import numpy as np

        out = np.zeros(hi - lo, dtype=np.uint8)
        cs = self.image.geo.cluster_size
        hi_in = min(hi, self.nbytes)
        if hi_in <= lo:
            return out
        first, last = lo // cs, (hi_in - 1) // cs + 1
        offsets = self.offsets[first:last]
        for i in np.flatnonzero(self.ones[first:last]):
            a = max(lo, (first + int(i)) * cs)
            b = min(hi_in, (first + int(i) + 1) * cs)
            out[a - lo : b - lo] = 0xFF
        data = np.flatnonzero(offsets)
        if not len(data):
            return out
        # Runs of table entries whose clusters follow each other on disk: one read each.
        breaks = np.flatnonzero(
            (np.diff(data) != 1) | (np.diff(offsets[data].astype(np.int64)) != cs)
        )
        starts = np.concatenate(([0], breaks + 1))
        ends = np.concatenate((breaks + 1, [len(data)]))
        for s, t in zip(starts.tolist(), ends.tolist()):
            i0, i1 = first + int(data[s]), first + int(data[t - 1]) + 1
            a, b = max(lo, i0 * cs), min(hi_in, i1 * cs)
            host = int(offsets[data[s]]) + (a - i0 * cs)
            raw = pread_padded(self.image, host, b - a)
            out[a - lo : b - lo] = np.frombuffer(raw, dtype=np.uint8)
        return out


def _regranulate(bits: np.ndarray, from_gb: int, to_gb: int) -> np.ndarray:
    """Bits at one granularity as bits at another, as QEMU's hbitmap merge
    sets them: a coarse granule dirty makes every finer granule it covers
    dirty; a fine granule dirty makes the coarse granule holding it dirty."""
    import numpy as np

    if from_gb == to_gb:
        return bits
    if from_gb < to_gb:
        return _coarsen(bits, 1 << (to_gb - from_gb))
    flags = np.unpackbits(bits, bitorder="little")
    return np.packbits(np.repeat(flags, 1 << (from_gb - to_gb)), bitorder="little")


def _coarsen(bits: np.ndarray, k: int) -> np.ndarray:
    """Each run of `k` bits (k a power of two) ORed into one bit, working on
    whole bytes and words rather than on unpacked bits."""
    import numpy as np

    if k >= 8:
        per = k // 8  # bytes of fine bits per coarse bit
        padded = np.zeros(-(-len(bits) // per) * per, dtype=np.uint8)
        padded[: len(bits)] = bits
        word = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(per, np.uint64)
        words = padded.view(word) != 0
        if per > 8:
            words = words.reshape(-1, per // 8).any(axis=1)
        return np.packbits(words, bitorder="little")
    # k in (2, 4): each byte gives 8 // k coarse bits; k bytes make one byte.
    shift = 8 // k
    lut = np.zeros(256, dtype=np.uint8)
    for value in range(256):
        lut[value] = sum(1 << j for j in range(shift) if (value >> (j * k)) & ((1 << k) - 1))
    padded = np.zeros(-(-len(bits) // k) * k, dtype=np.uint8)
    padded[: len(bits)] = bits
    coarse = lut[padded].reshape(-1, k)
    out = np.zeros(len(coarse), dtype=np.uint8)
    for j in range(k):
        out |= coarse[:, j] << np.uint8(j * shift)
    return out


class _Writer:
    """Writes bits, given in order window by window, to new data clusters
    (only clusters with a bit set, as QEMU's store_bitmap), then the table."""

    def __init__(self, image, gb: int):
        import numpy as np

        self.image = image
        self.cs = image.geo.cluster_size
        self.nbytes = _bitmap_bytes(image.size, gb)
        self.nbits = _granules(image.size, gb)
        self.table = np.zeros(_table_size(image.size, gb, self.cs), dtype=np.uint64)
        self.pending = np.zeros(0, dtype=np.uint8)
        self.done = 0  # bytes of bits handed to clusters so far
        self.allocated: list[tuple[int, int]] = []  # (offset, clusters), freed on failure

    def put(self, chunk: np.ndarray) -> None:
        import numpy as np

        chunk = chunk[: max(0, self.nbytes - self.done - len(self.pending))]
        self.pending = np.concatenate((self.pending, chunk))
        whole = len(self.pending) // self.cs * self.cs
        if whole:
            self._emit(self.pending[:whole])
            self.pending = self.pending[whole:].copy()

    def _emit(self, data: np.ndarray) -> None:
        import numpy as np

        end = self.done + len(data)
        if end * 8 > self.nbits:  # bits past the last granule stay clear
            keep = self.nbits - self.done * 8
            data = data.copy()
            full, rest = keep >> 3, keep & 7
            if rest:
                data[full] &= (1 << rest) - 1
                full += 1
            data[full:] = 0
        clusters = data.reshape(-1, self.cs)
        used = np.flatnonzero(clusters.any(axis=1))
        if len(used):
            offset = self.image.refcounts.alloc(len(used))
            self.allocated.append((offset, len(used)))
            index = self.done // self.cs + used
            ramp = np.arange(len(used), dtype=np.uint64) * np.uint64(self.cs)
            self.table[index] = np.uint64(offset) + ramp
            self.image.write_metadata(offset, clusters[used].tobytes(), "bitmap")
        self.done = end

    def finish(self) -> tuple[int, int]:
        """Write what is pending and the table; (table offset, table size)."""
        import numpy as np

        if len(self.pending):
            pad = np.zeros(-len(self.pending) % self.cs, dtype=np.uint8)
            self._emit(np.concatenate((self.pending, pad)))
            self.pending = np.zeros(0, dtype=np.uint8)
        raw = self.table.astype(">u8").tobytes()
        raw += bytes(-len(raw) % self.cs)
        offset = self.image.refcounts.alloc(len(raw) // self.cs)
        self.allocated.append((offset, len(raw) // self.cs))
        self.image.write_metadata(offset, raw, "bitmap")
        return offset, len(self.table)


def _windows(size: int, gbs: list[int]):
    """[lo, hi) guest byte windows covering the image: each maps to whole
    bytes of bitmaps of granularities `gbs`, and to at most _WINDOW_BITS
    bits of the finest (or one byte of the coarsest, if more)."""
    step = max(8 << max(gbs), _WINDOW_BITS << min(gbs))
    pos = 0
    while pos < size:
        yield pos, pos + step
        pos += step


def _write_bits(image, t: _Target) -> tuple[int, int, list[tuple[int, int]]]:
    """The target's new bits to new clusters: (table offset, table size,
    the (offset, clusters) runs allocated)."""
    writer = _Writer(image, t.granularity_bits)
    readers = []
    if not t.reset and t.entry is not None:
        readers.append(_Reader(image, t.entry))
    readers += [_Reader(img, e) for img, e in t.sources]
    try:
        if readers:
            gb = t.granularity_bits
            for lo, hi in _windows(image.size, [gb] + [r.gb for r in readers]):
                out = None
                for r in readers:
                    bits = _regranulate(r.read(lo >> r.gb >> 3, hi >> r.gb >> 3), r.gb, gb)
                    out = bits if out is None else out | bits
                writer.put(out)
        offset, size = writer.finish()
    except BaseException:
        _free_runs(image, writer.allocated)
        raise
    return offset, size, writer.allocated


def _free_runs(image, runs: list[tuple[int, int]]) -> None:
    import numpy as np

    if runs:
        cb = image.geo.cluster_bits
        starts = np.array([o >> cb for o, _n in runs], dtype=np.int64)
        counts = np.array([n for _o, n in runs], dtype=np.int64)
        image.refcounts.change_runs(starts, counts, -1)


def _entry_clusters(image, e: BitmapEntry) -> tuple[np.ndarray, np.ndarray]:
    """(start, count) cluster runs of an entry's table and data clusters."""
    import numpy as np

    cb = image.geo.cluster_bits
    table = load_bitmap_table(image, e)
    data = (table & np.uint64(L.BME_TABLE_ENTRY_OFFSET_MASK)) >> np.uint64(cb)
    data = data[data != 0].astype(np.int64)
    table_clusters = -(-(e.table_size * L.BME_TABLE_ENTRY_SIZE) // image.geo.cluster_size)
    starts = np.concatenate((data, [e.table_offset >> cb])).astype(np.int64)
    counts = np.concatenate((np.ones(len(data), dtype=np.int64), [table_clusters]))
    return starts, counts


# --- the write -------------------------------------------------------------------------


def apply_plan(image, plan: BitmapPlan) -> None:
    """Write the result of `plan` (nothing if it changes nothing).

    Ordering (QEMU's qcow2_store_persistent_dirty_bitmaps and
    update_ext_header_and_dir): the new data clusters and table, with
    their refcounts, are durable before the new directory that points at
    them; the directory is durable before the header points at it; the old
    directory, table and data are freed only after the header is durable.
    """
    if not plan.changes:
        return
    t, old = plan.new, plan.old
    entries = plan.directory
    rows: list[BitmapEntry] = []
    new_entry = None
    allocated: list[tuple[int, int]] = []
    try:
        if t is not None:
            new_entry = _new_entry(image, plan.name, t, allocated)
        for e in entries:
            if e is not old:
                rows.append(e)
            elif t is not None and t.entry is not None:
                rows.append(new_entry)  # kept in its place
        if t is not None and t.entry is None:
            rows.append(new_entry)  # QEMU appends the bitmaps it adds
        image.flush()  # data, tables and refcounts durable before the directory
        ext = None
        if rows:
            directory = _pack_directory([(e, e.extra_data) for e in rows])
            cs = image.geo.cluster_size
            n = -(-len(directory) // cs)
            dir_offset = image.refcounts.alloc(n)
            allocated.append((dir_offset, n))
            image.write_metadata(dir_offset, directory, "bitmap")
            image.flush()  # the directory durable before the header points at it
            ext = (len(rows), len(directory), dir_offset)
    except BaseException:
        _free_runs(image, allocated)
        raise
    old_dir = image.header.bitmaps_ext
    _set_extension(image, ext)
    _free_old(image, old, t, old_dir)


def _new_entry(image, name: str, t: _Target, allocated: list) -> BitmapEntry:
    """The target's new directory entry; its bits are rewritten where they
    change, else the entry keeps its table (a flag change only)."""
    flags = L.BME_FLAG_AUTO if t.enabled else 0
    if t.entry is not None and not t.reset and not t.sources:
        e = t.entry
        return BitmapEntry(
            e.name, e.table_offset, e.table_size, flags, e.type, e.granularity_bits, e.extra_data
        )
    offset, size, runs = _write_bits(image, t)
    allocated += runs
    extra = t.entry.extra_data if t.entry is not None else b""
    return BitmapEntry(name, offset, size, flags, L.BT_DIRTY_TRACKING, t.granularity_bits, extra)


def _set_extension(image, ext: tuple[int, int, int] | None) -> None:
    """Point the header at the new directory, or drop the extension and the
    autoclear bit with the last bitmap (QEMU's update_ext_header_and_dir)."""
    h = image.header
    h.bitmaps_ext = ext
    if ext is None:
        h.autoclear_features &= ~L.QCOW2_AUTOCLEAR_BITMAPS
    else:
        h.autoclear_features |= L.QCOW2_AUTOCLEAR_BITMAPS
    image.rewrite_header()


def _free_old(image, old: BitmapEntry | None, t: _Target | None, old_dir) -> None:
    """Free the old directory, and the old bits where they were replaced.

    The edit is done by now: what cannot be freed is leaked, as QEMU's
    free_bitmap_clusters leaks the clusters of a table it cannot load (an
    in-use bitmap's may be damaged), never an error."""
    import numpy as np

    from qimg.errors import CorruptImageError, InvalidImageError

    cb = image.geo.cluster_bits
    runs = []
    if old_dir is not None and old_dir[1]:
        n = -(-old_dir[1] // image.geo.cluster_size)
        runs.append((np.array([old_dir[2] >> cb]), np.array([n])))
    rewritten = t is None or t.entry is not old or t.reset or t.sources
    if old is not None and rewritten:
        try:
            runs.append(_entry_clusters(image, old))
        except InvalidImageError:
            pass
    for starts, counts in runs:
        try:
            image.refcounts.change_runs(starts.astype(np.int64), counts.astype(np.int64), -1)
        except CorruptImageError:
            pass  # a count already 0: nothing changed (change_runs checks first)
    image.flush()


# --- the list -----------------------------------------------------------------------------


_POPCOUNT = None


def _popcount(bits: np.ndarray) -> int:
    import numpy as np

    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(bits).sum(dtype=np.int64))
    global _POPCOUNT
    if _POPCOUNT is None:
        _POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return int(_POPCOUNT[bits].sum(dtype=np.int64))


def list_bitmaps(image) -> list[dict]:
    """Each bitmap in the directory: name, granularity and flags as `info`
    shows them, and "count", the dirty bytes (dirty granules times the
    granularity, as QEMU's query-block reports it); no count for an in-use
    bitmap, whose bits nobody trusts."""
    if image.format_name != "qcow2" or not has_bitmaps(image):
        return []
    out = []
    for e in read_bitmap_directory(image):
        row = {"name": e.name, "granularity": e.granularity, "flags": e.flag_names()}
        if not e.flags & L.BME_FLAG_IN_USE:
            row["count"] = dirty_count(image, e)
        out.append(row)
    return out


def dirty_count(image, e: BitmapEntry) -> int:
    """Dirty bytes of a consistent bitmap (see list_bitmaps)."""
    reader = _Reader(image, e)
    step = _WINDOW_BITS >> 3
    bits = 0
    for lo in range(0, reader.nbytes, step):
        bits += _popcount(reader.read(lo, min(reader.nbytes, lo + step)))
    return bits << e.granularity_bits
