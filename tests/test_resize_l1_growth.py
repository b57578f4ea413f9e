"""L1 table growth (ClusterMap.grow_l1, QEMU's qcow2_grow_l1_table), judged
by qemu-img: the image checks clean and reads back the data written."""

from __future__ import annotations

import os
import struct

import pytest
from conftest import qemu_check_clean, qemu_read_raw, run

import qimg
from qimg.formats.qcow2 import layout as L


def _l1_fields(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        f.seek(L.HEADER_OFF_L1_SIZE)
        return struct.unpack(">IQ", f.read(12))


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_grown_l1_keeps_data_and_checks_clean(qemu_img, tmp_path, cluster_size):
    path = tmp_path / "a.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, "1M"])
    pattern = os.urandom(3 * cluster_size)
    with qimg.open_image(str(path), "qcow2", writable=True) as img:
        img.write(0, pattern)
        old_size, old_offset = img.clusters.l1_size, img.clusters.l1_offset
        img.clusters.grow_l1(old_size + 1)
        img.write(1 << 19, pattern)  # after the move: new L2 tables in the new L1
    size, offset = _l1_fields(path)
    expected = max(1, old_size)
    while expected < old_size + 1:
        expected = (expected * 3 + 1) // 2
    assert (size, offset != old_offset) == (expected, True)
    qemu_check_clean(path)
    data = qemu_read_raw(path, tmp_path)
    assert data[: len(pattern)] == pattern
    assert data[1 << 19 : (1 << 19) + len(pattern)] == pattern


def test_exact_growth_takes_the_size_asked(qemu_img, tmp_path):
    path = tmp_path / "a.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "64k"])
    with qimg.open_image(str(path), "qcow2", writable=True) as img:
        img.clusters.grow_l1(1000, exact_size=True)
    assert _l1_fields(path)[0] == 1000
    qemu_check_clean(path)
