"""A read-only image maps its reads by cutting the runs of a window of its
L2 table, mapped once (cluster.WINDOW): the same extents, and the same
corruption errors, as mapping each read's own entries."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import mapcorpus
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mapcorpus import create, io_step

from qimg.api import open_image
from qimg.errors import CorruptImageError
from qimg.formats.qcow2 import cluster
from qimg.formats.qcow2.cluster import ClusterMap

SIZE = 4 << 20
# (creation options, cluster size)
LAYOUTS = (
    ("cluster_size=512", 512),
    ("cluster_size=4k", 4 << 10),
    ("cluster_size=64k", 64 << 10),
    ("cluster_size=16k,extended_l2=on", 16 << 10),
)


def _pattern(cluster_size: int, seed: int) -> list[str]:
    """qemu-io commands leaving every kind of entry: data runs, zero
    clusters with and without host clusters, discarded and compressed
    clusters, at places that cross clusters and subclusters."""
    rng = random.Random(seed)
    out = []
    for _ in range(60):
        kind = rng.choice(["write", "write", "zero", "unmap", "discard", "compress"])
        if kind == "compress":
            start = rng.randrange(SIZE // cluster_size) * cluster_size
            out.append(io_step(kind, start, cluster_size))
            continue
        start = rng.randrange(SIZE // 512) * 512
        length = rng.randint(1, min(512, (SIZE - start) // 512)) * 512
        out.append(io_step(kind, start, length))
    return out


@pytest.fixture(scope="module")
def tools(qemu_img, qemu_io) -> bool:
    return True


@pytest.fixture(scope="module")
def images(tmp_path_factory, tools) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("windows")
    out = {}
    for seed, (layout, cluster_size) in enumerate(LAYOUTS):
        name = f"image{seed}.qcow2"
        create(d, name, str(SIZE), layout)
        # qemu-io fails some compressed writes of 512-byte clusters: those are left out.
        mapcorpus.qemu_io(d, name, *_pattern(cluster_size, seed), check=False)
        out[layout] = d / name
    return out


def _unwindowed(image) -> ClusterMap:
    """The image's mapping without windows: each read's entries mapped."""
    h = image.header
    plain = ClusterMap(image, image.geo, h.l1_table_offset, h.l1_size, h.has_data_file)
    plain._windows = None
    return plain


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    layout=st.sampled_from([layout for layout, _cs in LAYOUTS]),
    window=st.sampled_from([1, 2, 8, 1024]),
    ranges=st.lists(
        st.tuples(st.integers(0, SIZE - 1), st.integers(1, SIZE)), min_size=1, max_size=8
    ),
)
def test_windowed_extents_of_a_read_only_image_are_its_entries_mapped_per_read(
    images, monkeypatch, layout, window, ranges
):
    monkeypatch.setattr(cluster, "WINDOW", window)
    with open_image(str(images[layout]), "qcow2") as image:
        assert image.clusters._windows is not None
        plain = _unwindowed(image)
        for offset, length in ranges:
            length = min(length, SIZE - offset)
            assert image.clusters.extents(offset, length) == plain.extents(offset, length)


def test_a_writable_image_maps_each_read_from_its_entries(images):
    with open_image(str(images[LAYOUTS[2][0]]), "qcow2", writable=True) as image:
        assert image.clusters._windows is None


def _unaligned_entry(d: Path) -> tuple[Path, int]:
    """An image of 64 KiB clusters, 16 of them data, whose sixth L2 entry
    points 512 bytes past a cluster boundary; and that cluster's guest offset."""
    path = d / "unaligned.qcow2"
    create(d, path.name, str(SIZE), "cluster_size=64k")
    mapcorpus.qemu_io(d, path.name, f"write -P 7 0 {16 << 16}")
    with open(path, "r+b") as f:
        header = f.read(104)
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset + 5 * 8)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2_offset + 5 * 8)
        f.write(struct.pack(">Q", entry + 512))
    return path, 5 << 16


@pytest.mark.parametrize("window", [1, 4, 1024])
def test_a_bad_entry_fails_the_reads_that_meet_it_as_without_windows(
    tmp_path, tools, monkeypatch, window
):
    monkeypatch.setattr(cluster, "WINDOW", window)
    path, bad = _unaligned_entry(tmp_path)
    with open_image(str(path), "qcow2") as image:
        plain = _unwindowed(image)
        # Before the bad entry, in its window or not: mapped.
        assert image.clusters.extents(0, bad) == plain.extents(0, bad)
        assert image.clusters.extents(bad + (1 << 16), 1 << 20) == plain.extents(
            bad + (1 << 16), 1 << 20
        )
        for offset, length in ((0, 1 << 20), (bad + 4096, 4096), (4096, bad)):
            errors = []
            for mapping in (image.clusters, plain):
                with pytest.raises(CorruptImageError) as caught:
                    mapping.extents(offset, length)
                errors.append((str(caught.value), caught.value.guest_offset))
            assert errors[0] == errors[1]
            assert errors[0][1] == max(offset, bad)
