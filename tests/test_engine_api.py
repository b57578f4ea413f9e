"""The public library API: open_image / create_image and the driver methods."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import qemu_check_clean, qemu_json, qemu_read_raw, run

import qimg
from qimg.formats.qcow2 import layout as L

MiB = 1 << 20


def test_import_qimg_is_cheap_and_exports_lazily():
    code = (
        "import sys, qimg; heavy = [m for m in ('numpy', 'rich', 'click', 'cryptography', "
        "'qimg.api') if m in sys.modules]; print(heavy); "
        "assert qimg.open_image.__module__ == 'qimg.api'; "
        "assert qimg.create_image.__module__ == 'qimg.api'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    with pytest.raises(AttributeError):
        qimg.no_such_name  # noqa: B018


def test_create_and_open_as_context_managers(tmp_path, qemu_img):
    path = str(tmp_path / "disk.qcow2")
    qimg.create_image(path, "qcow2", 8 * MiB)
    with qimg.open_image(path, writable=True) as img:
        assert img.size == 8 * MiB
        img.write(MiB - 100, b"x" * 300)
        img.write_zeroes(2 * MiB, MiB)
        img.write(5 * MiB, b"y" * 65536)
        img.discard(5 * MiB, 65536)
        img.flush()
        assert img.read(MiB - 100, 300) == b"x" * 300
        kinds = {e.kind for e in img.block_status(0, img.size)}
        assert kinds  # runs of data / zero / unallocated
    qemu_check_clean(path)
    data = qemu_read_raw(path, tmp_path, "qcow2")
    assert data[MiB - 100 : MiB + 200] == b"x" * 300
    assert data.count(0) == len(data) - 300


def test_block_status_matches_qemu_img_map(tmp_path, qemu_img):
    path = str(tmp_path / "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, "4M"])
    run(
        ["qemu-io", "-c", "write -P 1 0 128k", "-c", "write -z 1M 256k", "-c", "write 3M 64k", path]
    )
    qemu_map = qemu_json("map", "--output=json", path)
    ours = []
    with qimg.open_image(path) as img:
        for ext in img.allocated_extents(0, img.size):
            ours.append(ext)
    data_runs = [(m["start"], m["length"]) for m in qemu_map if m["data"]]
    assert [(o, n) for o, n, is_data, _z in ours if is_data] == data_runs


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("maker", ["qemu-img", "qimg"])
def test_preallocated_image_reads_zeros_and_writes_in_place(mode, maker, tmp_path, qemu_img):
    path = str(tmp_path / "disk.qcow2")
    if maker == "qemu-img":
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"preallocation={mode}", path, "3M"])
    else:
        qimg.create_image(path, "qcow2", 3 * MiB, {"preallocation": mode})
    size_before = os.path.getsize(path)
    with qimg.open_image(path, writable=True) as img:
        assert img.read(0, img.size) == bytes(img.size)
        img.write(12345, b"z" * 70000)
    qemu_check_clean(path)
    data = qemu_read_raw(path, tmp_path, "qcow2")
    assert data[12345 : 12345 + 70000] == b"z" * 70000
    assert data.count(0) == len(data) - 70000
    if mode != "metadata":
        # Preallocated clusters are overwritten in place, not reallocated.
        assert os.path.getsize(path) == size_before


def _incompatible(path: str) -> int:
    with open(path, "rb") as f:
        f.seek(L.HEADER_OFF_INCOMPATIBLE_FEATURES)
        return int.from_bytes(f.read(8), "big")


def test_lazy_refcounts_dirty_bit_set_before_first_write_and_cleared_on_close(tmp_path, qemu_img):
    path = str(tmp_path / "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "2M"])
    with qimg.open_image(path, writable=True) as img:
        assert not _incompatible(path) & L.QCOW2_INCOMPAT_DIRTY
        img.write(0, b"a" * 4096)
        assert _incompatible(path) & L.QCOW2_INCOMPAT_DIRTY
        assert qemu_json("info", "-U", "--output=json", path)["dirty-flag"] is True
    assert not _incompatible(path) & L.QCOW2_INCOMPAT_DIRTY
    qemu_check_clean(path)
    assert qemu_read_raw(path, tmp_path, "qcow2")[:4096] == b"a" * 4096


def test_read_only_image_refuses_writes(tmp_path, qemu_img):
    from qimg.errors import QimgError

    path = str(tmp_path / "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"])
    before = open(path, "rb").read()
    with qimg.open_image(path) as img:
        for call in (
            lambda: img.write(0, b"x"),
            lambda: img.write_zeroes(0, 512),
            lambda: img.discard(0, 65536),
        ):
            with pytest.raises(QimgError):
                call()
    assert open(path, "rb").read() == before


def test_out_of_range_request_is_refused(tmp_path, qemu_img):
    from qimg.errors import QimgError

    path = str(tmp_path / "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, "1M"])
    with qimg.open_image(path, writable=True) as img:
        with pytest.raises(QimgError, match="out of range"):
            img.write(MiB - 1, b"xx")
        with pytest.raises(QimgError, match="out of range"):
            img.read(MiB, 1)
    qemu_check_clean(path)


def test_raw_driver_round_trip(tmp_path, qemu_img):
    path = str(tmp_path / "disk.raw")
    qimg.create_image(path, "raw", 2 * MiB)
    with qimg.open_image(path, "raw", writable=True) as img:
        img.write(1000, b"r" * 5000)
        img.write_zeroes(2000, 100)
        img.discard(MiB, 65536)
        assert img.read(1000, 5000) == b"r" * 1000 + bytes(100) + b"r" * 3900
    assert qemu_read_raw(path, tmp_path, "raw")[1000:6000] == b"r" * 1000 + bytes(100) + b"r" * 3900


def test_freed_cluster_not_reused_before_its_unmapping_is_durable(tmp_path, qemu_img):
    """Crash safety: data is written to a freed host cluster only once the
    on-disk L2 table no longer maps any guest offset there."""
    path = str(tmp_path / "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "1M"])
    with qimg.open_image(path, writable=True) as img:
        img.write(0, b"a" * 4096)
        img.flush()
        img.discard(0, 4096)
        freed = img.refcounts.pending_free
        seen = []
        write_data = img.dataio.write

        def checked_write(guest, host, buffers):
            with qimg.open_image(path, force_share=True, lock=False) as disk:
                mapped = [
                    e
                    for e in disk.block_status(0, disk.size)
                    if e.kind == 0 and e.host <= host < e.host + e.length
                ]
            seen.append((host, mapped))
            write_data(guest, host, buffers)

        img.dataio.write = checked_write
        img.write(65536, b"b" * 4096)
    assert freed[1] > freed[0]
    assert seen and all(not mapped for _host, mapped in seen)
    qemu_check_clean(path)
