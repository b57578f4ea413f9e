"""A structure-aware fuzzer that runs qimg beside qemu-img on mutated images.

Seeds are small qcow2 images made by qemu-img at run time (one per feature:
compressed clusters, snapshots, bitmaps, a backing file, extended L2, odd
refcount widths, compat 0.10, an external data file). A mutant is a seed
with a *recipe* applied: a list of mutations of named locations ("header.
l1_size", "l2.0.3", "snapshot.0.name", "ext.bitmaps.length", ...). Locations
are found by reading the seed's own metadata with the structures in
qimg/formats/qcow2/layout.py, so a recipe regenerates the same mutant from
any qemu-made seed and the corpus (tests/fuzz_corpus/*.json) holds recipes,
not images.

Each mutant is run through `info --output=json`, `check --output=json` and
`convert -O raw` by both tools, each in its own copy of the mutant's
directory (same relative names, so messages name the same files), and
judged (see `judge`): a finding of a FAILING class is a qimg defect.

Command line (the bulk run; findings go to stdout as JSON lines):
    python3 tests/fuzzing.py --count 5000 --seed 1 --workdir /tmp/fuzz
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from conftest import host_data, run  # noqa: E402
from damage import HEADER_FIELDS, SNAPSHOT_FIELDS, struct_fields  # noqa: E402

from qimg.formats.qcow2 import layout as L  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
IMAGE = "img.qcow2"
TIMEOUT = 20.0

# --- Seeds --------------------------------------------------------------------

# Each seed: the shell-free commands that make it in an empty directory.
# The image under test is always IMAGE; companions (a backing file, a data
# file) sit beside it under relative names.
_WRITES = ["-c", "write -P 0x11 0 8k", "-c", "write -P 0x22 1M 4k", "-c", "write -z 1536k 4k"]


def _raw_source() -> list[list[str]]:
    return [
        ["qemu-img", "create", "-f", "raw", "src.raw", "2M"],
        [
            "qemu-io", "-f", "raw",
            "-c", "write -P 0x33 0 12k", "-c", "write -P 0x44 1M 8k", "src.raw",
        ],
    ]  # fmt: skip


SEEDS: dict[str, list[list[str]]] = {
    "plain": [
        ["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", IMAGE, "2M"],
        ["qemu-io", *_WRITES, IMAGE],
    ],
    "plain64k": [
        ["qemu-img", "create", "-f", "qcow2", IMAGE, "4M"],
        ["qemu-io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 3M 4k", IMAGE],
    ],
    "zlib": _raw_source()
    + [["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", "src.raw", IMAGE]],
    "zstd": _raw_source()
    + [
        [
            "qemu-img",
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096,compression_type=zstd",
            "src.raw",
            IMAGE,
        ]
    ],  # fmt: skip
    "snapshot": [
        ["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", IMAGE, "2M"],
        ["qemu-io", *_WRITES, IMAGE],
        ["qemu-img", "snapshot", "-c", "snap1", IMAGE],
        ["qemu-io", "-c", "write -P 0x55 4k 4k", IMAGE],
    ],
    "bitmap": [
        ["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", IMAGE, "2M"],
        ["qemu-img", "bitmap", "--add", IMAGE, "b0"],
        ["qemu-io", *_WRITES, IMAGE],
    ],
    "backing": [
        ["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", "base.qcow2", "2M"],
        ["qemu-io", "-c", "write -P 0x66 0 16k", "base.qcow2"],
        [
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            IMAGE,
        ],
        ["qemu-io", "-c", "write -P 0x77 4k 4k", IMAGE],
    ],  # fmt: skip
    "extl2": [
        [
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16384,extended_l2=on",
            IMAGE,
            "2M",
        ],
        ["qemu-io", "-c", "write -P 0x11 0 2k", "-c", "write -P 0x22 20k 1k", IMAGE],
    ],  # fmt: skip
    "refbits1": [
        [
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096,refcount_bits=1",
            IMAGE,
            "2M",
        ],
        ["qemu-io", *_WRITES, IMAGE],
    ],  # fmt: skip
    "refbits64": [
        [
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096,refcount_bits=64",
            IMAGE,
            "2M",
        ],
        ["qemu-io", *_WRITES, IMAGE],
    ],  # fmt: skip
    "compat010": [
        ["qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096,compat=0.10", IMAGE, "2M"],
        ["qemu-io", *_WRITES, IMAGE],
    ],
    "datafile": [
        [
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096,data_file=data.raw",
            IMAGE,
            "2M",
        ],
        ["qemu-io", *_WRITES, IMAGE],
    ],  # fmt: skip
}


def make_seed(name: str, directory: Path) -> Path:
    """Make seed `name` in `directory` (created) with qemu-img; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for args in SEEDS[name]:
        run(args, cwd=directory, timeout=60)
    (directory / "src.raw").unlink(missing_ok=True)
    return directory


