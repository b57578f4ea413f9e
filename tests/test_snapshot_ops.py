"""Snapshot create, apply and delete change an image exactly as qemu-img 7.2
does: run side by side on copies of one image, the two files are the same
byte for byte but for the snapshot dates; after -a the active layer reads
what the snapshot held; snapshots with VM state list, apply and delete
correctly."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import qemu_check_clean, qimg, run
from damage import Layout, write_u64
from infotools import qimg_here

from qimg.formats.qcow2 import layout as L

KiB, MiB = 1 << 10, 1 << 20


def without_dates(path: Path) -> bytes:
    """The file with each snapshot entry's date_sec and date_nsec zeroed."""
    data = bytearray(path.read_bytes())
    nb, pos = struct.unpack_from(">IQ", data, L.HEADER_OFF_NB_SNAPSHOTS)
    for _ in range(nb):
        pos = (pos + 7) & ~7
        head = L.SNAPSHOT_HEADER.unpack_from(data, pos)
        data[pos + 16 : pos + 24] = bytes(8)
        pos += L.SNAPSHOT_HEADER.size + head[8] + head[2] + head[3]
    return bytes(data)


def qemu_io(path: Path, *cmds: str) -> None:
    run(["qemu-io", "-f", "qcow2", *sum((["-c", c] for c in cmds), []), str(path)])


def raw_of(path: Path, tmp: Path, snapshot: str | None = None) -> bytes:
    out = tmp / "read.raw"
    args = ["qemu-img", "convert", "-U"] + (["-l", snapshot] if snapshot else [])
    run(args + ["-O", "raw", str(path), str(out)])
    return out.read_bytes()


# Where an operation needs a new refcount block, qimg's allocator places it
# before the clusters it covers and QEMU's after the first of them: those
# files differ in layout (not meaning), and are compared by what they hold.
CONFIGS = {
    "64k": ("cluster_size=64k", True),
    "512-refcount64": ("cluster_size=512,refcount_bits=64", False),
    "1m": ("cluster_size=1M", True),
    "extended-l2": ("cluster_size=64k,extended_l2=on", True),
    "v2": ("compat=0.10,cluster_size=4k", True),
}

STEPS = [
    ("-c", "s1"),
    ("-c", "s2"),
    ("-a", "s1"),
    ("-d", "s1"),
    ("-a", "2"),
    ("-d", "s2"),
]


@pytest.mark.parametrize(("options", "exact"), CONFIGS.values(), ids=CONFIGS.keys())
def test_each_step_leaves_the_file_qemu_img_leaves(tmp_path, options, exact):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(ours), "12M"])
    cs = MiB if "1M" in options else 128 * KiB  # whole clusters
    compressed = "write -c -P 3 4M"
    qemu_io(ours, "write -P 1 0 1M", f"{compressed} {cs}", "write -z 6M 64k", "write -P 2 11M 64k")
    theirs.write_bytes(ours.read_bytes())
    for n, (op, name) in enumerate(STEPS):
        for path in (ours, theirs):
            qemu_io(path, f"write -P {10 + n} {n * 192}k 96k", f"write -z {n * 192 + 96}k 4k")
        assert qimg_here(tmp_path, "snapshot", op, name, ours.name).returncode == 0
        run(["qemu-img", "snapshot", op, name, str(theirs)])
        if exact:
            assert without_dates(ours) == without_dates(theirs), f"after {op} {name}"
        else:
            assert_same_meaning(ours, theirs, tmp_path)
        qemu_check_clean(ours)


def assert_same_meaning(ours: Path, theirs: Path, tmp: Path) -> None:
    """The same snapshots (ids, names, sizes) each reading the same data,
    and the same active layer."""
    import json

    def snaps(path: Path) -> list:
        info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
        return [
            {k: v for k, v in s.items() if not k.startswith("date")}
            for s in info.get("snapshots", [])
        ]

    assert snaps(ours) == snaps(theirs)
    for s in snaps(ours)[-1:]:
        sid = f"snapshot.id={s['id']}"
        assert raw_of(ours, tmp, sid) == raw_of(theirs, tmp, sid)
    assert raw_of(ours, tmp) == raw_of(theirs, tmp)


