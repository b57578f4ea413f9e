"""Unknown header content survives qimg's writes the way QEMU keeps it:
unknown extensions and compatible bits stay, unknown autoclear bits go,
an unknown incompatible bit refuses the image."""

from __future__ import annotations

import struct

from conftest import qemu_check_clean, qemu_json, run

import qimg

UNKNOWN_EXT = 0x12345678
UNKNOWN_COMPAT = 1 << 5
UNKNOWN_AUTOCLEAR = 1 << 7


def _add_unknown_header_content(path) -> None:
    """Set unknown compatible/autoclear bits and insert an unknown extension
    in front of the existing ones (still inside cluster 0)."""
    with open(path, "r+b") as f:
        head = bytearray(f.read(65536))
        compat, autoclear = struct.unpack_from(">QQ", head, 80)
        struct.pack_into(">QQ", head, 80, compat | UNKNOWN_COMPAT, autoclear | UNKNOWN_AUTOCLEAR)
        header_length = struct.unpack_from(">I", head, 100)[0]
        ext = struct.pack(">II", UNKNOWN_EXT, 5) + b"hello\0\0\0"
        rest = head[header_length:]
        head[header_length:] = (ext + rest)[: len(rest)]
        f.seek(0)
        f.write(head)


def _header_fields(path) -> tuple[int, int, list[int]]:
    with open(path, "rb") as f:
        head = f.read(65536)
    compat, autoclear = struct.unpack_from(">QQ", head, 80)
    pos = struct.unpack_from(">I", head, 100)[0]
    exts = []
    while True:
        etype, elen = struct.unpack_from(">II", head, pos)
        if etype == 0:
            break
        exts.append(etype)
        pos += 8 + (elen + 7) // 8 * 8
    return compat, autoclear, exts


def test_writes_keep_unknown_extensions_and_compat_bits_and_clear_unknown_autoclear(
    tmp_path, qemu_img
):
    path = tmp_path / "t.qcow2"
    theirs = tmp_path / "qemu.qcow2"
    for p in (path, theirs):
        run([qemu_img, "create", "-q", "-f", "qcow2", str(p), "4M"])
        _add_unknown_header_content(p)
    with qimg.open_image(str(path), writable=True) as img:
        img.write(65536, b"x" * 70000)
    run(["qemu-io", "-c", "write -P 0x78 65536 70000", str(theirs)])
    compat, autoclear, exts = _header_fields(path)
    q_compat, q_autoclear, q_exts = _header_fields(theirs)
    assert (compat, autoclear, sorted(exts)) == (q_compat, q_autoclear, sorted(q_exts))
    assert compat & UNKNOWN_COMPAT
    assert not autoclear & UNKNOWN_AUTOCLEAR
    assert UNKNOWN_EXT in exts
    qemu_check_clean(path)
    assert qemu_json("info", "--output=json", str(path))["virtual-size"] == 4 << 20
    proc = run(["qemu-io", "-c", "read -P 0x78 65536 70000", str(path)])
    assert "read 70000/70000" in proc.stdout


def test_read_only_open_leaves_the_header_untouched(tmp_path, qemu_img):
    path = tmp_path / "t.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "4M"])
    _add_unknown_header_content(path)
    before = path.read_bytes()
    with qimg.open_image(str(path)) as img:
        img.read(0, 4096)
    assert path.read_bytes() == before
