#!/usr/bin/env python3
"""Benchmark the qcow2 cluster codecs that qimg can choose from.

Usage: python bench/codecs.py [--quick] [--repeat N] [--text-mb N] [--random-mb N]
                              [--binaries-mb N]

Compresses 64 KiB clusters of three data sets, one cluster per call as
`qimg convert -c` does, on one thread:

  text      Python sources, C headers and Perl modules on this machine
  random    os.urandom (incompressible: every cluster is stored as is)
  binaries  shared libraries from /usr/lib/x86_64-linux-gnu, then programs
            from /usr/bin, concatenated (real binaries)

For each candidate it prints MB/s of input, the stored size as a percentage
of the input, and the stored size relative to stdlib zlib level 6 (memLevel
9), which is what qemu-img writes. "Stored" applies QEMU's rule
(compress.max_compressed_size): a cluster whose compressed form does not fit
is stored uncompressed, cluster_size bytes. All-zero clusters are left out,
since convert does not write them.

Speeds are CPU time of this process (time.process_time), the best of
--repeat runs after a warm-up: on a shared VM, wall time swings by a third
from run to run with other tenants' load, CPU time much less. The pool
section uses wall time, since that is what threads can improve.

Every deflate candidate runs at wbits -12 (QEMU's 4 KiB window) and every
output is inflated back with stdlib zlib.decompressobj(-12) as a check.
Then it times decompression and the thread pools
(ClusterCompressor/ClusterDecompressor) with the choices
qimg/formats/qcow2/compress.py made.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterable, Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qimg.formats.qcow2 import compress  # noqa: E402
from qimg.formats.qcow2.layout import (  # noqa: E402
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_COMPRESSION_TYPE_ZSTD,
)

CLUSTER_SIZE = 65536
MB = 1_000_000  # speeds are in MB/s
MIB = 1 << 20  # data set sizes are in MiB
ZLIB = QCOW2_COMPRESSION_TYPE_ZLIB
ZSTD = QCOW2_COMPRESSION_TYPE_ZSTD


# --- data sets -----------------------------------------------------------------


def _files(root: str, match: Callable[[str], bool], recursive: bool = True) -> Iterator[str]:
    """Files under `root` whose name satisfies `match`, in sorted order so
    runs are repeatable. os.walk does not follow symlinked directories
    (glob's ** does, into loops)."""
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for name in sorted(names):
            if match(name):
                yield os.path.join(directory, name)
        if not recursive:
            return


def _gather(sources: Iterable[Iterator[str]], limit: int) -> bytes:
    """The regular files from `sources` concatenated, each once, up to
    `limit` bytes."""
    parts: list[bytes] = []
    total = 0
    seen: set[str] = set()
    for source in sources:
        for path in source:
            real = os.path.realpath(path)
            if real in seen or not os.path.isfile(real):
                continue
            seen.add(real)
            try:
                with open(real, "rb") as f:
                    data = f.read(limit - total)
            except OSError:
                continue
            parts.append(data)
            total += len(data)
            if total >= limit:
                return b"".join(parts)
    return b"".join(parts)


def _clusters(data: bytes) -> list[memoryview]:
    """Whole clusters, the last one zero-padded, all-zero ones dropped."""
    if len(data) % CLUSTER_SIZE:
        data += bytes(CLUSTER_SIZE - len(data) % CLUSTER_SIZE)
    view = memoryview(data)
    zero = bytes(CLUSTER_SIZE)
    return [
        view[i : i + CLUSTER_SIZE]
        for i in range(0, len(data), CLUSTER_SIZE)
        if view[i : i + CLUSTER_SIZE] != zero
    ]


def data_sets(text_mb: float, random_mb: float, binaries_mb: float) -> dict[str, list[memoryview]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    text = _gather(
        [
            _files(stdlib, lambda n: n.endswith(".py")),
            _files("/usr/include", lambda n: n.endswith(".h")),
            _files("/usr/share/perl", lambda n: n.endswith(".pm")),
            _files("/usr/share/perl5", lambda n: n.endswith(".pm")),
        ],
        int(text_mb * MIB),
    )
    binaries = _gather(
        [
            _files("/usr/lib/x86_64-linux-gnu", lambda n: ".so" in n, recursive=False),
            _files("/usr/bin", lambda n: True, recursive=False),
        ],
        int(binaries_mb * MIB),
    )
    return {
        "text": _clusters(text),
        "random": _clusters(os.urandom(int(random_mb * MIB))),
        "binaries": _clusters(binaries),
    }


# --- candidates ----------------------------------------------------------------


def candidates() -> list[tuple[str, int, Callable[[memoryview], bytes]]]:
    """(label, compression_type, compress function) for every installed
    candidate. Deflate labels are "backend level"; "/m8" marks memLevel 8
    (QEMU uses 9)."""
    installed = compress.deflate_backends()
    out = []
    for backend, settings in (
        ("zlib", ((1, 9), (5, 8), (5, 9), (6, 8), (6, 9), (9, 9))),
        ("zlib-ng", ((1, 9), (6, 9), (7, 9), (8, 9), (9, 8), (9, 9))),
        ("isal", ((0, 9), (1, 9), (2, 9), (3, 9))),
    ):
        if backend not in installed:
            continue
        for level, mem_level in settings:
            label = f"{backend} {level}" + ("" if mem_level == 9 else f"/m{mem_level}")

            def fn(data, backend=backend, level=level, mem_level=mem_level):
                return compress.deflate_raw(data, backend, level, mem_level)

            out.append((label, ZLIB, fn))
    for level in (-5, -1, 1, 2, 3, 5, 9, 12, 15, 19):

        def fn(data, level=level):
            return compress.zstd_compress(data, level)

        out.append((f"zstd {level}", ZSTD, fn))
    return out


def _check(compression_type: int, original, compressed: bytes) -> None:
    if compression_type == ZLIB:
        # The stdlib at QEMU's wbits: raw deflate, and no match reaching
        # further back than 4 KiB across its output blocks.
        out = zlib.decompressobj(-12).decompress(compressed, CLUSTER_SIZE)
    else:
        out = compress.zstd_decompress(compressed, CLUSTER_SIZE)
    if out != original:
        raise SystemExit("round trip failed")


def _cpu_time(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return max(best, 1e-9)


def run_compression(
    sets: dict[str, list[memoryview]], repeat: int
) -> dict[tuple[str, str], tuple[float, int]]:
    """{(label, data set): (MB/s, stored bytes)}"""
    results = {}
    for label, compression_type, fn in candidates():
        limit = compress.max_compressed_size(compression_type, CLUSTER_SIZE)
        for name, clusters in sets.items():
            for c in clusters[:8]:  # warm up
                fn(c)
            elapsed = _cpu_time(lambda fn=fn, clusters=clusters: [fn(c) for c in clusters], repeat)
            stored = 0
            for c in clusters:
                out = fn(c)
                if len(out) <= limit:
                    stored += len(out)
                    _check(compression_type, c, out)
                else:
                    stored += CLUSTER_SIZE
            results[(label, name)] = (len(clusters) * CLUSTER_SIZE / MB / elapsed, stored)
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return results


def print_compression(sets, results) -> None:
    names = list(sets)
    header = f"{'candidate':<13}" + "".join(
        f" | {name + ' MB/s':>14} {'stored':>7} {'vs z6':>7}" for name in names
    )
    print(header)
    print("-" * len(header))
    for label in dict.fromkeys(label for label, _ in results):
        row = f"{label:<13}"
        for name in names:
            speed, stored = results[(label, name)]
            base = results[("zlib 6", name)][1]
            size = len(sets[name]) * CLUSTER_SIZE
            row += f" | {speed:>14.1f} {100 * stored / size:>6.2f}% {100 * (stored / base - 1):>+6.2f}%"
        print(row)


def run_decompression(sets, repeat: int) -> None:
    print()
    print("decompression, one thread, MB/s of output (streams: stdlib zlib 6, zstd 3):")
    for name, clusters in sets.items():
        limit = compress.max_compressed_size(ZLIB, CLUSTER_SIZE)
        zlib_streams = [compress.deflate_raw(c, "zlib", 6) for c in clusters]
        zlib_streams = [s for s in zlib_streams if len(s) <= limit]
        zstd_streams = [compress.zstd_compress(c, 3) for c in clusters]
        zstd_streams = [s for s in zstd_streams if len(s) < CLUSTER_SIZE]
        if not zlib_streams and not zstd_streams:
            print(f"  {name:<9} (nothing compressed)")
            continue
        row = f"  {name:<9}"
        for backend in compress.deflate_backends():

            def run(backend=backend, zlib_streams=zlib_streams):
                for s in zlib_streams:
                    compress.inflate_raw(s, CLUSTER_SIZE, backend)

            speed = len(zlib_streams) * CLUSTER_SIZE / MB / _cpu_time(run, repeat)
            row += f"  {backend}: {speed:7.1f}"

        def run_zstd(zstd_streams=zstd_streams):
            for s in zstd_streams:
                compress.zstd_decompress(s, CLUSTER_SIZE)

        speed = len(zstd_streams) * CLUSTER_SIZE / MB / _cpu_time(run_zstd, repeat)
        row += f"  zstd: {speed:7.1f}"
        print(row)
    print(f"  decompress_cluster(zlib) uses: {compress._inflate_backend()}")


def run_pools(sets) -> None:
    workers = os.cpu_count() or 1
    clusters = sets["binaries"]
    size = len(clusters) * CLUSTER_SIZE
    print()
    print(f"qimg's choices on binaries, wall MB/s, 1 thread vs {workers} workers:")
    for compression_type in (ZLIB, ZSTD):
        for level in compress.COMPRESSION_LEVELS:
            speeds = []
            for n in (1, workers):
                with compress.ClusterCompressor(compression_type, level, n) as pool:
                    start = time.perf_counter()
                    outs = list(pool.map(clusters))
                    speeds.append(size / MB / (time.perf_counter() - start))
            stored = sum(CLUSTER_SIZE if o is None else len(o) for o in outs)
            print(
                f"  {level:<8} {compress.compressor_name(compression_type, level):<48}"
                f" {speeds[0]:7.1f} {speeds[1]:7.1f}   stored {100 * stored / size:.2f}%"
            )
        with compress.ClusterCompressor(compression_type, "default", workers) as pool:
            compressed = [o for o in pool.map(clusters) if o is not None]
        speeds = []
        for n in (1, workers):
            with compress.ClusterDecompressor(compression_type, CLUSTER_SIZE, n) as pool:
                start = time.perf_counter()
                for _ in pool.map(compressed):
                    pass
                speeds.append(len(compressed) * CLUSTER_SIZE / MB / (time.perf_counter() - start))
        kind = "zlib" if compression_type == ZLIB else "zstd"
        print(
            f"  {'read':<8} {kind + ' ClusterDecompressor':<48} {speeds[0]:7.1f} {speeds[1]:7.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-mb", type=float, default=32, help="MiB of text (32)")
    parser.add_argument("--random-mb", type=float, default=16, help="MiB of random data (16)")
    parser.add_argument("--binaries-mb", type=float, default=96, help="MiB of binaries (96)")
    parser.add_argument("--repeat", type=int, default=2, help="keep the best of N runs (2)")
    parser.add_argument("--quick", action="store_true", help="4 MiB of each data set, 1 run")
    args = parser.parse_args(argv)
    if args.quick:
        args.text_mb = args.random_mb = args.binaries_mb = 4
        args.repeat = 1
    sets = data_sets(args.text_mb, args.random_mb, args.binaries_mb)
    print(
        f"clusters of {CLUSTER_SIZE // 1024} KiB: "
        + ", ".join(f"{name} {len(c) * CLUSTER_SIZE / MIB:.1f} MiB" for name, c in sets.items())
        + f"; CPU-time MB/s, best of {args.repeat}"
    )
    print(f"deflate backends installed: {', '.join(compress.deflate_backends())}")
    print()
    results = run_compression(sets, args.repeat)
    print_compression(sets, results)
    run_decompression(sets, args.repeat)
    run_pools(sets)


if __name__ == "__main__":
    main()
