"""The metadata overlap check (QEMU's qcow2_pre_write_overlap_check in its
default overlap-check=cached mode): writes onto metadata are refused as
QEMU refuses them, and the map stays right as tables come and go."""

from __future__ import annotations

import shutil

import pytest
from conftest import qemu_check_clean, qemu_read_raw, run

from qimg.api import open_image
from qimg.errors import CorruptImageError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.snapshot import read_snapshots

KiB = 1 << 10
MiB = 1 << 20


def _point_guest_cluster_at(path: str, guest_cluster: int, host: int) -> None:
    """Make the active L2 entry of `guest_cluster` a normal, COPIED cluster at `host`."""
    with open_image(path, "qcow2") as img:
        cs = img.geo.cluster_size
        l2 = img.clusters.l2_offset(
            (guest_cluster * cs) >> (img.geo.cluster_bits + img.geo.l2_bits)
        )
        index = guest_cluster & ((1 << img.geo.l2_bits) - 1)
    with open(path, "r+b") as f:
        f.seek(l2 + index * L.L2_ENTRY_SIZE_NORMAL)
        f.write((host | L.QCOW_OFLAG_COPIED).to_bytes(8, "big"))


def _snapshot_image(path: str) -> int:
    """An image with one snapshot (by qemu-img) whose active L2 table is
    its own; the host offset of the snapshot's L1 table."""
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"])
    run(["qemu-io", "-c", "write -P 1 0 64k", path])
    run(["qemu-img", "snapshot", "-c", "s1", path])
    run(["qemu-io", "-c", "write -P 2 64k 64k", path])  # copies the L2 table
    with open_image(path, "qcow2") as img:
        snapshots, _size = read_snapshots(img)
    return snapshots[0].l1_table_offset


def _qemu_check(path: str) -> tuple[int, str]:
    proc = run(["qemu-img", "check", path], check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_write_onto_an_inactive_l1_table_is_refused_as_qemu_refuses_it(tmp_path):
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    snap_l1 = _snapshot_image(ours)
    _point_guest_cluster_at(ours, 1, snap_l1)
    shutil.copyfile(ours, theirs)

    proc = run(["qemu-io", "-c", "write -P 3 64k 512", theirs], check=False)
    qemu_msg = "Preventing invalid write on metadata (overlaps with inactive L1 table)"
    assert qemu_msg in proc.stdout + proc.stderr

    with open_image(ours, "qcow2", writable=True) as img:
        with pytest.raises(CorruptImageError, match=r"overlaps with inactive L1 table\)"):
            img.write(64 * KiB, b"\3" * 512)

    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()  # both marked corrupt, the L1 table untouched
    assert _qemu_check(ours) == _qemu_check(theirs)
    assert run(["qemu-img", "info", ours]).stdout.count("corrupt: true") == 1


@pytest.mark.parametrize(
    "region, target",
    [
        ("active L1 table", lambda img: img.clusters.l1_offset),
        ("active L2 table", lambda img: img.clusters.l2_offset(0)),
        ("refcount table", lambda img: img.refcounts.table_offset),
        ("refcount block", lambda img: int(img.refcounts.table[0])),
        ("snapshot table", lambda img: img.header.snapshots_offset),
    ],
)
def test_write_onto_each_metadata_kind_is_refused_as_qemu_refuses_it(tmp_path, region, target):
    # (An L2 entry cannot name the header: host offset 0 reads as unallocated;
    # test_compressed_writes refuses data written there directly.)
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    _snapshot_image(ours)
    with open_image(ours, "qcow2") as img:
        host = target(img)
    _point_guest_cluster_at(ours, 1, host)
    shutil.copyfile(ours, theirs)

    proc = run(["qemu-io", "-c", "write -P 3 64k 512", theirs], check=False)
    assert f"Preventing invalid write on metadata (overlaps with {region})" in proc.stderr

    with open_image(ours, "qcow2", writable=True) as img:
        with pytest.raises(CorruptImageError, match=rf"overlaps with {region}\)"):
            img.write(64 * KiB, b"\3" * 512)
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()


def test_many_new_tables_keep_the_map_right_at_512_byte_clusters(tmp_path):
    """Spread writes make hundreds of L2 tables and refcount blocks: none
    is refused falsely, and each new table is protected at once."""
    path = str(tmp_path / "m.qcow2")
    size = 64 * MiB
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, str(size)])
    model = bytearray(size)
    step = 32 * KiB + 512  # a new L2 table (32 KiB of guest each) at every write
    with open_image(path, "qcow2", writable=True) as img:
        for n, guest in enumerate(range(0, size - 512, step)):
            data = bytes([n % 251 + 1]) * 512
            img.write(guest, data)
            model[guest : guest + 512] = data
            l2 = img.clusters.l2_offset(guest >> (img.geo.cluster_bits + img.geo.l2_bits))
            assert l2
            if n % 97 == 0:  # the newest tables are in the map at once
                block = max(int(x) for x in img.refcounts.table)
                assert img.overlap_map.may_overlap(l2, 512, "data")
                assert img.overlap_map.may_overlap(block, 512, "data")
                assert not img.overlap_map.may_overlap(l2, 512, "l2")
        _assert_map_matches_tables(img)
        assert len(img.refcounts.table.nonzero()[0]) > 4  # refcount blocks were made too
    qemu_check_clean(path)
    assert qemu_read_raw(path, tmp_path) == bytes(model)


def _assert_map_matches_tables(img) -> None:
    """The incrementally kept map names exactly the live tables' clusters."""
    cb = img.geo.cluster_bits
    l2s = sorted({(int(e) & L.L1E_OFFSET_MASK) >> cb for e in img.clusters.l1} - {0})
    blocks = sorted({(int(e) & L.REFT_OFFSET_MASK) >> cb for e in img.refcounts.table} - {0})
    img.overlap_map.sync()
    assert img.overlap_map.fixed == [r for r in img.metadata_regions() if r[1]]
    assert img.overlap_map.l2s.sorted == l2s
    assert img.overlap_map.blocks.sorted == blocks


def test_a_write_onto_an_l2_table_made_a_moment_before_is_refused(tmp_path):
    path = str(tmp_path / "n.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "8M"])
    with open_image(path, "qcow2", writable=True) as img:
        for guest in range(0, 4 * MiB, 32 * KiB):
            img.write(guest, b"x" * 512)
        img.write(6 * MiB, b"y" * 512)
        newest = img.clusters.l2_offset(6 * MiB >> (img.geo.cluster_bits + img.geo.l2_bits))
        with pytest.raises(CorruptImageError, match=r"overlaps with active L2 table\)"):
            img.dataio.write(0, newest, [b"z" * 512])
    assert "corrupt: true" in run(["qemu-img", "info", path]).stdout


def test_a_moved_refcount_table_and_its_new_blocks_are_in_the_map(tmp_path):
    path = str(tmp_path / "g.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "32M"])
    data = bytes(range(256)) * (12 * MiB // 256)
    with open_image(path, "qcow2", writable=True) as img:
        img.write(0, b"a" * 512)  # the map is built before the table moves
        old = img.refcounts.table_offset
        img.write(512, data)  # 12 MiB of host clusters: past the first table's reach
        assert img.refcounts.table_offset != old
        _assert_map_matches_tables(img)
        assert img.overlap_map.may_overlap(img.refcounts.table_offset, 512, "data")
    qemu_check_clean(path)
    assert qemu_read_raw(path, tmp_path)[: 512 + len(data)] == b"a" * 512 + data
