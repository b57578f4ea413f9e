"""qcow2 cluster codecs (qimg/formats/qcow2/compress.py), judged by QEMU's rules
and, where qemu-img is installed, by images qemu-img made."""

from __future__ import annotations

import os
import random
import struct
import threading
import tracemalloc
import zlib

import pytest
import zstandard
from conftest import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qimg.errors import CorruptImageError, UnsupportedFeatureError
from qimg.formats.qcow2 import compress
from qimg.formats.qcow2.compress import (
    COMPRESSION_LEVELS,
    ClusterCompressor,
    ClusterDecompressor,
    compress_cluster,
    compressor_name,
    decompress_cluster,
    decompress_many,
)
from qimg.formats.qcow2.layout import (
    QCOW2_COMPRESSION_TYPE_ZLIB,
    QCOW2_COMPRESSION_TYPE_ZSTD,
)

ZLIB = QCOW2_COMPRESSION_TYPE_ZLIB
ZSTD = QCOW2_COMPRESSION_TYPE_ZSTD
TYPES = (ZLIB, ZSTD)
CS = 65536

# Every deflate backend installed, at every level qimg may pick from it.
BACKEND_LEVELS = {"zlib": (1, 5, 6, 9), "zlib-ng": (1, 6, 9), "isal": (0, 1, 2, 3)}
DEFLATE_CASES = [
    (backend, level) for backend in compress.deflate_backends() for level in BACKEND_LEVELS[backend]
]


def text_cluster(size: int = CS, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(300)
    ]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=12)) + b".\n"
    return bytes(out[:size])


