"""A crash in the middle of a write may leak clusters, never corrupt data.

Each configuration builds a qcow2 image with the real qemu-img (cluster
size, refcount width, extended L2, compat, backing file, internal
snapshots), then runs a seeded workload through the library over a
`qimg.faults.FaultyStorage`: writes of many sizes (new L2 tables, new
refcount blocks, a growing refcount table), overwrites of clusters shared
with snapshots (COW), write_zeroes with unmap, discard, compressed writes,
and flushes. A dry run counts the storage operations; the workload is then
run again from the same image, crashing before operation n, for every n of
a small workload and for a sample (every flush, plus random points) of the
larger ones. After each crash, qemu-img is the judge:

- `qemu-img check` finds no corruption and no check error (leaks allowed);
- every byte not written since the last completed flush() reads as it was
  then (data of completed, flushed writes is intact);
- process kill only: every other byte reads a value it had at some point
  since that flush (old or new data, never anything else). Power loss does
  not promise that: like QEMU, the data of an allocating write and the L2
  entry linking it are made durable by the same flush, so after losing
  one but not the other the guest may read stale bytes of a freed cluster
  in a region written after the last flush;
- every internal snapshot reads exactly what it read before.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import host_data, run

from qimg.api import open_image
from qimg.faults import FaultyStorage, SimulatedCrash
from qimg.formats.qcow2.compress import compress_cluster

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
W = 64 * KiB  # the guest model is kept in windows of this size
ZERO_W = bytes(W)
MAX_POINTS = 36  # crash points per sampled configuration and mode


@dataclass(frozen=True)
class Config:
    name: str
    cluster_size: int
    size: int
    steps: int
    refcount_bits: int = 16
    extended_l2: bool = False
    compat: str = "1.1"
    backing: bool = False
    snapshots: int = 0
    big: int = 0  # largest single write (0: a few clusters)
    new_blocks: bool = False  # the workload must create refcount blocks
    grows_table: bool = False  # ... and grow the refcount table
    every_point: bool = False  # crash at every operation, not a sample


CONFIGS = [
    # Small workload, crashed at every single operation.
    Config("c512-r16-every-point", 512, 1 * MiB, 10, every_point=True),
    # New refcount blocks and a growing refcount table (a 64-bit refcount
    # block covers 32 KiB of host, the first table 2 MiB), with a snapshot.
    Config(
        "c512-r64-grow-snapshot",
        512,
        8 * MiB,
        18,
        refcount_bits=64,
        snapshots=1,
        big=3 * MiB // 2,
        new_blocks=True,
        grows_table=True,
    ),
    # 1-bit refcounts (no sharing possible), a backing file, new blocks.
    Config(
        "c512-r1-backing",
        512,
        8 * MiB,
        16,
        refcount_bits=1,
        backing=True,
        big=3 * MiB // 2,
        new_blocks=True,
    ),
    Config("c64k-r16-snapshots", 64 * KiB, 2 * GiB, 18, snapshots=2, big=512 * KiB),
    Config(
        "c64k-extl2-backing-snapshot",
        64 * KiB,
        1 * GiB,
        18,
        extended_l2=True,
        backing=True,
        snapshots=1,
        big=512 * KiB,
    ),
    Config(
        "c512-compat010-backing-snapshot",
        512,
        4 * MiB,
        16,
        compat="0.10",
        backing=True,
        snapshots=1,
        big=128 * KiB,
    ),
]


# --- the guest model -----------------------------------------------------------


class Model:
    """Guest content as {window index: bytes}; a missing window is zeros."""

    def __init__(self, windows: dict[int, bytes] | None = None):
        self.windows = dict(windows or {})

    def copy(self) -> Model:
        return Model(self.windows)

    def _put(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            w, into = divmod(offset + pos, W)
            n = min(W - into, len(data) - pos)
            buf = bytearray(self.windows.get(w, ZERO_W))
            buf[into : into + n] = data[pos : pos + n]
            self.windows[w] = bytes(buf)
            pos += n

    def write(self, offset: int, data: bytes) -> None:
        self._put(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self._put(offset, bytes(length))

    def get(self, w: int) -> np.ndarray:
        return np.frombuffer(self.windows.get(w, ZERO_W), dtype=np.uint8)


def read_windows(raw_path: str) -> dict[int, bytes]:
    """The non-zero windows of a raw file (holes skipped with SEEK_DATA)."""
    out: dict[int, bytes] = {}
    with open(raw_path, "rb") as f:
        fd = f.fileno()
        for data, hole in host_data(raw_path):
            for w in range(data // W, -(-hole // W)):
                buf = os.pread(fd, W, w * W).ljust(W, b"\0")
                if w not in out and any(buf):
                    out[w] = buf
    return out


def guest_windows(path: str, workdir: str, snapshot: str | None = None) -> dict[int, bytes]:
    """What qemu-img reads from the image (or one of its snapshots)."""
    raw = os.path.join(workdir, "read.raw")
    args = ["qemu-img", "convert", "-U", "-f", "qcow2"]
    if snapshot:
        args += ["-l", f"snapshot.name={snapshot}"]
    run(args + ["-O", "raw", path, raw])
    try:
        return read_windows(raw)
    finally:
        os.unlink(raw)


# --- building the images with qemu-img -------------------------------------------


@dataclass
class Base:
    config: Config
    dir: str
    path: str  # the pristine image; each run works on a copy
    initial: Model
    snapshots: dict[str, dict[int, bytes]]
    hot: list[tuple[int, int]]  # guest ranges with data before the workload
    zone: int  # guest offset where the compressed-write zone starts
    steps: list = field(default_factory=list)
    dry_ops: int = 0
    flush_points: list[int] = field(default_factory=list)


def qemu_io_write(path: str, pattern: int, offset: int, length: int) -> None:
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", path])


def build_base(config: Config, root: str) -> Base:
    d = os.path.join(root, config.name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "base.qcow2")
    size, cs = config.size, config.cluster_size
    zone = size - size // 8
    # Guest ranges holding data before the workload: in the backing file,
    # and in the image (to overwrite in place and, once a snapshot is
    # taken, to share with it). Small, so that reading the image is quick.
    backed = [(0, min(size // 16, MiB)), (size // 3, min(size // 32, MiB // 2))]
    backed.append((zone, min(size // 64, MiB // 4)))
    shared = [(size // 32, min(size // 64, MiB) + cs // 2), (size // 2, 4 * cs)]
    opts = [
        f"cluster_size={cs}",
        f"refcount_bits={config.refcount_bits}",
        f"compat={config.compat}",
    ]
    if config.extended_l2:
        opts.append("extended_l2=on")
    create = ["qemu-img", "create", "-f", "qcow2", "-o", ",".join(opts)]
    if config.backing:
        backing = os.path.join(d, "backing.qcow2")
        run(["qemu-img", "create", "-f", "qcow2", backing, str(size)])
        for i, (off, n) in enumerate(backed):
            qemu_io_write(backing, 0x40 + i, off, n)
        create += ["-b", "backing.qcow2", "-F", "qcow2"]
    run(create + [path, str(size)])
    for i, (off, n) in enumerate(shared):
        qemu_io_write(path, 0x20 + i, off, n)
    for s in range(config.snapshots):
        run(["qemu-img", "snapshot", "-c", f"s{s}", path])
        qemu_io_write(path, 0x30 + s, shared[0][0] + s * 3 * cs, 5 * cs)
    snapshots = {f"s{s}": guest_windows(path, d, f"s{s}") for s in range(config.snapshots)}
    hot = shared + (backed[:2] if config.backing else [])
    return Base(config, d, path, Model(guest_windows(path, d)), snapshots, hot, zone)


# --- the workload ------------------------------------------------------------------


def make_steps(base: Base, seed: int) -> list[tuple]:
    """A seeded list of operations; the model is replayed alongside later."""
    c = base.config
    rng = random.Random(seed)
    cs, size, zone = c.cluster_size, c.size, base.zone
    l2_span = cs * (cs // (16 if c.extended_l2 else 8))
    fresh = list(range(zone // cs, size // cs))
    rng.shuffle(fresh)
    compressed: list[int] = []
    steps: list[tuple] = []
    since_flush = 0

    def data_of(n: int) -> bytes:
        return rng.randbytes(n)

    def general_offset(n: int) -> int:
        kind = rng.random()
        if kind < 0.3:  # into the data shared with snapshots / in place
            off, length = rng.choice(base.hot)
            return max(0, min(zone - n, off + rng.randrange(-cs, length)))
        if kind < 0.5:  # across an L2 table boundary
            k = rng.randrange(1, max(2, zone // l2_span))
            return max(0, min(zone - n, k * l2_span - rng.randrange(1, max(2, n))))
        return rng.randrange(0, max(1, zone - n))

    # Three big writes at fixed places: they allocate new refcount blocks
    # and grow the refcount table where the configuration asks for it.
    big_at = set(rng.sample(range(1, c.steps), 3)) if c.big else set()
    while len(steps) < c.steps:
        if len(steps) in big_at:
            n = rng.randrange(c.big * 3 // 4, c.big + 1)
            steps.append(("write", general_offset(n), data_of(n)))
            since_flush += 1
            continue
        r = rng.random()
        if since_flush >= 3 and r < 0.25:
            steps.append(("flush",))
            since_flush = 0
            continue
        since_flush += 1
        if r < 0.45:
            n = rng.choice([1, rng.randrange(1, cs), rng.randrange(cs, 8 * cs)])
            steps.append(("write", general_offset(n), data_of(n)))
        elif r < 0.6:
            n = rng.randrange(1, 6 * cs)
            steps.append(("zero", general_offset(n), n, rng.random() < 0.75))
        elif r < 0.72:
            n = rng.randrange(1, 6) * cs
            off = general_offset(n) // cs * cs
            steps.append(("discard", off, n))
        elif r < 0.9 and fresh:
            cluster = fresh.pop()
            fill = rng.randrange(256)
            data = bytes([fill]) * (cs - 64) + data_of(64)
            steps.append(("compress", cluster * cs, data))
            compressed.append(cluster)
        elif compressed:
            cluster = rng.choice(compressed)
            if rng.random() < 0.5:
                n = rng.randrange(1, cs)
                steps.append(("write", cluster * cs + rng.randrange(cs - n + 1), data_of(n)))
            else:
                steps.append(("discard", cluster * cs, cs))
    return steps


def apply_model(model: Model, step: tuple, config: Config) -> None:
    kind = step[0]
    if kind in ("write", "compress"):
        model.write(step[1], step[2])
    elif kind == "zero":
        model.zero(step[1], step[2])
    elif kind == "discard":
        if config.compat == "0.10" and config.backing:
            return  # v2 cannot hide backing data: qimg (and QEMU) do nothing
        model.zero(step[1], step[2])


def apply_image(img, step: tuple) -> None:
    kind = step[0]
    if kind == "write":
        img.write(step[1], step[2])
    elif kind == "zero":
        img.write_zeroes(step[1], step[2], unmap=step[3])
    elif kind == "discard":
        img.discard(step[1], step[2])
    elif kind == "compress":
        blob = compress_cluster(step[2], img.header.compression_type)
        assert blob is not None, "workload data must compress"
        img.write_compressed(step[1], blob)
    elif kind == "flush":
        img.flush()


@dataclass
class Outcome:
    completed: int  # steps that returned before the crash (len(steps): none crashed)
    faulty: FaultyStorage
    closed: bool  # close() returned: everything is durable


def run_workload(path: str, steps: list[tuple], faulty_args: dict) -> Outcome:
    holder: dict = {}

    def wrap(storage):
        holder["faulty"] = FaultyStorage(storage, sync=False, **faulty_args)
        return holder["faulty"]

    img = open_image(path, "qcow2", writable=True, storage_wrapper=wrap)
    completed = 0
    try:
        for step in steps:
            apply_image(img, step)
            completed += 1
        img.close()
        return Outcome(completed, holder["faulty"], True)
    except SimulatedCrash:
        try:
            img.close()  # writes nothing more; releases the files and locks
        except SimulatedCrash:
            pass
        return Outcome(completed, holder["faulty"], False)


# --- checking one crashed image ---------------------------------------------------------


def qemu_check_no_corruption(path: str) -> dict:
    proc = run(["qemu-img", "check", "-f", "qcow2", "--output=json", path], check=False)
    assert proc.returncode in (0, 3), f"qemu-img check exited {proc.returncode}:\n{proc.stderr}"
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0, proc.stderr
    assert report.get("check-errors", 0) == 0, proc.stderr
    return report


def versions_of(base: Base) -> list[Model]:
    """versions[k]: the guest after k steps."""
    out = [base.initial.copy()]
    for step in base.steps:
        m = out[-1].copy()
        apply_model(m, step, base.config)
        out.append(m)
    return out


def durable_index(steps: list[tuple], completed: int, closed: bool) -> int:
    """Steps made durable: those before the last flush that returned."""
    if closed:
        return len(steps)
    last = 0
    for i in range(completed):
        if steps[i][0] == "flush":
            last = i + 1
    return last


def check_data(actual: dict, versions: list[Model], durable: int, last: int, kill: bool) -> str:
    """'' if the data keeps the promise, else a description of the first bad byte.

    versions[durable] is what the last flush made durable; versions
    (durable, last] are what the steps since (and the one in progress) made.
    """
    keys = set(actual)
    for v in versions[durable : last + 1]:
        keys |= set(v.windows)
    for w in sorted(keys):
        got = np.frombuffer(actual.get(w, ZERO_W), dtype=np.uint8)
        old = versions[durable].get(w)
        newer = [v.get(w) for v in versions[durable + 1 : last + 1]]
        touched = np.zeros(W, dtype=bool)
        for v in newer:
            touched |= v != old
        bad = (got != old) & ~touched
        if kill:
            ok = got == old
            for v in newer:
                ok |= got == v
            bad |= ~ok
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = "flushed data changed" if not touched[i] else "neither old nor new data"
            return (
                f"{what} at guest offset {w * W + i:#x}: read {got[i]:#x}, "
                f"flushed {old[i]:#x}, {int(bad.sum())} bad bytes in window"
            )
    return ""


def crash_points(base: Base, mode: str, rng: random.Random) -> list[int]:
    n = base.dry_ops
    if base.config.every_point or n <= MAX_POINTS:
        return list(range(n))
    # Every flush (power loss there drops the most), then random points.
    points = set(base.flush_points)
    points |= {p - 1 for p in base.flush_points if p}
    points = set(rng.sample(sorted(points), min(len(points), MAX_POINTS // 2)))
    rest = [p for p in range(n) if p not in points]
    points |= set(rng.sample(rest, min(len(rest), MAX_POINTS - len(points))))
    return sorted(points)


# --- fixtures ----------------------------------------------------------------------------

_BASES: dict[str, Base] = {}


def header_fields(path: str) -> tuple[int, int, set[int]]:
    """(refcount table offset, refcount blocks in use, L1 entries in use)."""
    with open(path, "rb") as f:
        head = f.read(72)
        l1_size, l1_offset = struct.unpack_from(">IQ", head, 36)
        rt_offset, rt_clusters = struct.unpack_from(">QI", head, 48)
        cs = 1 << struct.unpack_from(">I", head, 20)[0]
        f.seek(rt_offset)
        table = np.frombuffer(f.read(rt_clusters * cs), dtype=">u8")
        f.seek(l1_offset)
        l1 = np.frombuffer(f.read(l1_size * 8), dtype=">u8")
    return rt_offset, int(np.count_nonzero(table)), set(l1[l1 != 0].tolist())


@pytest.fixture(scope="module")
def bases(tmp_path_factory, qemu_img, qemu_io):
    return (_BASES, str(tmp_path_factory.mktemp("crash")))


def prepared(bases, config: Config) -> Base:
    """Build the image and dry-run the workload once per configuration."""
    cache, root = bases
    if config.name in cache:
        return cache[config.name]
    base = build_base(config, root)
    base.steps = make_steps(base, seed=zlib.crc32(config.name.encode()))
    work = os.path.join(base.dir, "dry.qcow2")
    shutil.copyfile(base.path, work)
    outcome = run_workload(work, base.steps, {})
    assert outcome.closed
    base.dry_ops = outcome.faulty.op_count
    base.flush_points = outcome.faulty.flush_points
    # Without a crash the result is clean and exactly the model's final state.
    report = qemu_check_no_corruption(work)
    assert report.get("leaks", 0) == 0, report
    versions = versions_of(base)
    n = len(base.steps)
    assert check_data(guest_windows(work, base.dir), versions, n, n, True) == ""
    before, after = header_fields(base.path), header_fields(work)
    assert after[2] - before[2], "the workload must allocate new L2 tables"
    if config.new_blocks:
        assert after[1] > before[1], "the workload must create refcount blocks"
    if config.grows_table:
        assert after[0] != before[0], "the workload must grow the refcount table"
    cache[config.name] = base
    return base


# --- the tests -----------------------------------------------------------------------------


def crash_and_check(base: Base, mode: str, point: int, versions: list[Model]) -> str:
    """Run to `point`, crash, judge with qemu-img; '' when all promises hold."""
    work = os.path.join(base.dir, f"crash-{mode}.qcow2")
    shutil.copyfile(base.path, work)
    args = {"crash_at": point, "mode": mode, "seed": point, "tear": point % 2 == 1}
    outcome = run_workload(work, base.steps, args)
    where = f"{base.config.name} {mode} crash at operation {point}/{base.dry_ops}"
    proc = run(["qemu-img", "check", "-f", "qcow2", "--output=json", work], check=False)
    report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    if (
        proc.returncode not in (0, 3)
        or report.get("corruptions", 0)
        or report.get("check-errors", 0)
    ):
        return f"{where}: qemu-img check exited {proc.returncode}\n{proc.stderr[:2000]}"
    durable = durable_index(base.steps, outcome.completed, outcome.closed)
    last = min(outcome.completed + 1, len(base.steps))
    problem = check_data(
        guest_windows(work, base.dir), versions, durable, last, kill=mode == "kill"
    )
    if problem:
        return f"{where} (step {outcome.completed}, durable {durable}): {problem}"
    for name, expected in base.snapshots.items():
        if guest_windows(work, base.dir, name) != expected:
            return f"{where}: snapshot {name} changed"
    return ""


@pytest.mark.parametrize("mode", ["kill", "power"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_crash_leaks_but_never_corrupts(bases, config, mode):
    base = prepared(bases, config)
    versions = versions_of(base)
    rng = random.Random(f"{config.name}-{mode}")
    failures = []
    for point in crash_points(base, mode, rng):
        problem = crash_and_check(base, mode, point, versions)
        if problem:
            failures.append(problem)
    assert not failures, f"{len(failures)} bad crash points:\n" + "\n".join(failures[:5])


def test_kill_leaves_exactly_a_prefix_of_the_operations(tmp_path):
    from qimg.storage import FileStorage

    path = str(tmp_path / "f")
    inner = FileStorage(path, create=True, lock=False)
    faulty = FaultyStorage(inner, crash_at=2, mode="kill")
    faulty.pwrite(0, b"a" * 10)
    faulty.pwrite(5, b"b" * 10)
    with pytest.raises(SimulatedCrash):
        faulty.pwrite(0, b"c" * 20)
    with pytest.raises(SimulatedCrash):
        faulty.flush()
    faulty.close()
    assert open(path, "rb").read() == b"aaaaa" + b"b" * 10


def test_power_loss_keeps_flushed_writes_and_a_subset_of_the_rest(tmp_path):
    from qimg.storage import FileStorage

    seen = set()
    for seed in range(40):
        path = str(tmp_path / f"f{seed}")
        faulty = FaultyStorage(
            FileStorage(path, create=True, lock=False), crash_at=4, mode="power", seed=seed
        )
        faulty.pwrite(0, b"a" * 4)
        faulty.flush()
        faulty.pwrite(4, b"b" * 4)  # extends the file
        faulty.pwrite(0, b"c" * 2)
        with pytest.raises(SimulatedCrash):
            faulty.truncate(100)
        faulty.close()
        data = open(path, "rb").read()
        assert data in (b"aaaa", b"aaaabbbb", b"ccaa", b"ccaabbbb"), data
        seen.add(data)
    assert len(seen) == 4  # every subset of the two un-flushed writes occurs


def test_a_crash_reaches_the_caller_and_nothing_is_written_after_it(tmp_path):
    """At every crash point of a workload touching every write path (data,
    zeros, discard, compressed, flush, close), the crash propagates out of
    the engine: no handler in it (except Exception, except QimgError, the
    cleanup on close) swallows it and carries on. After it the file stays
    exactly as the crash left it, close() included."""
    from qimg.api import create_image

    base = str(tmp_path / "base.qcow2")
    create_image(base, "qcow2", 4 * MiB, {"cluster_size": "4096"})
    steps = [
        ("write", 0, b"\x01" * 6000),
        ("zero", 64 * KiB, 8192, True),
        ("write", MiB, b"\x02" * 4096),
        ("flush",),
        ("discard", MiB, 4096),
        ("compress", 2 * MiB, b"\x03" * 4096),
        ("zero", 0, 4096, False),
    ]
    shutil.copyfile(base, tmp_path / "dry.qcow2")
    dry = run_workload(str(tmp_path / "dry.qcow2"), steps, {})
    assert dry.closed and dry.faulty.op_count > len(steps)
    for point in range(dry.faulty.op_count):
        work = str(tmp_path / f"crash-{point}.qcow2")
        shutil.copyfile(base, work)
        holder = {}

        def wrap(storage, holder=holder, point=point):
            holder["faulty"] = FaultyStorage(storage, crash_at=point, sync=False)
            return holder["faulty"]

        img = open_image(work, "qcow2", writable=True, storage_wrapper=wrap)
        with pytest.raises(SimulatedCrash):
            for step in steps:
                apply_image(img, step)
            img.close()
        after_crash = open(work, "rb").read()
        try:
            img.close()
        except SimulatedCrash:
            pass
        assert len(holder["faulty"].log) == point, f"crash at {point}: operations went on"
        assert open(work, "rb").read() == after_crash, f"crash at {point}: close wrote"
