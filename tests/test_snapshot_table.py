"""The snapshot table has one reader and one writer (snapshot.py): a table
qimg rewrites is the table qemu-img writes for the same snapshots, byte for
byte, unknown extra data included, and qemu-img finds the image clean."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import qemu_check_clean, run

from qimg.api import open_image
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.snapshot import read_snapshot_table, write_snapshot_table

MiB = 1 << 20


def snapshot_table_bytes(path: Path) -> bytes:
    """The table the header names, up to the end of its last entry."""
    data = path.read_bytes()
    nb, offset = struct.unpack_from(">IQ", data, L.HEADER_OFF_NB_SNAPSHOTS)
    pos = offset
    for _ in range(nb):
        pos = (pos + 7) & ~7
        head = L.SNAPSHOT_HEADER.unpack_from(data, pos)
        pos += L.SNAPSHOT_HEADER.size + head[8] + head[2] + head[3]
    return data[offset:pos]


def qemu_image(tmp_path: Path, *names: str, compat: str = "1.1") -> Path:
    path = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", str(path), "4M"])
    run(["qemu-io", "-c", "write -P 7 0 192k", str(path)])
    for name in names:
        run(["qemu-img", "snapshot", "-c", name, str(path)])
    return path


def qimg_rewrite(path: Path) -> None:
    with open_image(str(path), writable=True) as img:
        write_snapshot_table(img, read_snapshot_table(img))


def qemu_rewrite(path: Path) -> None:
    """qemu-img writes the whole table twice (create, then delete, of "tmp")."""
    run(["qemu-img", "snapshot", "-c", "tmp", str(path)])
    run(["qemu-img", "snapshot", "-d", "tmp", str(path)])


def test_rewriting_a_qemu_table_writes_the_same_bytes(tmp_path):
    path = qemu_image(tmp_path, "first", "second")
    before = snapshot_table_bytes(path)
    listing = run(["qemu-img", "snapshot", "-l", str(path)]).stdout
    qimg_rewrite(path)
    assert snapshot_table_bytes(path) == before
    assert run(["qemu-img", "snapshot", "-l", str(path)]).stdout == listing
    qemu_check_clean(path)


def craft_entry(path: Path, extra: bytes, vm_state32: int = 0, name: bytes = b"crafted") -> None:
    """Replace the (one-entry) table in place by an entry with `extra` as
    its extra data, keeping the L1 table of the entry that was there."""
    data = path.read_bytes()
    _nb, offset = struct.unpack_from(">IQ", data, L.HEADER_OFF_NB_SNAPSHOTS)
    head = list(L.SNAPSHOT_HEADER.unpack_from(data, offset))
    head[2], head[3] = 1, len(name)  # id "1"
    head[7], head[8] = vm_state32, len(extra)
    entry = L.SNAPSHOT_HEADER.pack(*head) + extra + b"1" + name
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(entry)


EXTRAS = {
    "none": b"",
    "vm-state-only": struct.pack(">Q", 5 * MiB),
    "no-icount": struct.pack(">QQ", 0, 4 * MiB),
    "qemu": struct.pack(">QQQ", 0, 4 * MiB, 12345),
    "large-vm-state": struct.pack(">QQQ", 5 << 32, 4 * MiB, 1),
    "unknown-tail": struct.pack(">QQQ", 0, 4 * MiB, 3) + bytes(range(1, 17)),
}


@pytest.mark.parametrize("extra", EXTRAS.values(), ids=EXTRAS.keys())
def test_entries_are_written_back_as_qemu_writes_them(tmp_path, extra):
    """Short extra data gains QEMU's defaults (the image's size, icount -1);
    unknown extra data is kept; a VM state over 32 bits is 0 in the entry
    header."""
    ours = qemu_image(tmp_path, "snap")
    craft_entry(ours, extra, vm_state32=4096)
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(ours.read_bytes())
    qimg_rewrite(ours)
    qemu_rewrite(theirs)
    assert snapshot_table_bytes(ours) == snapshot_table_bytes(theirs)
    qemu_check_clean(ours)
    listing = run(["qemu-img", "snapshot", "-l", str(ours)]).stdout
    assert listing == run(["qemu-img", "snapshot", "-l", str(theirs)]).stdout


def test_names_that_are_not_utf8_are_written_back_unchanged(tmp_path):
    path = qemu_image(tmp_path, "snap")
    craft_entry(path, EXTRAS["qemu"], name=b"caf\xe9")
    qimg_rewrite(path)
    assert snapshot_table_bytes(path).endswith(b"1caf\xe9")
    qemu_check_clean(path)


def test_an_empty_table_is_named_by_offset_zero_as_qemu_leaves_it(tmp_path):
    ours = qemu_image(tmp_path, "snap")
    theirs = tmp_path / "theirs.qcow2"
    theirs.write_bytes(ours.read_bytes())
    with open_image(str(ours), writable=True) as img:
        assert write_snapshot_table(img, []).offset == 0
    head = struct.unpack_from(">IQ", ours.read_bytes(), L.HEADER_OFF_NB_SNAPSHOTS)
    assert head == (0, 0)
    run(["qemu-img", "snapshot", "-d", "snap", str(theirs)])
    assert struct.unpack_from(">IQ", theirs.read_bytes(), L.HEADER_OFF_NB_SNAPSHOTS) == head


def test_unknown_header_extensions_survive_a_table_rewrite(tmp_path):
    path = qemu_image(tmp_path, "snap")
    data = bytearray(path.read_bytes())
    # A v3 header's extensions start at header_length; put an unknown one first.
    header_length = struct.unpack_from(">I", data, 100)[0]
    unknown = L.HEADER_EXTENSION.pack(0x12345678, 5) + b"hello" + bytes(3)
    data[header_length:header_length] = unknown
    del data[65536 : 65536 + len(unknown)]  # the header cluster keeps its size
    path.write_bytes(bytes(data))
    qimg_rewrite(path)
    assert unknown in path.read_bytes()[:65536]
    qemu_check_clean(path)