def random_cluster(size: int = CS, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def strict_inflate_12(stream: bytes, size: int) -> bytes:
    """Inflate at QEMU's wbits -12 in small steps, so a match reaching more
    than 4 KiB (+ one step) back fails: a check that the window is 4 KiB."""
    d = zlib.decompressobj(-12)
    out = bytearray()
    data = stream
    while len(out) < size:
        chunk = d.decompress(data, 256)
        if not chunk:
            break
        out += chunk
        data = d.unconsumed_tail
    return bytes(out)


# --- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("compression_type", TYPES)
@pytest.mark.parametrize("level", COMPRESSION_LEVELS)
def test_round_trip_every_type_and_level(compression_type, level):
    data = text_cluster()
    out = compress_cluster(data, compression_type, level)
    assert out is not None and len(out) < CS // 2
    assert decompress_cluster(out, compression_type, CS) == data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    compression_type=st.sampled_from(TYPES),
    level=st.sampled_from(COMPRESSION_LEVELS),
    cluster_bits=st.integers(9, 17),
    pattern=st.binary(min_size=1, max_size=300),
    noise_seed=st.integers(0, 2**32 - 1),
    noise_fraction=st.sampled_from([0, 0.01, 0.3, 1.0]),
)
def test_round_trip_or_none_for_any_cluster(
    compression_type, level, cluster_bits, pattern, noise_seed, noise_fraction
):
    size = 1 << cluster_bits
    data = bytearray((pattern * (size // len(pattern) + 1))[:size])
    rng = random.Random(noise_seed)
    for _ in range(int(size * noise_fraction)):
        data[rng.randrange(size)] = rng.randrange(256)
    data = bytes(data)
    out = compress_cluster(memoryview(data), compression_type, level)
    if out is None:
        return
    assert len(out) <= size - (2 if compression_type == ZLIB else 1)
    assert decompress_cluster(out, compression_type, size) == data
    if compression_type == ZLIB:
        assert strict_inflate_12(out, size) == data


@pytest.mark.parametrize("backend,level", DEFLATE_CASES)
def test_zlib_output_inflates_with_stdlib_at_wbits_12(backend, level):
    for data in (text_cluster(), bytes(CS), (random_cluster(3000) + bytes(1000)) * 17):
        data = data[:CS]
        stream = compress.deflate_raw(data, backend, level)
        assert zlib.decompressobj(-12).decompress(stream, CS) == data
        assert strict_inflate_12(stream, CS) == data


@pytest.mark.parametrize("backend,level", DEFLATE_CASES)
def test_every_deflate_backend_keeps_to_a_4k_window(backend, level):
    # Random data repeating every 4097 bytes compresses only by matching
    # further back than 4 KiB, which a 4 KiB window forbids.
    data = (random_cluster(4097) * 16)[:CS]
    wide = zlib.compressobj(6, zlib.DEFLATED, -15)
    assert len(wide.compress(data) + wide.flush()) < CS // 8  # the control
    assert len(compress.deflate_raw(data, backend, level)) > CS * 0.98
    # Repeating every 2048 bytes is in reach: all of them compress it.
    assert len(compress.deflate_raw((random_cluster(2048) * 32)[:CS], backend, level)) < CS // 4


@pytest.mark.parametrize("level", COMPRESSION_LEVELS)
def test_zlib_cluster_is_raw_deflate_without_header(level):
    out = compress_cluster(text_cluster(), ZLIB, level)
    with pytest.raises(zlib.error):
        zlib.decompress(out)  # no zlib header
    assert zlib.decompressobj(-15).decompress(out) == text_cluster()


def test_deflate_raw_with_stdlib_zlib_6_uses_qemu_parameters():
    data = text_cluster()
    qemu_like = zlib.compressobj(6, zlib.DEFLATED, -12, 9, zlib.Z_DEFAULT_STRATEGY)
    assert compress.deflate_raw(data, "zlib", 6) == qemu_like.compress(data) + qemu_like.flush()


def test_zstd_frame_is_what_qemu_writes():
    out = compress_cluster(text_cluster(), ZSTD)
    params = zstandard.get_frame_parameters(out)
    assert params.content_size == CS
    assert not params.has_checksum
    assert out == zstandard.ZstdCompressor(level=3).compress(text_cluster())


# --- QEMU's store-compressed rule --------------------------------------------------


@pytest.mark.parametrize("compression_type", TYPES)
@pytest.mark.parametrize("level", COMPRESSION_LEVELS)
def test_random_cluster_is_stored_uncompressed(compression_type, level):
    assert compress_cluster(random_cluster(), compression_type, level) is None
    assert compress_cluster(random_cluster(512), compression_type, level) is None


def _deflate_z6(data: bytes) -> int:
    return len(compress.deflate_raw(data, "zlib", 6))


def boundary_cluster(size: int, target: int) -> bytes:
    """A cluster whose stdlib zlib-6 stream is exactly `target` bytes long:
    random bytes then zeros, the split and seed found by search."""
    for seed in range(20):
        noise = random_cluster(size, seed=seed)
        for k in range(size // 4):
            data = noise[: size - k] + bytes(k)
            n = _deflate_z6(data)
            if n == target:
                return data
            if n < target:
                break
    raise AssertionError(f"no random+zeros cluster gives a {target}-byte stream")


@pytest.mark.parametrize("size", [4096, CS])
def test_zlib_cluster_compressed_iff_stream_fits_in_cluster_size_minus_two(monkeypatch, size):
    # QEMU's buffer is cluster_size - 1 bytes, but deflate() that fills it
    # exactly returns Z_OK, which QEMU takes for "does not fit". Force stdlib
    # zlib 6 (QEMU's own output) to hit the boundary exactly.
    monkeypatch.setitem(compress._ZLIB_CHOICES, "default", (("zlib", 6, 9),))
    assert compress.max_compressed_size(ZLIB, size) == size - 2
    fits = boundary_cluster(size, size - 2)
    assert compress_cluster(fits, ZLIB) == compress.deflate_raw(fits, "zlib", 6)
    for too_big in (boundary_cluster(size, size - 1), boundary_cluster(size, size)):
        assert compress_cluster(too_big, ZLIB) is None


def test_zstd_cluster_may_fill_cluster_size_minus_one():
    # ZSTD_compressStream2 returns 0 when the frame fills QEMU's buffer exactly.
    assert compress.max_compressed_size(ZSTD, CS) == CS - 1
    assert compress._stored_form(ZSTD, bytes(CS), bytes(CS - 1)) is not None
    assert compress._stored_form(ZSTD, bytes(CS), bytes(CS)) is None


# --- decompression: trailing bytes, corruption, hostile input ------------------------


@pytest.mark.parametrize("compression_type", TYPES)
def test_trailing_bytes_after_the_stream_are_ignored(compression_type):
    data = text_cluster()
    out = compress_cluster(data, compression_type)
    other = compress_cluster(text_cluster(seed=5), compression_type)
    for tail in (bytes(511), random_cluster(300), other, b"\xff" * 7):
        assert decompress_cluster(out + tail, compression_type, CS) == data
    assert decompress_cluster(memoryview(out + bytes(100)), compression_type, CS) == data


@pytest.mark.parametrize("compression_type", TYPES)
def test_corrupt_input_raises_corrupt_image_error(compression_type):
    data = text_cluster()
    out = compress_cluster(data, compression_type)
    short = compress_cluster(text_cluster(CS // 2), compression_type)
    bad = [
        b"",
        b"\x00",
        out[: len(out) // 2],  # truncated
        out[:-3],
        random_cluster(1000),  # garbage
        b"\xff" * 100,
        short,  # a valid stream of half a cluster
    ]
    for data in bad:
        with pytest.raises(CorruptImageError):
            decompress_cluster(data, compression_type, CS)
    with pytest.raises(CorruptImageError):
        decompress_cluster(out, compression_type, CS * 2)  # output short


def test_zlib_stream_longer_than_a_cluster_gives_its_first_cluster():
    # qcow2_zlib_decompress stops when its buffer is full and accepts
    # Z_BUF_ERROR there, so the rest of such a stream is never looked at.
    data = text_cluster(2 * CS)
    stream = compress.deflate_raw(data, "zlib", 6)
    assert decompress_cluster(stream, ZLIB, CS) == data[:CS]


def test_zstd_frame_longer_than_a_cluster_is_corrupt():
    # qcow2_zstd_decompress requires the frame to end with the cluster.
    for cctx in (zstandard.ZstdCompressor(), zstandard.ZstdCompressor(write_content_size=False)):
        with pytest.raises(CorruptImageError):
            decompress_cluster(cctx.compress(text_cluster(CS + 1)), ZSTD, CS)


def test_zlib_stream_with_matches_beyond_4k_reads_as_qemu_reads_it():
    # QEMU inflates a whole cluster in one call and reads such streams
    # (checked with qemu-img 7.2); Python's -12 inflater would not.
    piece = random_cluster(5000)
    data = (bytes(28000) + piece + bytes(10000) + piece).ljust(CS, b"\0")
    wide = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = wide.compress(data) + wide.flush()
    with pytest.raises(zlib.error):
        zlib.decompressobj(-12).decompress(stream, CS)
    for backend in compress.deflate_backends():
        assert compress.inflate_raw(stream, CS, backend) == data


def test_zstd_reads_what_qemu_would_from_several_frames():
    data = text_cluster()
    first = zstandard.ZstdCompressor().compress(data[:1000])
    second = zstandard.ZstdCompressor(write_content_size=False).compress(data[1000:])
    empty = zstandard.ZstdCompressor().compress(b"")
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"skip"
    stream = skippable + first + empty + second + first
    assert decompress_cluster(stream, ZSTD, CS) == data
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert decompress_cluster(no_size + bytes(64), ZSTD, CS) == data


def _peak_allocation(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_hostile_zstd_frames_fail_without_large_allocations():
    # A frame header that claims a terabyte: magic, descriptor 0xE0 (8-byte
    # content size, single segment), the size, then one last raw block of 1 byte.
    liar = struct.pack("<IBQ", 0xFD2FB528, 0xE0, 1 << 40) + b"\x09\x00\x00x"
    # A bomb without a content size: 64 MiB of zeros.
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    # Lots of empty frames.
    empties = zstandard.ZstdCompressor().compress(b"") * 50_000

    for stream in (liar, bomb, empties):

        def attempt(stream=stream):
            with pytest.raises(CorruptImageError):
                decompress_cluster(stream, ZSTD, CS)

        assert _peak_allocation(attempt) < 4 * CS + len(stream)


def test_zlib_bomb_is_cut_at_one_cluster():
    bomb = compress.deflate_raw(bytes(8 << 20), "zlib", 1)
    peak = _peak_allocation(lambda: decompress_cluster(bomb, ZLIB, CS))
    assert peak < 4 * CS + len(bomb)


# --- API edges ------------------------------------------------------------------


def test_compressor_name_says_which_backend_and_level():
    assert compressor_name(ZSTD) == "zstd level 3"
    for level in COMPRESSION_LEVELS:
        backend, backend_level, mem_level = compress._zlib_choice(level)
        name = compressor_name(ZLIB, level)
        assert name.startswith(f"{backend} level {backend_level}, memLevel {mem_level}")


def test_bad_level_and_unknown_type_are_rejected():
    with pytest.raises(ValueError):
        compress_cluster(text_cluster(), ZLIB, "fastest")
    with pytest.raises(UnsupportedFeatureError):
        compress_cluster(text_cluster(), 2)
    with pytest.raises(UnsupportedFeatureError):
        decompress_cluster(b"", 7, CS)
    with pytest.raises(UnsupportedFeatureError):
        compressor_name(2)


def test_missing_deflate_backend_falls_back_to_stdlib(monkeypatch):
    monkeypatch.setitem(compress._modules, "isal.isal_zlib", None)
    monkeypatch.setitem(compress._modules, "zlib_ng.zlib_ng", None)
    for level in COMPRESSION_LEVELS:
        assert compressor_name(ZLIB, level).startswith("zlib level")
        out = compress_cluster(text_cluster(), ZLIB, level)
        assert decompress_cluster(out, ZLIB, CS) == text_cluster()
    assert compress.inflate_raw(out, CS, "zlib") == text_cluster()
    with pytest.raises(UnsupportedFeatureError):
        compress.deflate_raw(b"x", "isal", 1)


def test_missing_zstandard_is_named(monkeypatch):
    monkeypatch.setitem(compress._modules, "zstandard", None)
    with pytest.raises(UnsupportedFeatureError, match="zstandard"):
        compress_cluster(text_cluster(), ZSTD)
    with pytest.raises(UnsupportedFeatureError, match="zstandard"):
        ClusterDecompressor(ZSTD, CS)


# --- thread pools ---------------------------------------------------------------


def mixed_clusters(n: int, size: int = 4096) -> list[bytes]:
    return [
        random_cluster(size, seed=i) if i % 3 == 0 else text_cluster(size, seed=i) for i in range(n)
    ]


@pytest.mark.parametrize("compression_type", TYPES)
@pytest.mark.parametrize("workers", [1, 3])
def test_compressor_map_preserves_order(compression_type, workers):
    clusters = mixed_clusters(40)
    with ClusterCompressor(compression_type, "default", workers) as pool:
        outs = list(pool.map(iter(clusters)))
    assert outs == [compress_cluster(c, compression_type) for c in clusters]
    assert outs[0] is None and outs[1] is not None
    packed = [o for o in outs if o is not None]
    originals = [c for c, o in zip(clusters, outs) if o is not None]
    with ClusterDecompressor(compression_type, 4096, workers) as pool:
        assert list(pool.map(packed)) == originals
        assert pool.decompress_many(packed) == originals
    assert decompress_many(packed, compression_type, 4096) == originals


def test_compressor_map_bounds_work_in_flight():
    workers = 2
    pulled = 0
    lock = threading.Lock()

    def source():
        nonlocal pulled
        for c in mixed_clusters(200, 512):
            with lock:
                pulled += 1
            yield c

    with ClusterCompressor(ZLIB, "fast", workers) as pool:
        for done, _ in enumerate(pool.map(source()), 1):
            assert pulled <= done + 4 * workers


def test_decompressor_map_raises_corrupt_at_the_bad_cluster():
    good = compress_cluster(text_cluster(4096), ZLIB)
    items = [good, good, b"\xff" * 50, good]
    with ClusterDecompressor(ZLIB, 4096, 2) as pool:
        results = pool.map(items)
        assert next(results) == text_cluster(4096)
        assert next(results) == text_cluster(4096)
        with pytest.raises(CorruptImageError):
            next(results)


@pytest.mark.parametrize("split", [True, False])
def test_decompress_into_fills_every_destination_in_its_threads(monkeypatch, split):
    """With split, a large batch is shared with the pool's threads; without,
    the calling thread does it all (convert's readers already run in parallel)."""
    monkeypatch.setattr(compress, "_MIN_TASK_BYTES", 4096)
    plain = [text_cluster(4096, seed=i) for i in range(16)]
    datas = [compress_cluster(p, ZSTD) for p in plain]
    out = bytearray(16 * 4096)
    view = memoryview(out)
    threads = set()
    with ClusterDecompressor(ZSTD, 4096, 2) as pool:
        inner = pool._into.fill

        def traced(data, dst):
            threads.add(threading.get_ident())
            inner(data, dst)

        pool._into.fill = traced
        jobs = [(d, view[i * 4096 : (i + 1) * 4096], 0) for i, d in enumerate(datas)]
        pool.decompress_into(jobs, split=split)
    assert bytes(out) == b"".join(plain)
    assert (len(threads) > 1) == split
    if not split:
        assert threads == {threading.get_ident()}


def _zstd_streams() -> list[bytes]:
    """Legal and broken zstd cluster streams, for comparing readers."""
    data = text_cluster()
    plain = zstandard.ZstdCompressor().compress(data)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    first = zstandard.ZstdCompressor().compress(data[:1000])
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"skip"
    return [
        plain,
        plain + b"\x28\xb5\x2f\xfd" + os.urandom(500),  # the next cluster's bytes after it
        no_size + bytes(64),
        skippable + plain,
        first + zstandard.ZstdCompressor().compress(data[1000:]),
        plain[:-3],  # cut short
        zstandard.ZstdCompressor().compress(data + b"x"),  # one byte too long
        zstandard.ZstdCompressor().compress(data[:-1]),  # one byte short
        b"\x00" * 100,
        struct.pack("<IBQ", 0xFD2FB528, 0xE0, 1 << 40) + b"\x09\x00\x00x",  # claims a terabyte
    ]


@pytest.mark.parametrize("native", [True, False])
def test_decompress_into_reads_zstd_clusters_as_decompress_cluster_does(monkeypatch, native):
    """Whole clusters go straight into the destination through the
    system's libzstd where it is installed; the result, or the error, is
    the same as decompress_cluster's either way."""
    from qimg import libzstd

    if native and not libzstd.available():
        pytest.skip("the system has no libzstd.so.1")
    monkeypatch.setattr(libzstd, "available", lambda: native)
    with ClusterDecompressor(ZSTD, CS, 1) as pool:
        for stream in _zstd_streams():
            for data in (stream, memoryview(bytearray(stream))):
                out = bytearray(CS)
                try:
                    expected = decompress_cluster(stream, ZSTD, CS)
                except CorruptImageError:
                    with pytest.raises(CorruptImageError):
                        pool.decompress_into([(data, memoryview(out), 0)])
                else:
                    pool.decompress_into([(data, memoryview(out), 0)])
                    assert out == expected


def test_libzstd_frame_into_stops_at_the_end_of_the_first_frame():
    from qimg import libzstd

    if not libzstd.available():
        pytest.skip("the system has no libzstd.so.1")
    data = text_cluster()
    frame = zstandard.ZstdCompressor().compress(data)
    out = bytearray(CS)
    assert libzstd.frame_into(frame + os.urandom(300), memoryview(out)) == CS
    assert out == data
    small = memoryview(bytearray(CS - 1))
    assert libzstd.frame_into(frame, small) == libzstd.INVALID  # larger than the buffer
    assert libzstd.frame_into(frame[:-1], memoryview(out)) == libzstd.INVALID
    assert libzstd.frame_into(memoryview(frame), memoryview(out)) == libzstd.UNAVAILABLE


def test_pool_rejects_zero_workers():
    with pytest.raises(ValueError):
        ClusterCompressor(ZLIB, "default", 0)


# --- the oracle: clusters qemu-img compressed ------------------------------------------


def l2_entries(image: bytes):
    """Minimal qcow2 walk: (guest cluster index, file offset of its L2 entry,
    entry) for every L2 entry, and cluster_bits (header bytes 20, 36, 40)."""
    cluster_bits = struct.unpack_from(">I", image, 20)[0]
    l1_size = struct.unpack_from(">I", image, 36)[0]
    l1_table_offset = struct.unpack_from(">Q", image, 40)[0]
    l2_count = (1 << cluster_bits) // 8
    entries = []
    for l1_index in range(l1_size):
        l2_offset = struct.unpack_from(">Q", image, l1_table_offset + 8 * l1_index)[0]
        l2_offset &= 0x00FFFFFFFFFFFE00
        if l2_offset:
            for l2_index in range(l2_count):
                where = l2_offset + 8 * l2_index
                entry = struct.unpack_from(">Q", image, where)[0]
                entries.append((l1_index * l2_count + l2_index, where, entry))
    return cluster_bits, entries


def compressed_descriptor(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, bytes a reader takes) of a compressed L2 entry."""
    x = 62 - (cluster_bits - 8)
    host_offset = entry & ((1 << x) - 1)
    nb_sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return host_offset, nb_sectors * 512 - host_offset % 512


def compressed_entry(host_offset: int, length: int, cluster_bits: int) -> int:
    x = 62 - (cluster_bits - 8)
    nb_sectors = (host_offset + length - 1) // 512 - host_offset // 512 + 1
    return (1 << 62) | ((nb_sectors - 1) << x) | host_offset


def compressed_clusters(path) -> tuple[int, dict[int, bytes], set[int]]:
    """(cluster_size, {guest cluster index: compressed bytes as a reader sees
    them, to the end of the last sector}, {indexes of clusters stored
    uncompressed})."""
    image = path.read_bytes()
    cluster_bits, entries = l2_entries(image)
    compressed, plain = {}, set()
    for index, _, entry in entries:
        if entry & (1 << 62):
            host_offset, length = compressed_descriptor(entry, cluster_bits)
            compressed[index] = image[host_offset : host_offset + length]
        elif entry & 0x00FFFFFFFFFFFE00:
            plain.add(index)
    return 1 << cluster_bits, compressed, plain


def make_raw(path, cluster_size: int) -> bytes:
    """Text clusters, a zero cluster, a random cluster, and clusters whose
    stdlib zlib-6 stream is cluster_size - 2, - 1 and cluster_size bytes long."""
    clusters = [text_cluster(cluster_size, seed=i) for i in range(6)]
    clusters.insert(2, bytes(cluster_size))
    clusters.insert(4, random_cluster(cluster_size, seed=3))
    for target in (cluster_size - 2, cluster_size - 1, cluster_size):
        clusters.append(boundary_cluster(cluster_size, target))
    clusters.append(text_cluster(cluster_size, seed=9)[: cluster_size // 3])  # short tail
    data = b"".join(clusters)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("compression_type", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_decompresses_every_cluster_qemu_img_compressed(
    qemu_img, tmp_path, compression_type, cluster_size
):
    raw = tmp_path / "data.raw"
    data = make_raw(raw, cluster_size)
    image = tmp_path / "c.qcow2"
    run(
        [
            qemu_img, "convert", "-c", "-f", "raw", "-O", "qcow2",
            "-o", f"compression_type={compression_type},cluster_size={cluster_size}",
            str(raw), str(image),
        ]
    )  # fmt: skip
    size, compressed, plain = compressed_clusters(image)
    assert size == cluster_size
    ctype = ZLIB if compression_type == "zlib" else ZSTD
    padded = data.ljust(-(-len(data) // size) * size, b"\0")
    expected = [padded[i : i + size] for i in range(0, len(padded), size)]
    assert len(compressed) >= 7
    for index, stored in compressed.items():
        assert decompress_cluster(stored, ctype, size) == expected[index]
        if ctype == ZLIB:
            # Same zlib, same parameters: QEMU's stream is ours, byte for byte.
            ours = compress.deflate_raw(expected[index], "zlib", 6)
            assert stored[: len(ours)] == ours
        else:
            params = zstandard.get_frame_parameters(stored)
            assert params.content_size == size and not params.has_checksum
    # QEMU's store-compressed rule, judged cluster by cluster.
    assert 4 in plain  # the random cluster
    for index in plain:
        if ctype == ZLIB:
            assert len(compress.deflate_raw(expected[index], "zlib", 6)) > size - 2
        if ctype == ZSTD or index < len(expected) - 4:
            assert compress_cluster(expected[index], ctype) is None
    if ctype == ZLIB:
        n = len(expected)
        assert n - 4 in compressed  # a stream of cluster_size - 2 bytes
        assert n - 3 in plain  # cluster_size - 1 bytes: does not fit, see max_compressed_size
        assert n - 2 in plain  # cluster_size bytes
    # qimg's own choice for every cluster QEMU compressed also compresses it
    # (the one on the boundary only with QEMU's own zlib level).
    for index in compressed:
        if not (ctype == ZLIB and index == len(expected) - 4):
            assert compress_cluster(expected[index], ctype) is not None


@pytest.mark.parametrize("compression_type", ["zlib", "zstd"])
def test_qemu_img_reads_clusters_qimg_compressed(qemu_img, tmp_path, compression_type):
    # Append qimg's streams (each level in turn) to a qemu-img made image at
    # odd offsets, with junk around them, point the L2 entries at them, and
    # let qemu-img read the image back. (Refcounts are left stale: reading
    # does not look at them.)
    raw = tmp_path / "data.raw"
    data = b"".join(text_cluster(CS, seed=i) for i in range(6))
    raw.write_bytes(data)
    image = tmp_path / "c.qcow2"
    run(
        [
            qemu_img, "convert", "-c", "-f", "raw", "-O", "qcow2",
            "-o", f"compression_type={compression_type}", str(raw), str(image),
        ]
    )  # fmt: skip
    ctype = ZLIB if compression_type == "zlib" else ZSTD
    blob = bytearray(image.read_bytes())
    cluster_bits, entries = l2_entries(bytes(blob))
    rewritten = 0
    for index, where, entry in entries:
        if not entry & (1 << 62):
            continue
        level = COMPRESSION_LEVELS[index % len(COMPRESSION_LEVELS)]
        ours = compress_cluster(data[index * CS : (index + 1) * CS], ctype, level)
        blob += b"\xa5" * (-len(blob) % 512 + 100 + index)  # junk before
        struct.pack_into(">Q", blob, where, compressed_entry(len(blob), len(ours), cluster_bits))
        blob += ours + b"\x5a" * 700  # junk after, past the end of the sector
        rewritten += 1
    assert rewritten == 6
    image.write_bytes(bytes(blob))
    out = tmp_path / "back.raw"
    run([qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)])
    assert out.read_bytes() == data


def test_parallel_compression_matches_serial_under_load():
    clusters = mixed_clusters(64, CS // 4)
    expected = [compress_cluster(c, ZSTD, "fast") for c in clusters]
    with ClusterCompressor(ZSTD, "fast", max(2, os.cpu_count() or 1)) as pool:
        for _ in range(3):
            assert list(pool.map(clusters)) == expected
