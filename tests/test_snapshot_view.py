"""A snapshot view is the same image over the snapshot's L1 table: it reads
what `qemu-img convert -l` reads, at the image's current virtual size, and
closing it leaves the image open."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import qimg, run

from qimg.api import open_image
from qimg.formats.qcow2.snapshot import open_snapshot_view

MiB = 1 << 20


def qemu_snapshot_raw(path: Path, name: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"qemu-{name}.raw"
    run(["qemu-img", "convert", "-U", "-l", name, "-O", "raw", str(path), str(out)])
    return out.read_bytes()


def make_image(tmp_path: Path, *, cluster_size: int = 65536) -> Path:
    """Snapshot "old" of 4 MiB (data, compressed data, zeros), then the
    image grown to 6 MiB and written over, snapshot "new"."""
    path = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
         str(path), "4M"])  # fmt: skip
    io = ["write -P 1 0 1M", "write -c -P 2 1M 256k", "write -z 2M 64k", "write -P 3 3M 8k"]
    run(["qemu-io", *sum((["-c", c] for c in io), []), str(path)])
    run(["qemu-img", "snapshot", "-c", "old", str(path)])
    run(["qemu-img", "resize", "-q", str(path), "6M"])
    run(["qemu-io", "-c", "write -P 9 512k 2M", "-c", "write -P 8 5M 64k", str(path)])
    run(["qemu-img", "snapshot", "-c", "new", str(path)])
    run(["qemu-io", "-c", "discard 0 6M", str(path)])
    return path


@pytest.mark.parametrize("cluster_size", [512, 65536])
@pytest.mark.parametrize("name", ["old", "new", "1"])
def test_snapshot_view_reads_what_qemu_img_convert_l_reads(tmp_path, cluster_size, name):
    path = make_image(tmp_path, cluster_size=cluster_size)
    expected = qemu_snapshot_raw(path, name, tmp_path)
    with open_image(str(path)) as img:
        view = open_snapshot_view(img, None, name)
        assert view.size == img.size == len(expected)
        assert view.read(0, view.size) == expected
        assert not view.writable
        view.close()
        # The image itself is still open and reads its active layer.
        assert img.read(0, 4096) == bytes(4096)


def test_convert_l_writes_the_current_virtual_size_as_qemu_img(tmp_path):
    path = make_image(tmp_path)
    ours = tmp_path / "ours.raw"
    qimg("convert", "-l", "snapshot.name=old", "-O", "raw", path, ours)
    assert ours.read_bytes() == qemu_snapshot_raw(path, "snapshot.name=old", tmp_path)
