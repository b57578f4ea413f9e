"""Benchmark: qimg convert against qemu-img convert, same machine, same run.

Workloads (issue 4):
- a 4 GiB raw file holding about 1 GiB of mixed data (1 MiB chunks every
  4 MiB, alternately text-like and random; the rest holes), converted to
  qcow2, back to raw, qcow2 -> qcow2, -c zlib (default and fast levels),
  -c zstd, and the zlib / zstd compressed images back to raw;
- real data: an ext4 image made with `mkfs.ext4 -d /usr/lib` converted
  with -c.

Prints wall-time ratios (qimg / qemu-img, median), peak memory and the
compressed sizes of both tools. Usage:

    python bench/bench_convert.py [--dir DIR] [--quick] [--repeat N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QIMG, compare, print_table  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


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
    """Remove outputs of an earlier workload (both tools recreate their
    target on each repetition, so a run's output survives for the size check)."""
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)


def _sync() -> None:
    os.sync()  # start each run without the previous run's dirty pages


def _default_parent() -> str | None:
    """tmpfs where there is one: timings then measure the tools, not the
    disk's writeback (which varies several-fold between runs on a VM)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def _size(path: str) -> int:
    return os.path.getsize(path)


def workloads(workdir: str) -> list[dict]:
    """bench/run.py's protocol: every workload at full size, rows returned."""
    return main([], workdir)


def main(argv: list[str] | None = None, workdir: str | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir in /dev/shm)")
    ap.add_argument("--quick", action="store_true", help="1 GiB image, one repetition")
    ap.add_argument("--only", nargs="*", default=None, help="workload names to run")
    ap.add_argument("--no-ext4", action="store_true", help="skip the real-data workload")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs per tool of the shorter workloads (default 3)"
    )
    args = ap.parse_args(argv)

    work = (
        workdir or args.dir or tempfile.mkdtemp(prefix="qimg-bench-convert-", dir=_default_parent())
    )
    os.makedirs(work, exist_ok=True)
    size = GiB if args.quick else 4 * GiB
    rep = 1 if args.quick else args.repeat

    def p(name: str) -> str:
        return os.path.join(work, name)

    src = p("mixed.raw")
    if not os.path.exists(src) or os.path.getsize(src) != size:
        make_mixed_raw(src, size)
    # Inputs for the qcow2 and compressed directions, made by qemu-img.
    for name, extra in (
        ("mixed.qcow2", []),
        ("mixed-zlib.qcow2", ["-c"]),
        ("mixed-zstd.qcow2", ["-c", "-o", "compression_type=zstd"]),
    ):
        if not os.path.exists(p(name)):
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", *extra, src, p(name)], check=True)

    out_q, out_e = p("out-qimg"), p("out-qemu")
    workloads = [
        ("raw->qcow2", ["-O", "qcow2", src], rep),
        ("qcow2->raw", ["-O", "raw", p("mixed.qcow2")], rep),
        ("qcow2->qcow2", ["-O", "qcow2", p("mixed.qcow2")], rep),
        ("-c zlib (default level)", ["-O", "qcow2", "-c", src], 1),
        ("-c zstd", ["-O", "qcow2", "-c", "-o", "compression_type=zstd", src], rep),
        ("zlib qcow2->raw", ["-O", "raw", p("mixed-zlib.qcow2")], rep),
        ("zstd qcow2->raw", ["-O", "raw", p("mixed-zstd.qcow2")], rep),
    ]
    fast = ("-c zlib --compression-level fast", ["-O", "qcow2", "-c", src], 1)

    if not args.no_ext4 and (not args.only or "ext4 -c zlib" in args.only):
        ext4 = p("ext4.raw")
        if os.path.exists(ext4) or make_ext4(ext4):
            workloads.append(("ext4 -c zlib", ["-O", "qcow2", "-c", ext4], 1))

    # The ratios only mean something on an idle machine: say how busy it was.
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    sizes = []
    for name, cmd, n in workloads:
        if args.only and name not in args.only:
            continue
        _rm(out_q, out_e)
        r = compare(
            name,
            QIMG + ["convert", *cmd, out_q],
            ["qemu-img", "convert", *cmd, out_e],
            repeat=n,
            setup=_sync,
        )
        rows.append(r)
        if "-c" in cmd:
            sizes.append((name, _size(out_q), _size(out_e)))
        print_table([r])
    if not args.only or fast[0] in args.only:
        # Only qimg has levels: compare against qemu-img's default -c.
        name, cmd, n = fast
        _rm(out_q, out_e)
        r = compare(
            name,
            QIMG + ["convert", *cmd, "--compression-level", "fast", out_q],
            ["qemu-img", "convert", *cmd, out_e],
            repeat=n,
            setup=_sync,
        )
        rows.append(r)
        sizes.append((name, _size(out_q), _size(out_e)))
        print_table([r])

    print()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print_table(rows)
    print()
    print(f"{'compressed target':<44}{'qimg bytes':>14}{'qemu bytes':>14}{'size ratio':>12}")
    for name, a, b in sizes:
        print(f"{name:<44}{a:>14}{b:>14}{a / b:>12.4f}")
    _rm(out_q, out_e)
    return rows


if __name__ == "__main__":
    main()
