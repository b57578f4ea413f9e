"""Batched compressed writes and the cached overlap check.

`write_compressed_many` must place clusters exactly as the same clusters
written one by one with `write_compressed` (QEMU's qcow2_alloc_bytes
packing), and the result must read back through qemu-img and be clean. The
overlap check keeps refusing writes onto metadata, also onto L2 tables and
refcount blocks made after its map was built.
"""

from __future__ import annotations

import random

import pytest
from conftest import qemu_check_clean, qemu_read_raw, run

from qimg.api import open_image
from qimg.errors import CorruptImageError
from qimg.formats.qcow2.compress import compress_cluster

KiB = 1 << 10


def _clusters(cs: int, count: int, seed: int) -> list[bytes]:
    """Clusters of varied compressibility, so that packed streams straddle
    host clusters; some do not compress at all (None from compress_cluster)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        kind = rng.randrange(4)
        if kind == 0:
            out.append(rng.randbytes(cs))
        else:
            word = rng.randbytes(rng.choice((4, 16, 64)))
            body = (word * (cs // len(word) + 1))[: cs - 64 * kind] + rng.randbytes(64 * kind)
            out.append(body)
    return out


def _write(path: str, clusters: list[bytes], cs: int, batched: bool) -> None:
    img = open_image(path, "qcow2", writable=True)
    try:
        ctype = img.header.compression_type
        done = [compress_cluster(c, ctype) for c in clusters]
        i = 0
        while i < len(clusters):
            if done[i] is None:
                img.write(i * cs, clusters[i])
                i += 1
                continue
            j = i
            while j < len(clusters) and done[j] is not None:
                j += 1
            if batched:
                img.write_compressed_many(i * cs, done[i:j])
            else:
                for k in range(i, j):
                    img.write_compressed(k * cs, done[k])
            i = j
    finally:
        img.close()


@pytest.mark.parametrize(
    "cluster_size,refcount_bits,ctype",
    [(512, 16, "zlib"), (512, 1, "zlib"), (4 * KiB, 64, "zstd"), (64 * KiB, 16, "zlib")],
)
def test_batched_compressed_writes_place_clusters_as_single_writes(
    tmp_path, cluster_size, refcount_bits, ctype
):
    cs = cluster_size
    count = 96 if cs < 64 * KiB else 24  # 512-byte clusters: three L2 tables
    clusters = _clusters(cs, count, seed=cs + refcount_bits)
    paths = {}
    for batched in (False, True):
        path = str(tmp_path / f"{'many' if batched else 'one'}.qcow2")
        opts = f"cluster_size={cs},refcount_bits={refcount_bits},compression_type={ctype}"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, str(count * cs)])
        _write(path, clusters, cs, batched)
        paths[batched] = path
    with open(paths[False], "rb") as a, open(paths[True], "rb") as b:
        assert a.read() == b.read()
    qemu_check_clean(paths[True])
    assert qemu_read_raw(paths[True], tmp_path) == b"".join(clusters)


def test_compressed_write_to_allocated_cluster_is_refused(tmp_path):
    path = str(tmp_path / "a.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"])
    img = open_image(path, "qcow2", writable=True)
    try:
        img.write(64 * KiB, b"x" * 512)
        blob = compress_cluster(bytes(64 * KiB), 0)
        with pytest.raises(CorruptImageError, match="allocated cluster at guest offset 0x10000"):
            img.write_compressed_many(0, [blob, blob])
    finally:
        img.close()


def test_overlap_check_refuses_data_on_metadata_made_after_the_map(tmp_path):
    path = str(tmp_path / "o.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "1M"])
    img = open_image(path, "qcow2", writable=True)
    try:
        img.write(0, b"a" * 512)  # builds the map; L2 table for guest [0, 32K)
        img.write(64 * KiB, b"b" * 512)  # a new L2 table after the map was built
        l2 = img.clusters.l2_offset(2)
        assert l2
        with pytest.raises(CorruptImageError, match="overlaps with active L2 table"):
            img.dataio.write(0, l2, [b"c" * 512])
        block = int(img.refcounts.table[0])
        with pytest.raises(CorruptImageError, match="overlaps with refcount block"):
            img.dataio.write(0, block, [b"c" * 512])
        with pytest.raises(CorruptImageError, match="overlaps with qcow2_header"):
            img.dataio.write(0, 0, [b"c" * 512])
    finally:
        img.close()


def test_compressed_data_is_never_packed_into_a_freed_and_reused_cluster(tmp_path, qemu_img):
    """A host cluster that held compressed data, was freed and then reused
    as a normal data cluster must not receive the next compressed cluster
    (found by tests/test_crash.py's workloads)."""
    path = tmp_path / "t.qcow2"
    cs = 65536
    run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "4M"])
    model = bytearray(4 << 20)
    text = b"".join(b"line %d of text\n" % i for i in range(8000))[:cs]
    with open_image(str(path), writable=True) as img:
        img.write_compressed(0, compress_cluster(text, 0))  # starts packing a host cluster
        model[0:cs] = text
        img.write(0, b"A" * cs)  # COW frees the compressed bytes: refcount 0
        model[0:cs] = b"A" * cs
        img.flush()
        for c in (1, 2, 3):  # one cluster each: the first reuses the freed one
            img.write(c * cs, b"B" * cs)
            model[c * cs : (c + 1) * cs] = b"B" * cs
        img.flush()
        img.write_compressed(8 * cs, compress_cluster(text, 0))
        model[8 * cs : 9 * cs] = text
    qemu_check_clean(path)
    assert qemu_read_raw(path, tmp_path) == bytes(model)
