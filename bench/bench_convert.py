"""Benchmark: qimg convert against qemu-img convert, same machine, same run.

Workloads (issues 4 and 15):
- a 4 GiB raw file holding about 1 GiB of mixed data (1 MiB chunks every
  4 MiB, alternately text-like and random; the rest holes), converted to
  qcow2, back to raw and qcow2 -> qcow2 on the file system of every bench
  directory (by default the disk's, ext4 here, and tmpfs in /dev/shm);
- the same pattern with 8 GiB of data (--big GIB), where there is room;
- on the disk's directory: -c zlib (default and fast levels), -c zstd,
  the zlib / zstd compressed images back to raw, and real data (an ext4
  image made with `mkfs.ext4 -d /usr/lib`) with -c;
- with --modes, each cache mode (-t) of raw->qcow2 and qcow2->raw there;
- with --floor, instead of all of the above, the uncompressed workloads
  of every bench directory (and with --big, the large one) with floor
  rows, all alternating: `python3 -c pass`, qimg's start-up (a 1 MiB
  convert), and processes of copy_floor.py given the data runs (from
  qemu-img map, before the clock starts): the target's writes alone (one
  thread, one buffer: the kernel serialises a file's buffered writes, so
  this is the least any copy into one target spends writing), the same
  after importing every module qimg's convert imports, and those imports
  + a read and write of each run, on one thread, and with the reads on a
  second thread; then zstd qcow2->raw on the disk's directory with its
  floor rows (start-up, the imports + the writes, and those imports + a
  read and decompression through libzstd on two threads). A ratio target
  below the last rows' ratios is out of reach of work on the copy itself.

Every run writes a fresh target (the previous one removed, untimed), after
os.sync(); both tools run with their defaults (convert's target cache
mode: unsafe) unless a row names a mode. Prints wall-time ratios (qimg /
qemu-img, median of --repeat), peak memory and the compressed sizes of
both tools. Usage:

    python bench/bench_convert.py [--dir DIR ...] [--big GIB] [--modes] [--floor]
                                  [--quick] [--repeat N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    QIMG,
    compare,
    compile_qimg,
    data_runs,
    filesystem,
    floor_table,
    list_modules,
    print_table,
    write_runs,
)

MiB = 1 << 20
GiB = 1 << 30
FLOOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "copy_floor.py")


def _text_block(seed: int, size: int) -> bytes:
    """Text-like bytes: words drawn from a small vocabulary, in lines."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = (
        b"the of and to in is that for it as was with be by on not he this are or his from "
        b"at which but have an they you were her she there been one all we their has would "
        b"when if so no will more about can my what out up them into some could time only "
        b"disk image cluster refcount table qemu block driver snapshot backing offset length"
    ).split()
    idx = rng.integers(0, len(words), size // 4)
    out = bytearray()
    line = 0
    for i in idx.tolist():
        out += words[i]
        line += 1
        out += b"\n" if line % 12 == 0 else b" "
        if len(out) >= size:
            break
    return bytes(out[:size])


def make_mixed_raw(path: str, size: int = 4 * GiB, step: int = 4 * MiB) -> None:
    """1 MiB chunks every `step`, alternately text-like and random."""
    texts = [_text_block(i, MiB) for i in range(8)]
    with open(path, "wb") as f:
        f.truncate(size)
        for n, off in enumerate(range(0, size, step)):
            data = texts[(n // 2) % len(texts)] if n % 2 == 0 else os.urandom(MiB)
            os.pwrite(f.fileno(), data, off)


EXT4_SOURCE = "/usr/lib/x86_64-linux-gnu"  # binaries and libraries, ~700 MB here


def make_ext4(path: str, source_dir: str = EXT4_SOURCE) -> bool:
    """An ext4 image filled from `source_dir` (sized for it with room to
    spare); False where mkfs.ext4 or the directory is missing."""
    if shutil.which("mkfs.ext4") is None or not os.path.isdir(source_dir):
        return False
    du = subprocess.run(["du", "-sb", source_dir], capture_output=True, text=True, check=True)
    used = int(du.stdout.split()[0])
    size = (used * 3 // 2 // MiB + 256) * MiB
    try:
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", source_dir, path, str(size // 1024) + "k"],
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError:
        os.unlink(path)  # never time a half-populated file system
        raise
    return True


def _rm(*paths: str):
    for p in paths:
        if os.path.lexists(p):
            os.unlink(p)


def _sync() -> None:
    os.sync()  # start each run without the previous run's dirty pages


def _size(path: str) -> int:
    """Bytes allocated: a compressed qcow2 file grows a cluster at a time,
    so its length hides differences of up to a cluster per run of
    compressed clusters (qemu-img's zlib and zstd targets of the mixed
    image have the same length)."""
    return os.stat(path).st_blocks * 512


def _free(path: str) -> int:
    """Bytes the file system of `path` can still take (tmpfs: also bounded
    by the memory available, which is what it is made of)."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if filesystem(path) == "tmpfs":
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = min(free, int(info["MemAvailable"].split()[0]) * 1024)
    return free


def default_dirs(workdir: str | None) -> tuple[list[str], list[str]]:
    """A directory on the disk (`workdir`, else one made under /var/tmp)
    and one on tmpfs (/dev/shm), where there is one; and those made here
    (to remove at the end)."""
    made = []
    disk = workdir
    if disk is None:
        disk = tempfile.mkdtemp(prefix="qimg-bench-convert-", dir="/var/tmp")
        made.append(disk)
    dirs = [disk]
    if os.path.isdir("/dev/shm") and filesystem(disk) != "tmpfs":
        shm = tempfile.mkdtemp(prefix="qimg-bench-convert-", dir="/dev/shm")
        dirs.append(shm)
        made.append(shm)
    return dirs, made


def workloads(workdir: str, dirs: list[str] | None = None) -> list[dict]:
    """bench/run.py's protocol: every workload at full size (the disk's
    file system in `workdir`, tmpfs in /dev/shm, or those of `dirs`; the
    8 GiB-data workload where there is room; the cost of each cache
    mode), rows returned."""
    return main(["--big", "8", "--modes", *(f"--dir={d}" for d in dirs or ())], workdir)


class Bench:
    """Runs workloads and keeps their rows; `only` limits them by name."""

    def __init__(self, only: list[str] | None, repeat: int):
        self.only = only
        self.repeat = repeat
        self.rows: list[dict] = []
        self.sizes: list[tuple[str, int, int]] = []

    def wanted(self, name: str) -> bool:
        return not self.only or name in self.only or name.split(" ", 1)[-1] in self.only

    def run(self, name, args, out_dir, repeat=None, qimg_extra=(), keep_both=True, size=False):
        """`convert ARGS TARGET` by both tools into `out_dir`."""
        if not self.wanted(name):
            return
        out_q, out_e = os.path.join(out_dir, "out-qimg"), os.path.join(out_dir, "out-qemu")
        _rm(out_q, out_e)

        def setup():
            if not keep_both:  # room for one target at a time
                _rm(out_q, out_e)
            _sync()

        r = compare(
            name,
            QIMG + ["convert", *args, *qimg_extra, out_q],
            ["qemu-img", "convert", *args, out_e],
            repeat=repeat or self.repeat,
            setup=setup,
            targets=(out_q, out_e),
        )
        self.rows.append(r)
        if size:
            self.sizes.append((name, _size(out_q), _size(out_e)))
        print_table([r])
        _rm(out_q, out_e)


def make_inputs(d: str, size: int, step: int = 4 * MiB, qcow2: bool = True) -> tuple[str, str]:
    """The mixed raw image of `size` bytes in `d`, and its qcow2 (by
    qemu-img), made once."""
    raw, q = make_inputs_names(d, size)
    if not os.path.exists(raw) or os.path.getsize(raw) != size:
        # In a child: numpy in this process would count in every timed
        # command's peak memory (a child's ru_maxrss starts from the
        # parent's, which it is forked from).
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--make-mixed", raw, str(size), str(step)],
            check=True,
        )
    if qcow2 and not os.path.exists(q):
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, q], check=True)
    return raw, q


def uncompressed(bench: Bench, d: str, size: int, label: str, lean: bool = False) -> None:
    """raw->qcow2, qcow2->raw and qcow2->qcow2 on the file system of `d`.
    `lean`: two images of the data at most at any time (one target at a
    time; the raw input removed once its qcow2 is made, after raw->qcow2)."""
    fs = filesystem(d)
    names = [f"{fs} {label} {w}" for w in ("raw->qcow2", "qcow2->raw", "qcow2->qcow2")]
    if not any(bench.wanted(n) for n in names):
        return
    raw, q = make_inputs(d, size, qcow2=not lean)
    keep_both = not lean
    bench.run(names[0], ["-O", "qcow2", raw], d, keep_both=keep_both)
    if lean:
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, q], check=True)
        _rm(raw)
    bench.run(names[1], ["-O", "raw", q], d, keep_both=keep_both)
    bench.run(names[2], ["-O", "qcow2", q], d, keep_both=keep_both)


def compressed_input(d: str, raw: str, compression_type: str) -> str:
    """qemu-img's compressed qcow2 of `raw` (compression_type zlib or
    zstd) in `d`, made once."""
    path = os.path.join(d, f"mixed-{compression_type}.qcow2")
    if not os.path.exists(path):
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-c", "-o",
                        f"compression_type={compression_type}", raw, path], check=True)  # fmt: skip
    return path


def compressed(bench: Bench, d: str, size: int, with_ext4: bool) -> None:
    """The compressed workloads, on the file system of `d`."""
    fs = filesystem(d)
    raw, _ = make_inputs(d, size, qcow2=False)
    inputs = {name: compressed_input(d, raw, name) for name in ("zlib", "zstd")}
    bench.run(f"{fs} -c zlib (default level)", ["-O", "qcow2", "-c", raw], d, 1, size=True)
    bench.run(
        f"{fs} -c zstd", ["-O", "qcow2", "-c", "-o", "compression_type=zstd", raw], d, size=True
    )
    bench.run(f"{fs} zlib qcow2->raw", ["-O", "raw", inputs["zlib"]], d)
    bench.run(f"{fs} zstd qcow2->raw", ["-O", "raw", inputs["zstd"]], d)
    # Only qimg has levels: against qemu-img's default -c.
    fast = ("--compression-level", "fast")
    bench.run(f"{fs} -c zlib --compression-level fast", ["-O", "qcow2", "-c", raw], d, 1,
              qimg_extra=fast, size=True)  # fmt: skip
    if with_ext4 and bench.wanted(f"{fs} ext4 -c zlib"):
        ext4 = os.path.join(d, "ext4.raw")
        if os.path.exists(ext4) or make_ext4(ext4):
            bench.run(f"{fs} ext4 -c zlib", ["-O", "qcow2", "-c", ext4], d, 1, size=True)


def write_zstd_runs(source: str, runs_file: str, writes_file: str) -> None:
    """RUNS for copy_floor.py's zstd2, with the cluster size on stdout:
    each compressed cluster of the qcow2 `source` as (host, -stream
    bytes, guest), each plain run as (host, length, guest), in guest
    order, from qimg's block status (run in a child: see make_inputs);
    and in `writes_file`, the runs of guest data a raw target receives."""
    from qimg.api import open_image
    from qimg.driver import COMPRESSED, DATA
    from qimg.formats.qcow2.entries import compressed_span

    image = open_image(source, "qcow2", force_share=True)
    try:
        runs = []
        for ext in image.block_status(0, image.size):
            if ext.kind == COMPRESSED:
                lo, hi = compressed_span(ext.host, image.geo)
                runs.append((lo, lo - hi, ext.offset))
            elif ext.kind == DATA:
                runs.append((ext.host, ext.length, ext.offset))
        write_runs(runs, runs_file)
        writes: list[tuple[int, int, int]] = []
        for _host, length, guest in runs:
            length = image.geo.cluster_size if length < 0 else length
            if writes and writes[-1][2] + writes[-1][1] == guest:
                writes[-1] = (0, writes[-1][1] + length, writes[-1][2])
            else:
                writes.append((0, length, guest))
        write_runs(writes, writes_file)
        print(image.geo.cluster_size)
    finally:
        image.close()


def zstd_floor(d: str, size: int, repeat: int) -> list[dict]:
    """--floor: zstd qcow2->raw on `d`'s file system with its floor rows:
    start-up, the writes alone after qimg's imports, and those imports +
    reading and decompressing on two threads (copy_floor.py zstd2)."""
    fs = filesystem(d)
    raw, _ = make_inputs(d, size, qcow2=False)
    source = compressed_input(d, raw, "zstd")
    tiny, out_q, out_e, fresh = _floor_files(d)
    runs_file, writes_file = os.path.join(d, "zruns.bin"), os.path.join(d, "zwrites.bin")
    modules_file = os.path.join(d, "modules.txt")
    cluster = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--zstd-runs", source, runs_file, writes_file],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    compile_qimg()
    cmd = ["-O", "raw", source]
    fresh()
    list_modules(modules_file, ["convert", *cmd, out_q])
    floor = [sys.executable, FLOOR]
    labelled = [
        ("qimg", QIMG + ["convert", *cmd, out_q]),
        ("qemu-img", ["qemu-img", "convert", *cmd, out_e]),
        ("qimg start-up (1 MiB convert)", QIMG + ["convert", "-O", "raw", tiny, out_q]),
        (
            "qimg's imports + the writes",
            [*floor, "imports+writes", source, out_q, writes_file, modules_file],
        ),
        (
            "imports + read, decompress (2 threads) and write",
            [*floor, "imports+zstd2", source, out_q, runs_file, modules_file, cluster],
        ),
    ]
    rows = floor_table(f"{fs} zstd qcow2->raw", labelled, repeat, fresh)
    fresh()
    _rm(tiny, runs_file, writes_file, modules_file)
    return rows


def cache_modes(bench: Bench, d: str, size: int) -> None:
    """What each target cache mode costs, both tools, on `d`'s file system."""
    fs = filesystem(d)
    raw, q = make_inputs(d, size)
    for mode in ("unsafe", "writeback", "writethrough", "none", "directsync"):
        bench.run(f"{fs} -t {mode} raw->qcow2", ["-t", mode, "-O", "qcow2", raw], d)
        bench.run(f"{fs} -t {mode} qcow2->raw", ["-t", mode, "-O", "raw", q], d)


def _floor_files(d: str):
    """What every floor table in `d` uses: a 1 MiB raw file (qimg's
    start-up row converts it), the two targets, and fresh(), which removes
    them before each run."""
    tiny = os.path.join(d, "tiny.raw")
    with open(tiny, "wb") as f:
        f.write(os.urandom(MiB))
    out_q, out_e = os.path.join(d, "floor-qimg"), os.path.join(d, "floor-qemu")

    def fresh() -> None:
        _rm(out_q, out_e)
        os.sync()  # no run pays for the previous one's dirty pages

    return tiny, out_q, out_e, fresh


def floors(d: str, size: int, repeat: int) -> list[dict]:
    """--floor: the uncompressed workloads on `d`'s file system, each with
    its floor rows (see the module's docstring)."""
    fs = filesystem(d)
    raw, q = make_inputs(d, size)
    tiny, out_q, out_e, fresh = _floor_files(d)
    runs_file, modules_file = os.path.join(d, "runs.bin"), os.path.join(d, "modules.txt")
    compile_qimg()
    rows = []
    floor = [sys.executable, FLOOR]
    for name, src_fmt, fmt, source in (
        ("raw->qcow2", "raw", "qcow2", raw),
        ("qcow2->raw", "qcow2", "raw", q),
        ("qcow2->qcow2", "qcow2", "qcow2", q),
    ):
        cmd = ["-f", src_fmt, "-O", fmt, source]
        write_runs(data_runs(source, src_fmt, fmt), runs_file)
        fresh()  # untimed: the modules qimg's convert imports
        list_modules(modules_file, ["convert", *cmd, out_q])
        labelled = [
            ("qimg", QIMG + ["convert", *cmd, out_q]),
            ("qemu-img", ["qemu-img", "convert", *cmd, out_e]),
            ("python3 -c pass", [sys.executable, "-c", "pass"]),
            ("qimg start-up (1 MiB convert)", QIMG + ["convert", "-O", fmt, tiny, out_q]),
            ("the target's writes alone", [*floor, "writes", source, out_q, runs_file]),
            (
                "qimg's imports + the writes",
                [*floor, "imports+writes", source, out_q, runs_file, modules_file],
            ),
            (
                "imports + read and write, one thread",
                [*floor, "imports+copy", source, out_q, runs_file, modules_file],
            ),
            (
                "imports + read and write, two threads",
                [*floor, "imports+copy2", source, out_q, runs_file, modules_file],
            ),
        ]
        rows += floor_table(f"{fs} {size / 4 / GiB:g}G-data {name}", labelled, repeat, fresh)
    fresh()
    _rm(tiny, runs_file, modules_file)
    return rows


def big_dirs(dirs: list[str], big: int, copies: int):
    """A directory "big" in each of `dirs` with room for `copies` images of
    the `big`-byte workload's data (plus a GiB), for the workload's inputs;
    removed, with them, once the caller is done with it. None when `big` is 0."""
    if not big:
        return
    for d in dirs:
        if _free(d) < big // 4 * copies + GiB:
            print(f"({filesystem(d)}: no room for {big // 4 / GiB:g} GiB of data in {d})")
            continue
        big_dir = os.path.join(d, "big")
        os.makedirs(big_dir, exist_ok=True)
        try:
            yield big_dir
        finally:
            shutil.rmtree(big_dir)


def main(argv: list[str] | None = None, workdir: str | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dir",
        action="append",
        default=None,
        help="a bench directory: the uncompressed workloads run on its file system "
        "(repeatable; default: one on the disk and one in /dev/shm). Inputs are kept "
        "there for the next run; the compressed workloads run in the first one not on tmpfs.",
    )
    ap.add_argument("--quick", action="store_true", help="1 GiB image, one repetition")
    ap.add_argument("--only", nargs="*", default=None, help="workload names to run")
    ap.add_argument("--no-ext4", action="store_true", help="skip the real-data workload")
    ap.add_argument(
        "--big",
        type=float,
        default=0,
        help="GiB of data in the large workload (8 for issue 15's; default 0: not run); "
        "skipped on a file system without room for it",
    )
    ap.add_argument("--modes", action="store_true", help="time each cache mode (-t)")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="only the uncompressed workloads, each with its floor rows",
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs per tool of the shorter workloads (default 3)"
    )
    args = ap.parse_args(argv)

    made: list[str] = []
    if args.dir:
        dirs = args.dir
    else:
        dirs, made = default_dirs(workdir)
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    disk = next((d for d in dirs if filesystem(d) != "tmpfs"), dirs[0])
    size = GiB if args.quick else 4 * GiB
    bench = Bench(args.only, 1 if args.quick else args.repeat)

    # The ratios only mean something on an idle machine: say how busy it was.
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    big = int(args.big * 4 * GiB)
    if args.floor:
        try:
            rows = [row for d in dirs for row in floors(d, size, args.repeat)]
            for big_dir in big_dirs(dirs, big, 4):  # floors keep both targets
                rows += floors(big_dir, big, args.repeat)
            return rows + zstd_floor(disk, size, args.repeat)
        finally:
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
    try:
        for d in dirs:
            uncompressed(bench, d, size, f"{size // 4 // GiB or 0.25}G-data")
        for big_dir in big_dirs(dirs, big, 2):
            uncompressed(bench, big_dir, big, f"{args.big:g}G-data", lean=True)
        compressed(bench, disk, size, not args.no_ext4)
        if args.modes:
            cache_modes(bench, disk, size)
    finally:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)

    print()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_table(bench.rows)
    print()
    print(
        f"{'compressed target (allocated)':<48}{'qimg bytes':>14}{'qemu bytes':>14}{'size ratio':>12}"
    )
    for name, a, b in bench.sizes:
        print(f"{name:<48}{a:>14}{b:>14}{a / b:>12.4f}")
    return bench.rows


def make_inputs_names(d: str, size: int) -> tuple[str, str]:
    tag = f"{size // GiB}g"
    return os.path.join(d, f"mixed-{tag}.raw"), os.path.join(d, f"mixed-{tag}.qcow2")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--make-mixed"]:
        make_mixed_raw(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1:2] == ["--zstd-runs"]:
        write_zstd_runs(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