def make_seeds(root: Path) -> dict[str, Path]:
    return {name: make_seed(name, root / name) for name in SEEDS}


# --- Locations: every mutable field of a seed, by name ---------------------------

EXT_FIELDS = struct_fields(L.HEADER_EXTENSION, ("type", "length"))
BITMAPS_EXT_FIELDS = struct_fields(
    L.BITMAPS_EXTENSION,
    ("nb_bitmaps", "reserved32", "bitmap_directory_size", "bitmap_directory_offset"),
)
BITMAP_FIELDS = struct_fields(
    L.BITMAP_DIRECTORY_ENTRY,
    (
        "bitmap_table_offset",
        "bitmap_table_size",
        "flags",
        "type",
        "granularity_bits",
        "name_size",
        "extra_data_size",
    ),
)
SNAPSHOT_EXTRA_FIELDS = struct_fields(
    L.SNAPSHOT_EXTRA_V3, ("vm_state_size_large", "disk_size", "icount")
)
EXT_NAMES = {
    L.QCOW2_EXT_MAGIC_END: "end",
    L.QCOW2_EXT_MAGIC_BACKING_FORMAT: "backing_format",
    L.QCOW2_EXT_MAGIC_FEATURE_TABLE: "feature_table",
    L.QCOW2_EXT_MAGIC_BITMAPS: "bitmaps",
    L.QCOW2_EXT_MAGIC_CRYPTO_HEADER: "crypto",
    L.QCOW2_EXT_MAGIC_DATA_FILE: "data_file",
}


@dataclass(frozen=True)
class Loc:
    """A mutable place in the file: an integer of `width` bytes
    (big-endian), or, with is_bytes, a byte string of `width` bytes."""

    offset: int
    width: int
    is_bytes: bool = False


def _fmt_width(fmt: str) -> int:
    return struct.calcsize(fmt)


@dataclass
class Seed:
    """A seed image read into named locations."""

    name: str
    directory: Path
    data: bytes
    locs: dict[str, Loc] = field(default_factory=dict)
    cluster_size: int = 0

    @property
    def file_size(self) -> int:
        return len(self.data)

    def u(self, loc: Loc) -> int:
        return int.from_bytes(self.data[loc.offset : loc.offset + loc.width], "big")

    def value(self, name: str) -> int:
        return self.u(self.locs[name])


def read_seed(name: str, directory: Path) -> Seed:
    """Name every header field, extension, table entry, snapshot and bitmap
    structure of the seed (a valid qemu-made image)."""
    seed = Seed(name, directory, (directory / IMAGE).read_bytes())
    add = seed.locs.__setitem__
    version = int.from_bytes(seed.data[4:8], "big")
    for fname, (where, fmt) in HEADER_FIELDS.items():
        if fname == "compression_type":
            continue  # named below, where header_length leaves room for it
        if version >= 3 or where < L.HEADER_V2_SIZE:
            add(f"header.{fname}", Loc(where, _fmt_width(fmt)))
    header_length = seed.value("header.header_length") if version >= 3 else L.HEADER_V2_SIZE
    if header_length > L.HEADER_COMPRESSION_TYPE_OFFSET:
        add("header.compression_type", Loc(L.HEADER_COMPRESSION_TYPE_OFFSET, 1))
    seed.cluster_size = cs = 1 << seed.value("header.cluster_bits")
    _read_extensions(seed, header_length)
    if seed.value("header.backing_file_offset"):
        add(
            "backing.name",
            Loc(
                seed.value("header.backing_file_offset"),
                seed.value("header.backing_file_size"),
                True,
            ),
        )
    ext_l2 = version >= 3 and seed.value("header.incompatible_features") & L.QCOW2_INCOMPAT_EXTL2
    _read_l1(seed, "l1", seed.value("header.l1_table_offset"), seed.value("header.l1_size"))
    _read_l2(seed, bool(ext_l2))
    _read_refcounts(seed, cs)
    _read_snapshots(seed)
    _read_bitmaps(seed)
    return seed