def test_apply_restores_the_data_of_snapshot_time(tmp_path):
    path = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M"])
    qemu_io(path, "write -c -P 2 1M 128k", "write -P 1 0 1M", "write -P 1 2M 2M")
    then = raw_of(path, tmp_path)
    qimg("snapshot", "-c", "then", path)
    qemu_io(path, "write -P 7 0 3M", "discard 3M 1M")
    assert raw_of(path, tmp_path) != then
    qimg("snapshot", "-a", "then", path)
    assert raw_of(path, tmp_path) == then
    assert raw_of(path, tmp_path, "then") == then
    qemu_check_clean(path)


def test_apply_takes_the_virtual_size_the_snapshot_recorded(tmp_path):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(ours), "64k"])
    qemu_io(ours, "write -P 1 0 64k")
    run(["qemu-img", "snapshot", "-c", "small", str(ours)])
    run(["qemu-img", "resize", "-q", str(ours), "200k"])  # the L1 table grows
    qemu_io(ours, "write -P 2 0 200k")
    run(["qemu-img", "snapshot", "-c", "big", str(ours)])
    theirs.write_bytes(ours.read_bytes())
    for name in ("small", "big", "small"):
        qimg("snapshot", "-a", name, ours)
        run(["qemu-img", "snapshot", "-a", name, str(theirs)])
        assert raw_of(ours, tmp_path) == raw_of(theirs, tmp_path)
        qemu_check_clean(ours)


def vm_state_image(tmp_path: Path, name: str, active_l1_entries: int = 3) -> Path:
    """A snapshot "vm" as QEMU's savevm leaves one: the VM state (32 KiB
    of 0xee) lies past the 64 KiB disk in the snapshot's L1 table (512-byte
    clusters: an L1 entry maps 32 KiB), and no longer in the active one.
    With `active_l1_entries` 2, the active L1 table is one entry shorter
    than the snapshot's (applying it must grow the table)."""
    path = tmp_path / name
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "96k"])
    qemu_io(path, "write -P 1 0 64k", "write -P 0xee 64k 32k")
    run(["qemu-img", "snapshot", "-c", "vm", str(path)])
    qemu_io(path, "discard 64k 32k", "write -P 2 0 8k")
    lay = Layout.read(path)
    write_u64(path, 24, 64 * KiB)  # the disk is 64 KiB
    entry = lay.snapshot_entries()[0]
    with open(path, "r+b") as f:
        f.seek(entry + 32)  # vm_state_size (32 bits)
        f.write(struct.pack(">I", 32 * KiB))
        f.seek(entry + L.SNAPSHOT_HEADER.size)  # vm_state_size_large, disk_size
        f.write(struct.pack(">QQ", 32 * KiB, 64 * KiB))
    if active_l1_entries == 2:
        l2 = lay.l2_table(64 * KiB)
        lay.set_l1_entry(64 * KiB, 0)
        lay.set_refcount(l2 // lay.cluster_size, 0)  # the active table qemu-io made
        with open(path, "r+b") as f:
            f.seek(36)  # l1_size
            f.write(struct.pack(">I", 2))
    qemu_check_clean(path)
    return path


@pytest.mark.parametrize("active_l1_entries", [3, 2])
def test_vm_state_snapshots_list_apply_and_delete_as_qemu_img(tmp_path, active_l1_entries):
    ours = vm_state_image(tmp_path, "ours.qcow2", active_l1_entries)
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(ours.read_bytes())
    listing = qimg("snapshot", "-l", ours).stdout
    assert listing == run(["qemu-img", "snapshot", "-l", str(theirs)]).stdout
    assert "32 KiB" in listing
    disk = raw_of(ours, tmp_path, "vm")
    for op in ("-a", "-d"):
        qimg("snapshot", op, "vm", ours)
        run(["qemu-img", "snapshot", op, "vm", str(theirs)])
        assert without_dates(ours) == without_dates(theirs)
        qemu_check_clean(ours)
        assert raw_of(ours, tmp_path) == disk == bytes([1]) * 64 * KiB


def test_a_refcount_overflow_fails_as_qemu_img(tmp_path):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", str(ours), "8M"])
    qemu_io(ours, "write 0 128k")
    theirs.write_bytes(ours.read_bytes())
    got = qimg("snapshot", "-c", "s", ours, check=False)
    expected = run(["qemu-img", "snapshot", "-c", "s", str(theirs)], check=False)
    assert got.returncode == expected.returncode == 1
    assert got.stderr.removeprefix("qimg") == expected.stderr.removeprefix("qemu-img")
    assert ours.read_bytes() == theirs.read_bytes()
