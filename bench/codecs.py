#!/usr/bin/env python3
"""Benchmark the qcow2 cluster codecs that qimg can choose from.

Usage: python bench/codecs.py [--quick] [--binaries-mb N] [--text-mb N] [--random-mb N]

Compresses 64 KiB clusters of three data sets, one cluster per call as
`qimg convert -c` does, on one thread:

  text      Python and C sources found on this machine (text-like data)
  random    os.urandom (incompressible: every cluster is stored as is)
  binaries  shared libraries from /usr/lib/x86_64-linux-gnu and programs
            from /usr/bin, concatenated (real binaries)

For each candidate it prints MB/s (of input), the stored size as a
percentage of the input, and the stored size relative to stdlib zlib
level 6, which is what qemu-img writes. "Stored" applies QEMU's rule: a
cluster whose compressed form does not fit in cluster_size - 1 bytes is
stored uncompressed (cluster_size bytes). All-zero clusters are left out,
since convert does not write them.

Every deflate candidate runs at wbits -12 (a 4 KiB window, what QEMU's
inflater is specified with) and each output is inflated back with stdlib
zlib.decompressobj(-12) to check it. Then it times decompression and the
thread pools (ClusterCompressor/ClusterDecompressor) with the levels
qimg/formats/qcow2/compress.py chose.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import sysconfig
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qimg.formats.qcow2 import compress  # noqa: E402
from qimg.formats.qcow2.layout import (  # noqa: E402
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_COMPRESSION_TYPE_ZSTD,
)

CLUSTER_SIZE = 65536
MB = 1_000_000


# --- data sets -----------------------------------------------------------------


def _gather(patterns: list[str], limit: int) -> bytes:
    """Concatenate regular files matching `patterns` (sorted, so runs are
    repeatable) up to `limit` bytes."""
    parts: list[bytes] = []
    total = 0
    seen: set[str] = set()
    for pattern in patterns:
        for path in sorted(glob.glob(pattern, recursive=True)):
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
        [f"{stdlib}/**/*.py", "/usr/include/**/*.h", "/usr/share/perl*/**/*.pm"],
        int(text_mb * MB),
    )
    binaries = _gather(
        ["/usr/lib/x86_64-linux-gnu/*.so*", "/usr/bin/*"],
        int(binaries_mb * MB),
    )
    return {
        "text": _clusters(text),
        "random": _clusters(os.urandom(int(random_mb * MB))),
        "binaries": _clusters(binaries),
    }


# --- candidates ----------------------------------------------------------------


def candidates() -> list[tuple[str, int, str, int]]:
    """(label, compression_type, backend, level) for every installed candidate."""
    installed = compress.deflate_backends()
    out = []
    for backend, levels in (
        ("zlib", (1, 6, 9)),
        ("zlib-ng", (1, 6, 7, 8, 9)),
        ("isal", (0, 1, 2, 3)),
    ):
        if backend in installed:
            for level in levels:
                out.append((f"{backend} {level}", QCOW2_COMPRESSION_TYPE_ZLIB, backend, level))
    for level in (-5, -1, 1, 2, 3, 5, 9, 12, 15, 19):
        out.append((f"zstd {level}", QCOW2_COMPRESSION_TYPE_ZSTD, "zstd", level))
    return out


def _compress_fn(compression_type: int, backend: str, level: int):
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        return lambda data: compress.deflate_raw(data, backend, level)
    return lambda data: compress.zstd_compress(data, level)


def _check(compression_type: int, original, compressed: bytes) -> None:
    if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB:
        # The stdlib at QEMU's wbits: proves the stream stays in a 4 KiB window
        # (for matches that cross its output blocks) and is raw deflate.
        out = zlib.decompressobj(-12).decompress(compressed, CLUSTER_SIZE)
    else:
        out = compress.zstd_decompress(compressed, CLUSTER_SIZE)
    if out != original:
        raise SystemExit("round trip failed")


def run_compression(sets: dict[str, list[memoryview]]) -> dict[tuple[str, str], tuple[float, int]]:
    """{(label, set): (MB/s, stored bytes)}"""
    results = {}
    for label, compression_type, backend, level in candidates():
        fn = _compress_fn(compression_type, backend, level)
        for name, clusters in sets.items():
            start = time.perf_counter()
            outs = [fn(c) for c in clusters]
            elapsed = time.perf_counter() - start
            stored = 0
            for c, out in zip(clusters, outs):
                if len(out) < CLUSTER_SIZE:
                    stored += len(out)
                    _check(compression_type, c, out)
                else:
                    stored += CLUSTER_SIZE
            size = len(clusters) * CLUSTER_SIZE
            results[(label, name)] = (size / MB / elapsed, stored)
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return results


def print_compression(sets, results) -> None:
    names = list(sets)
    header = f"{'candidate':<12}" + "".join(
        f" | {name + ' MB/s':>14} {'stored%':>7} {'vs z6':>7}" for name in names
    )
    print(header)
    print("-" * len(header))
    labels = dict.fromkeys(label for label, _ in results)
    for label in labels:
        row = f"{label:<12}"
        for name in names:
            speed, stored = results[(label, name)]
            base = results[("zlib 6", name)][1]
            size = len(sets[name]) * CLUSTER_SIZE
            row += f" | {speed:>14.1f} {100 * stored / size:>6.2f}% {100 * (stored / base - 1):>+6.2f}%"
        print(row)


def run_decompression(sets) -> None:
    print()
    print("decompression, one thread, MB/s of output:")
    for name, clusters in sets.items():
        zlib_streams = [compress.deflate_raw(c, "zlib", 6) for c in clusters]
        zlib_streams = [s for s in zlib_streams if len(s) < CLUSTER_SIZE]
        zstd_streams = [compress.zstd_compress(c, 3) for c in clusters]
        zstd_streams = [s for s in zstd_streams if len(s) < CLUSTER_SIZE]
        row = f"  {name:<9}"
        for backend in compress.deflate_backends():
            start = time.perf_counter()
            for s in zlib_streams:
                compress.inflate_raw(s, CLUSTER_SIZE, backend)
            elapsed = time.perf_counter() - start
            row += f"  {backend}: {len(zlib_streams) * CLUSTER_SIZE / MB / max(elapsed, 1e-9):8.1f}"
        start = time.perf_counter()
        for s in zstd_streams:
            compress.zstd_decompress(s, CLUSTER_SIZE)
        elapsed = time.perf_counter() - start
        row += f"  zstd: {len(zstd_streams) * CLUSTER_SIZE / MB / max(elapsed, 1e-9):8.1f}"
        row += f"  ({len(zlib_streams)} zlib, {len(zstd_streams)} zstd clusters)"
        print(row)


def run_pools(sets) -> None:
    workers = os.cpu_count() or 1
    clusters = sets["binaries"]
    size = len(clusters) * CLUSTER_SIZE
    print()
    print(f"qimg's choices on binaries, 1 thread vs ClusterCompressor({workers} workers), MB/s:")
    for compression_type in (QCOW2_COMPRESSION_TYPE_ZLIB, QCOW2_COMPRESSION_TYPE_ZSTD):
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
                f" {speeds[0]:8.1f} {speeds[1]:8.1f}   stored {100 * stored / size:.2f}%"
            )
        compressed = [
            o for o in compress.ClusterCompressor(compression_type, "default", 1).map(clusters) if o
        ]
        speeds = []
        for n in (1, workers):
            with compress.ClusterDecompressor(compression_type, CLUSTER_SIZE, n) as pool:
                start = time.perf_counter()
                for _ in pool.map(compressed):
                    pass
                speeds.append(len(compressed) * CLUSTER_SIZE / MB / (time.perf_counter() - start))
        kind = "zlib" if compression_type == QCOW2_COMPRESSION_TYPE_ZLIB else "zstd"
        print(f"  {'read':<8} {kind + ' ClusterDecompressor':<48} {speeds[0]:8.1f} {speeds[1]:8.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-mb", type=float, default=32)
    parser.add_argument("--random-mb", type=float, default=16)
    parser.add_argument("--binaries-mb", type=float, default=100)
    parser.add_argument("--quick", action="store_true", help="4 MB of each data set")
    args = parser.parse_args(argv)
    if args.quick:
        args.text_mb = args.random_mb = args.binaries_mb = 4
    sets = data_sets(args.text_mb, args.random_mb, args.binaries_mb)
    print(
        f"clusters of {CLUSTER_SIZE // 1024} KiB: "
        + ", ".join(f"{name} {len(c) * CLUSTER_SIZE / MB:.1f} MB" for name, c in sets.items())
    )
    print(f"deflate backends installed: {', '.join(compress.deflate_backends())}")
    print()
    results = run_compression(sets)
    print_compression(sets, results)
    run_decompression(sets)
    run_pools(sets)


if __name__ == "__main__":
    main()