def _read_extensions(seed: Seed, header_length: int) -> None:
    pos, end = header_length, seed.cluster_size
    while pos + L.HEADER_EXTENSION.size <= end:
        ext_type, length = L.HEADER_EXTENSION.unpack_from(seed.data, pos)
        tag = EXT_NAMES.get(ext_type, f"0x{ext_type:08x}")
        for fname, (where, fmt) in EXT_FIELDS.items():
            seed.locs[f"ext.{tag}.{fname}"] = Loc(pos + where, _fmt_width(fmt))
        data = pos + L.HEADER_EXTENSION.size
        if ext_type == L.QCOW2_EXT_MAGIC_END:
            break
        seed.locs[f"ext.{tag}.data"] = Loc(data, length, True)
        if ext_type == L.QCOW2_EXT_MAGIC_BITMAPS:
            for fname, (where, fmt) in BITMAPS_EXT_FIELDS.items():
                seed.locs[f"bitmaps_ext.{fname}"] = Loc(data + where, _fmt_width(fmt))
        pos = data + ((length + 7) & ~7)


def _read_l1(seed: Seed, prefix: str, l1_offset: int, l1_size: int) -> None:
    """Name the entries of an L1 table (the first 64)."""
    for i in range(min(l1_size, 64)):
        seed.locs[f"{prefix}.{i}"] = Loc(l1_offset + 8 * i, 8)


