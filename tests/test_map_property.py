"""qimg map and measure against qemu-img on random write patterns:
data, zero writes (with and without unmap), discards and compressed
clusters made by qemu-io at random places, over standard and extended L2
tables, with and without a qcow2 backing file that has its own pattern."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mapcorpus import both, create, io_step, qemu_io, settle

SIZE = 1 << 20
# (creation options, cluster size)
LAYOUTS = (
    ("cluster_size=512", 512),
    ("cluster_size=4k", 4 << 10),
    ("cluster_size=64k", 64 << 10),
    ("cluster_size=32k,extended_l2=on", 32 << 10),
)


@st.composite
def _ops(draw, cluster: int) -> list[str]:
    """qemu-io commands: byte ranges at 512-byte granularity; compressed
    writes of whole clusters."""
    out = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["write", "zero", "unmap", "discard", "compress"]))
        if kind == "compress":
            start = draw(st.integers(0, SIZE // cluster - 1)) * cluster
            out.append(io_step(kind, start, cluster))
            continue
        start = draw(st.integers(0, SIZE // 512 - 1)) * 512
        length = draw(st.integers(1, min(256, (SIZE - start) // 512))) * 512
        out.append(io_step(kind, start, length))
    return out


@st.composite
def _cases(draw):
    layout, cluster = draw(st.sampled_from(LAYOUTS))
    backing = draw(st.none() | _ops(64 << 10))
    return layout, backing, draw(_ops(cluster))


@pytest.fixture(scope="module")
def tools(qemu_img, qemu_io):
    return True


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=_cases())
def test_map_and_measure_of_random_writes_are_qemu_imgs(tools, case):
    layout, backing, ops = case
    d = Path(tempfile.mkdtemp(prefix="qimg-map-prop-"))
    try:
        more = ()
        if backing is not None:
            create(d, "base.qcow2", str(SIZE))
            if backing:
                qemu_io(d, "base.qcow2", *backing, check=False)
            more = ("-b", "base.qcow2", "-F", "qcow2")
        create(d, "image.qcow2", str(SIZE), layout, *more)
        if ops:
            # A compressed write to an allocated cluster fails; the rest stand.
            qemu_io(d, "image.qcow2", *ops, check=False)
        settle(d)
        for args in (
            ("map", "--output=json", "image.qcow2"),
            ("measure", "--output=json", "-O", "qcow2", "-o", "cluster_size=4k", "image.qcow2"),
        ):
            theirs, mine = both(d, *args)
            assert mine == theirs, args
    finally:
        shutil.rmtree(d)