def _read_l2(seed: Seed, ext_l2: bool) -> None:
    """Name the entries of each L2 table of the active L1 table ("l2.k.i":
    entry i of the k-th distinct table in L1 order): the used ones and the
    first two."""
    cs = seed.cluster_size
    width = L.L2_ENTRY_SIZE_EXTENDED if ext_l2 else L.L2_ENTRY_SIZE_NORMAL
    tables: list[int] = []
    for name in (n for n in seed.locs if n.startswith("l1.")):
        table = seed.value(name) & L.L1E_OFFSET_MASK
        if table and table not in tables and table + cs <= seed.file_size:
            tables.append(table)
    for k, table in enumerate(tables):
        for i in range(cs // width):
            pos = table + i * width
            if seed.u(Loc(pos, 8)) or i < 2 or (ext_l2 and seed.u(Loc(pos + 8, 8))):
                seed.locs[f"l2.{k}.{i}"] = Loc(pos, 8)
                if ext_l2:
                    seed.locs[f"l2.{k}.{i}.bitmap"] = Loc(pos + 8, 8)


def _read_refcounts(seed: Seed, cs: int) -> None:
    table = seed.value("header.refcount_table_offset")
    entries = seed.value("header.refcount_table_clusters") * cs // 8
    order = seed.value("header.refcount_order") if "header.refcount_order" in seed.locs else 4
    bits = 1 << order
    for i in range(min(entries, 16)):
        seed.locs[f"reftable.{i}"] = Loc(table + 8 * i, 8)
        block = seed.value(f"reftable.{i}") & L.REFT_OFFSET_MASK
        if not block or block + cs > seed.file_size:
            continue
        # Name the refcounts of the clusters the file holds (sub-byte widths
        # as their whole byte).
        for c in range(min(seed.file_size // cs + 1, cs * 8 // bits)):
            seed.locs[f"refblock.{i}.{c}"] = Loc(block + c * bits // 8, max(1, bits // 8))


def _read_snapshots(seed: Seed) -> None:
    pos = seed.value("header.snapshots_offset")
    for s in range(seed.value("header.nb_snapshots")):
        base = pos
        for fname, (where, fmt) in SNAPSHOT_FIELDS.items():
            seed.locs[f"snapshot.{s}.{fname}"] = Loc(base + where, _fmt_width(fmt))
        id_size = seed.value(f"snapshot.{s}.id_str_size")
        name_size = seed.value(f"snapshot.{s}.name_size")
        extra = seed.value(f"snapshot.{s}.extra_data_size")
        p = base + L.SNAPSHOT_HEADER.size
        for fname, (where, fmt) in SNAPSHOT_EXTRA_FIELDS.items():
            if where + _fmt_width(fmt) <= extra:
                seed.locs[f"snapshot.{s}.{fname}"] = Loc(p + where, _fmt_width(fmt))
        p += extra
        seed.locs[f"snapshot.{s}.id"] = Loc(p, id_size, True)
        seed.locs[f"snapshot.{s}.name"] = Loc(p + id_size, name_size, True)
        l1 = seed.value(f"snapshot.{s}.l1_table_offset")
        _read_l1(seed, f"snapshot.{s}.l1", l1, seed.value(f"snapshot.{s}.l1_size"))
        pos = (p + id_size + name_size + 7) & ~7


def _read_bitmaps(seed: Seed) -> None:
    if "bitmaps_ext.nb_bitmaps" not in seed.locs:
        return
    pos = seed.value("bitmaps_ext.bitmap_directory_offset")
    for b in range(seed.value("bitmaps_ext.nb_bitmaps")):
        for fname, (where, fmt) in BITMAP_FIELDS.items():
            seed.locs[f"bitmap.{b}.{fname}"] = Loc(pos + where, _fmt_width(fmt))
        name_size = seed.value(f"bitmap.{b}.name_size")
        extra = seed.value(f"bitmap.{b}.extra_data_size")
        seed.locs[f"bitmap.{b}.name"] = Loc(
            pos + L.BITMAP_DIRECTORY_ENTRY.size + extra, name_size, True
        )
        table = seed.value(f"bitmap.{b}.bitmap_table_offset")
        for j in range(min(seed.value(f"bitmap.{b}.bitmap_table_size"), 16)):
            seed.locs[f"bitmap.{b}.table.{j}"] = Loc(table + 8 * j, 8)
        pos = (pos + L.BITMAP_DIRECTORY_ENTRY.size + extra + name_size + 7) & ~7


# --- Applying a recipe ------------------------------------------------------------


class RecipeError(Exception):
    """The recipe names a location the seed does not have."""


def _new_int(seed: Seed, data: bytearray, loc: Loc, m: dict) -> int:
    old = int.from_bytes(data[loc.offset : loc.offset + loc.width], "big")
    op = m["op"]
    if op == "set":
        value = m["value"]
    elif op == "add":
        value = old + m["value"]
    elif op == "xor":
        value = old ^ m["value"]
    elif op == "copy":
        if m["from"] not in seed.locs:
            raise RecipeError(m["from"])
        value = seed.value(m["from"]) + m.get("add", 0)
    elif op == "file_size":
        value = seed.file_size + m.get("add", 0)
    else:
        raise RecipeError(f"unknown op {op}")
    return value % (1 << (8 * loc.width))


def _new_bytes(loc: Loc, old: bytes, m: dict) -> bytes:
    op = m["op"]
    if op == "nul_at":
        out = bytearray(old)
        if out:
            out[min(m["index"], len(out) - 1)] = 0
        return bytes(out)
    if op == "xor_byte":
        out = bytearray(old)
        if out:
            out[min(m["index"], len(out) - 1)] ^= m["value"]
        return bytes(out)
    if op == "fill":
        return bytes([m["value"]]) * len(old)
    if op == "set_bytes":
        return bytes.fromhex(m["hex"]).ljust(len(old), b"\0")[: len(old)]
    raise RecipeError(f"unknown op {op}")


def _insert_extension(seed: Seed, data: bytearray, m: dict) -> None:
    """Write a header extension (type, length, data padded to 8 bytes) where
    the end marker was, and a new end marker (with m["end_length"]) after it."""
    pos = seed.locs["ext.end.type"].offset
    body = bytes.fromhex(m["hex"])
    length = m.get("length", len(body))
    new = L.HEADER_EXTENSION.pack(m["type"], length) + body.ljust((len(body) + 7) & ~7, b"\0")
    new += L.HEADER_EXTENSION.pack(L.QCOW2_EXT_MAGIC_END, m.get("end_length", 0))
    data[pos : pos + len(new)] = new


def apply_recipe(seed: Seed, recipe: dict, out: Path) -> None:
    """Write the mutant of `seed` described by `recipe` to `out`."""
    data = bytearray(seed.data)
    for m in recipe["mutations"]:
        if m["op"] == "truncate":
            size = int(seed.file_size * m["fraction"]) if "fraction" in m else m["size"]
            del data[size:]
            continue
        if m["op"] == "ext_insert":
            _insert_extension(seed, data, m)
            continue
        if m["loc"] not in seed.locs:
            raise RecipeError(m["loc"])
        loc = seed.locs[m["loc"]]
        if loc.is_bytes:
            new = _new_bytes(loc, bytes(data[loc.offset : loc.offset + loc.width]), m)
        else:
            new = _new_int(seed, data, loc, m).to_bytes(loc.width, "big")
        end = loc.offset + loc.width
        if end > len(data):
            data.extend(bytes(end - len(data)))
        data[loc.offset : end] = new
    out.write_bytes(bytes(data))


def materialize(seed: Seed, recipe: dict, directory: Path) -> Path:
    """A directory holding the mutant as IMAGE beside copies of the seed's
    companion files (backing file, data file)."""
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(seed.directory, directory)
    apply_recipe(seed, recipe, directory / IMAGE)
    return directory


# --- Random recipes ------------------------------------------------------------------

CATEGORIES = {
    "header": 30,
    "ext": 12,
    "bitmaps_ext": 6,
    "l1": 8,
    "l2": 12,
    "reftable": 5,
    "refblock": 6,
    "snapshot": 10,
    "bitmap": 10,
    "backing": 4,
    "truncate": 5,
    "ext_insert": 6,
}

# Extensions to insert: (type, data) (spec: "Header extensions").
_INSERTS = [
    (L.QCOW2_EXT_MAGIC_BACKING_FORMAT, b"qcow2"),
    (L.QCOW2_EXT_MAGIC_BACKING_FORMAT, b"raw"),
    (L.QCOW2_EXT_MAGIC_BACKING_FORMAT, b""),
    (L.QCOW2_EXT_MAGIC_BACKING_FORMAT, b"qcow2".ljust(16, b"x")),
    (L.QCOW2_EXT_MAGIC_CRYPTO_HEADER, L.CRYPTO_HEADER_EXTENSION.pack(0x1000, 0x1000)),
    (L.QCOW2_EXT_MAGIC_DATA_FILE, b"data.raw"),
    (L.QCOW2_EXT_MAGIC_DATA_FILE, b"missing.raw"),
    (L.QCOW2_EXT_MAGIC_DATA_FILE, b""),
    (L.QCOW2_EXT_MAGIC_BITMAPS, L.BITMAPS_EXTENSION.pack(0, 0, 0, 0)),
    (L.QCOW2_EXT_MAGIC_BITMAPS, L.BITMAPS_EXTENSION.pack(1, 0, 24, 0x10000)),
    (L.QCOW2_EXT_MAGIC_FEATURE_TABLE, L.FEATURE_TABLE_ENTRY.pack(0, 7, b"made-up")),
    (0x12345678, b"unknown extension"),
    (L.QCOW2_EXT_MAGIC_END, b""),
]


def _interesting(seed: Seed, name: str, loc: Loc, rng: random.Random) -> dict:
    top = (1 << (8 * loc.width)) - 1
    cs = seed.cluster_size
    choices: list[dict] = [
        {"op": "set", "value": 0},
        {"op": "set", "value": 1},
        {"op": "set", "value": top},
        {"op": "set", "value": 1 << (8 * loc.width - 1)},
        {"op": "set", "value": rng.randrange(0, 64)},
        {"op": "add", "value": 1},
        {"op": "add", "value": -1},
        {"op": "add", "value": cs},
        {"op": "add", "value": -cs},
        {"op": "add", "value": 512},
        {"op": "xor", "value": 1 << rng.randrange(8 * loc.width)},
        {"op": "xor", "value": 1 << rng.randrange(8 * loc.width)},
        {"op": "set", "value": rng.randrange(top + 1)},
    ]
    if loc.width >= 4:
        choices += [
            {"op": "file_size", "add": 0},
            {"op": "file_size", "add": cs * rng.randrange(1, 4)},
            {"op": "set", "value": 1 << rng.randrange(20, 8 * loc.width)},
            {"op": "copy", "from": rng.choice(_offset_fields(seed))},
        ]
    if loc.width == 8 and (
        name.startswith(("l1.", "l2.", "reftable.", "snapshot.")) or ".table." in name
    ):
        # Entry flags and reserved bits (spec: "Cluster mapping").
        choices += [
            {"op": "xor", "value": L.QCOW_OFLAG_COPIED},
            {"op": "xor", "value": L.QCOW_OFLAG_COMPRESSED},
            {"op": "xor", "value": L.QCOW_OFLAG_ZERO},
            {"op": "xor", "value": 1 << rng.choice([1, 8, 56, 61])},
        ]
    return rng.choice(choices)


def _offset_fields(seed: Seed) -> list[str]:
    return [
        n
        for n in (
            "header.l1_table_offset",
            "header.refcount_table_offset",
            "header.snapshots_offset",
            "header.backing_file_offset",
            "bitmaps_ext.bitmap_directory_offset",
            "l1.0",
            "reftable.0",
            "bitmap.0.bitmap_table_offset",
            "snapshot.0.l1_table_offset",
        )
        if n in seed.locs
    ]


_HEADER_SPECIAL = {
    "header.version": [0, 1, 2, 3, 4, 0xFFFFFFFF],
    "header.cluster_bits": [0, 8, 9, 16, 21, 22, 63],
    "header.refcount_order": [0, 3, 4, 6, 7, 0xFFFFFFFF],
    "header.header_length": [0, 72, 100, 104, 105, 112, 120, 4096, 0xFFFFFFFF],
    "header.crypt_method": [1, 2, 3],
    "header.size": [0, 0x1FF, 0x200, 1 << 40, 1 << 63, 0xFFFFFFFFFFFFFFFF],
    "header.compression_type": [0, 1, 2, 0xFF],
    "header.incompatible_features": [1, 2, 4, 8, 16, 32, 1 << 40],
    "header.compatible_features": [1, 2, 1 << 63],
    "header.autoclear_features": [1, 2, 3, 4, 1 << 63],
    "header.nb_snapshots": [0, 1, 2, 100, 65537, 0xFFFFFFFF],
    "header.l1_size": [0, 1, 2, 0x2000000, 0x2000001, 0xFFFFFFFF],
    "header.refcount_table_clusters": [0, 1, 2, 1 << 20, 0xFFFFFFFF],
}


def _mutation(seed: Seed, rng: random.Random) -> dict:
    categories = [
        c
        for c in CATEGORIES
        if c in ("truncate", "ext_insert") or any(n.startswith(c + ".") for n in seed.locs)
    ]
    category = rng.choices(categories, [CATEGORIES[c] for c in categories])[0]
    if category == "ext_insert":
        ext_type, body = rng.choice(_INSERTS)
        m = {"op": "ext_insert", "type": ext_type, "hex": body.hex()}
        if rng.random() < 0.2:
            m["length"] = rng.choice([0, len(body) + 1, 0xFFFF, 0xFFFFFFFF])
        if rng.random() < 0.1:
            m["end_length"] = rng.choice([8, 16])
        return m
    if category == "truncate":
        if rng.random() < 0.5:
            return {"op": "truncate", "fraction": round(rng.random(), 3)}
        return {
            "op": "truncate",
            "size": rng.choice([0, 4, 72, 104, seed.cluster_size, seed.file_size - 1]),
        }
    names = sorted(n for n in seed.locs if n.startswith(category + "."))
    name = rng.choice(names)
    loc = seed.locs[name]
    if loc.is_bytes:
        width = max(loc.width, 1)
        return rng.choice(
            [
                {"loc": name, "op": "nul_at", "index": rng.randrange(width)},
                {
                    "loc": name,
                    "op": "xor_byte",
                    "index": rng.randrange(width),
                    "value": 1 << rng.randrange(8),
                },
                {"loc": name, "op": "fill", "value": rng.choice([0, 0x2F, 0x41, 0xFF])},
                {
                    "loc": name,
                    "op": "set_bytes",
                    "hex": rng.choice(["2e2e", "696d672e71636f7732", "00", "2f"]),
                },
            ]
        )
    if name in _HEADER_SPECIAL and rng.random() < 0.6:
        return {"loc": name, "op": "set", "value": rng.choice(_HEADER_SPECIAL[name])}
    return {"loc": name, **_interesting(seed, name, loc, rng)}


# Seeds with structures only they hold are picked more often.
SEED_WEIGHTS = {"snapshot": 3, "bitmap": 3, "backing": 2, "datafile": 2, "extl2": 2}


def random_recipe(seeds: dict[str, Seed], rng: random.Random) -> dict:
    names = sorted(seeds)
    seed = seeds[rng.choices(names, [SEED_WEIGHTS.get(n, 1) for n in names])[0]]
    count = rng.choices([1, 2, 3], [70, 22, 8])[0]
    return {"seed": seed.name, "mutations": [_mutation(seed, rng) for _ in range(count)]}


def random_recipes(seeds: dict[str, Seed], seed: int, count: int) -> list[dict]:
    """`count` recipes, the same ones for the same seed images and `seed`."""
    rng = random.Random(seed)
    return [random_recipe(seeds, rng) for _ in range(count)]


# --- Running both tools ----------------------------------------------------------------


@dataclass
class Outcome:
    rc: int | None  # None: timed out
    stdout: str
    stderr: str

    @property
    def hung(self) -> bool:
        return self.rc is None

    def brief(self) -> str:
        if self.hung:
            return f"timed out after {TIMEOUT:.0f} s"
        return f"exit {self.rc}; stderr: {self.stderr.strip()[:600]!r}"


COMMANDS = {
    "info": ["info", "--output=json", IMAGE],
    "check": ["check", "--output=json", IMAGE],
    "convert": ["convert", "-O", "raw", IMAGE, "out.raw"],
}


def _tool_argv(tool: str) -> list[str]:
    return ["qemu-img"] if tool == "qemu-img" else [sys.executable, "-m", "qimg"]


def run_tool(tool: str, command: str, cwd: Path, timeout: float = TIMEOUT) -> Outcome:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        proc = run(
            _tool_argv(tool) + COMMANDS[command],
            check=False,
            timeout=timeout,
            cwd=cwd,
            env=env,
            errors="replace",
        )
    except subprocess.TimeoutExpired:
        return Outcome(None, "", "")
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


# --- Judging ---------------------------------------------------------------------------

# Classes that are qimg defects (the in-suite test fails on them).
FAILING = {
    "traceback",
    "internal-error",
    "qimg-hang",
    "multi-line-error",
    "qimg-fails-qemu-succeeds",
    "qimg-succeeds-qemu-fails",
    "check-exit-code",
    "data-differs",
    "info-json-differs",
}
# Classes recorded for the findings report only.
SOFT = {"message-differs", "check-json-differs", "info-json-minor", "qemu-crash", "both-hang"}

INFO_KEYS = (
    "virtual-size",
    "format",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
    "full-backing-filename",
    "format-specific",
    "snapshots",
    "encrypted",
)
INFO_MINOR_KEYS = ("dirty-flag",)
CHECK_KEYS = (
    "check-errors",
    "corruptions",
    "leaks",
    "corruptions-fixed",
    "leaks-fixed",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
)


@dataclass
class Finding:
    cls: str
    command: str
    detail: str

    @property
    def failing(self) -> bool:
        return self.cls in FAILING


def _qemu_broke(q: Outcome) -> bool:
    """qemu-img crashed (signal), or ran out of the memory the harness allows."""
    if q.hung:
        return False
    text = q.stderr.lower()
    return q.rc < 0 or "cannot allocate memory" in text or "failed to allocate" in text


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _message(text: str) -> list[str]:
    """The tool's own message lines, program name stripped (check's
    per-problem report lines carry no prefix and are left out)."""
    out = []
    for line in _lines(text):
        for prefix in ("qemu-img: ", "qimg: "):
            if line.startswith(prefix):
                out.append(line[len(prefix) :])
    return out


def _error_lines(stderr: str) -> int:
    """How many lines the error message takes: the lines that carry the
    program name (each line of a qemu-img message does), warnings left out.
    check's report of each problem found, a driver's notice ("qcow2: ...")
    and hints carry no program name and are not the error message."""
    return len([line for line in _message(stderr) if not line.startswith("warning: ")])


def _json(text: str, cwd: Path) -> object:
    try:
        value = json.loads(text.replace(str(cwd), "<dir>"))
    except ValueError:
        return None
    return value


def _pick(doc: object, keys: tuple[str, ...]) -> dict:
    if not isinstance(doc, dict):
        return {"<not a JSON object>": doc}
    return {k: doc.get(k, "<absent>") for k in keys}


def _same_files(a: Path, b: Path) -> str | None:
    """None if files a and b hold the same bytes, else where they differ."""
    sa, sb = a.stat().st_size, b.stat().st_size
    if sa != sb:
        return f"sizes {sa} (qemu-img) and {sb} (qimg)"
    runs = sorted(host_data(a) + host_data(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in runs:
            pos = start
            while pos < end:
                n = min(1 << 20, end - pos)
                fa.seek(pos)
                fb.seek(pos)
                x, y = fa.read(n), fb.read(n)
                if x != y:
                    first = next(i for i in range(n) if x[i] != y[i])
                    return f"first difference at byte {pos + first:#x}"
                pos += n
    return None


def judge(command: str, q: Outcome, m: Outcome, qdir: Path, mdir: Path) -> list[Finding]:
    """The findings of one command run by qemu-img (q) and qimg (m)."""
    out: list[Finding] = []

    def add(cls: str, detail: str) -> None:
        out.append(Finding(cls, command, detail))

    both = f"qemu-img: {q.brief()}\n  qimg: {m.brief()}"
    if "Traceback (most recent call last)" in m.stderr:
        add("traceback", both)
    if "internal error" in m.stderr.lower():
        add("internal-error", both)
    if m.hung:
        add("both-hang" if q.hung else "qimg-hang", both)
        return out
    if m.rc != 0 and _error_lines(m.stderr) > max(1, _error_lines(q.stderr)):
        add("multi-line-error", both)
    if q.hung or _qemu_broke(q):
        if not q.hung:
            add("qemu-crash", both)
        return out
    if command == "check":
        if q.rc != m.rc:
            add("check-exit-code", both)
        elif q.rc in (0, 2, 3):
            qj, mj = (
                _pick(_json(q.stdout, qdir), CHECK_KEYS),
                _pick(_json(m.stdout, mdir), CHECK_KEYS),
            )
            if qj != mj:
                add("check-json-differs", f"qemu-img: {qj}\n  qimg: {mj}")
    elif (q.rc == 0) != (m.rc == 0):
        add("qimg-fails-qemu-succeeds" if q.rc == 0 else "qimg-succeeds-qemu-fails", both)
    elif q.rc == 0 and command == "info":
        qd, md = _json(q.stdout, qdir), _json(m.stdout, mdir)
        qj, mj = _pick(qd, INFO_KEYS), _pick(md, INFO_KEYS)
        if qj != mj:
            diff = {k: (qj[k], mj[k]) for k in qj if qj[k] != mj.get(k)}
            add("info-json-differs", f"(qemu-img, qimg) by key: {diff}")
        qn, mn = _pick(qd, INFO_MINOR_KEYS), _pick(md, INFO_MINOR_KEYS)
        if qn != mn:
            add("info-json-minor", f"qemu-img: {qn}\n  qimg: {mn}")
    elif q.rc == 0 and command == "convert":
        where = _same_files(qdir / "out.raw", mdir / "out.raw")
        if where:
            add("data-differs", where)
    if q.rc != 0 and m.rc != 0 and _message(q.stderr) != _message(m.stderr):
        add("message-differs", both)
    return out


@dataclass
class Result:
    recipe: dict
    findings: list[Finding]

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.failing]

    def report(self, all_findings: bool = False) -> str:
        """One message for the mutant: its recipe, then each failing
        finding's class, command and both tools' results."""
        lines = [f"recipe: {json.dumps(self.recipe)}"]
        for f in self.findings if all_findings else self.failures():
            cmd = " ".join(COMMANDS[f.command])
            lines.append(f"[{f.cls}] {cmd}\n  {f.detail}")
        return "\n".join(lines)


def run_mutant(seed: Seed, recipe: dict, work: Path, timeout: float = TIMEOUT) -> Result:
    """Run every command of COMMANDS on the mutant with both tools."""
    findings: list[Finding] = []
    for command in COMMANDS:
        qdir = materialize(seed, recipe, work / "qemu")
        mdir = materialize(seed, recipe, work / "qimg")
        q = run_tool("qemu-img", command, qdir, timeout)
        m = run_tool("qimg", command, mdir, timeout)
        findings += judge(command, q, m, qdir, mdir)
    shutil.rmtree(work, ignore_errors=True)
    return Result(recipe, findings)


def shrink(seed: Seed, recipe: dict, cls: str, command: str, work: Path) -> dict:
    """The smallest sub-recipe (mutations dropped one at a time) that still
    shows finding `cls` on `command`."""
    muts = list(recipe["mutations"])
    i = 0
    while len(muts) > 1 and i < len(muts):
        trial = {**recipe, "mutations": muts[:i] + muts[i + 1 :]}
        found = run_mutant(seed, trial, work).findings
        if any(f.cls == cls and f.command == command for f in found):
            muts = trial["mutations"]
        else:
            i += 1
    return {**recipe, "mutations": muts}


# --- Corpus ------------------------------------------------------------------------------

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"


def corpus_recipes() -> list[tuple[str, dict]]:
    return [(p.stem, json.loads(p.read_text())) for p in sorted(CORPUS.glob("*.json"))]


# --- Bulk run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="skip the first recipes")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fuzz"))
    parser.add_argument("--out", type=Path, help="JSON lines of findings (default stdout)")
    args = parser.parse_args(argv)
    seeds_dir = args.workdir / "seeds"
    if seeds_dir.exists():
        shutil.rmtree(seeds_dir)
    seeds = {n: read_seed(n, d) for n, d in make_seeds(seeds_dir).items()}
    recipes = random_recipes(seeds, args.seed, args.count)
    sink = open(args.out, "a") if args.out else sys.stdout
    t0 = time.monotonic()
    for i, recipe in enumerate(recipes[args.start :], args.start):
        result = run_mutant(seeds[recipe["seed"]], recipe, args.workdir / "work")
        for f in result.findings:
            row = {
                "i": i,
                "recipe": recipe,
                "class": f.cls,
                "command": f.command,
                "detail": f.detail,
            }
            print(json.dumps(row), file=sink, flush=True)
        if i % 50 == 0:
            print(f"# {i} mutants, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
