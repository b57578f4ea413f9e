"""`qimg bitmap` at QEMU's limits: an image with 65535 bitmaps (the most
QEMU takes; crafted with the library, not 65535 qemu-img calls), and the
granularities refused on a large image, judged by qemu-img."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import qemu_check_clean, run
from infotools import message, qimg_here

from qimg.api import open_image
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.bitmap import BitmapEntry, _pack_directory, read_bitmap_directory
from qimg.formats.qcow2.bitmap_ops import _set_extension


def add_empty_bitmaps(path, n: int) -> None:
    """`n` enabled, empty bitmaps b0..b{n-1} (64 KiB granularity): one
    zero table cluster each, then the directory, then the header."""
    with open_image(str(path), "qcow2", writable=True) as img:
        cs = img.geo.cluster_size
        tables = img.refcounts.alloc(n)
        img.write_metadata(tables, bytes(n * cs), "bitmap")
        rows = [
            (BitmapEntry(f"b{i}", tables + i * cs, 1, L.BME_FLAG_AUTO, 1, 16), b"")
            for i in range(n)
        ]
        directory = _pack_directory(rows)
        offset = img.refcounts.alloc(-(-len(directory) // cs))
        img.write_metadata(offset, directory, "bitmap")
        img.flush()
        _set_extension(img, (n, len(directory), offset))


def bitmap_names(path) -> list[str]:
    out = run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout
    return [b["name"] for b in json.loads(out)["format-specific"]["data"].get("bitmaps", [])]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    path = tmp_path_factory.mktemp("full") / "full.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "1M"])
    add_empty_bitmaps(path, L.QCOW2_MAX_BITMAPS)
    return path


def test_an_image_with_65535_bitmaps_is_refused_another(full, tmp_path):
    """qemu-img 7.2 takes minutes to open 65535 bitmaps (its load is
    quadratic: 13 s for 16384 here), so the message is QEMU's text from
    qcow2_co_can_store_new_dirty_bitmap, and the image is judged by
    qemu-img at 4096 bitmaps below."""
    path = tmp_path / "full.qcow2"
    shutil.copy(full, path)
    before = path.read_bytes()
    got = qimg_here(tmp_path, "bitmap", "--add", "full.qcow2", "one-more")
    assert (got.returncode, message(got.stderr, "qimg")) == (
        1,
        "Operation add on bitmap one-more failed: Can't make bitmap 'one-more' persistent in "
        "'full.qcow2': Maximum number of persistent bitmaps is already reached",
    )
    assert path.read_bytes() == before


def test_an_image_with_65535_bitmaps_takes_one_after_a_remove(full, tmp_path):
    path = tmp_path / "full.qcow2"
    shutil.copy(full, path)
    for args in (["--remove", "full.qcow2", "b7"], ["--add", "-g", "512", "full.qcow2", "last"]):
        got = qimg_here(tmp_path, "bitmap", *args)
        assert got.returncode == 0, got.stderr
    with open_image(str(path)) as img:  # opening checks every table, as QEMU's does
        entries = read_bitmap_directory(img)
    assert len(entries) == L.QCOW2_MAX_BITMAPS
    last = entries[-1]
    assert (last.name, last.granularity, last.flag_names()) == ("last", 512, ["auto"])
    assert "b7" not in {e.name for e in entries}


def test_many_bitmaps_edited_by_qimg_pass_qemu_img_check(tmp_path):
    path = tmp_path / "many.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "1M"])
    add_empty_bitmaps(path, 4096)
    qemu_check_clean(path)
    for args in (["--remove", "many.qcow2", "b7"], ["--add", "many.qcow2", "last"]):
        got = qimg_here(tmp_path, "bitmap", *args)
        assert got.returncode == 0, got.stderr
    qemu_check_clean(path)
    names = bitmap_names(path)
    assert len(names) == 4096 and names[-1] == "last" and "b7" not in names


@pytest.mark.parametrize("granularity", ["512", "1k", "64k", "2M", "2G"])
def test_granularity_limits_on_a_4_tib_image_as_qemu_img(tmp_path, granularity):
    """512 B bits of 4 TiB would take 1 GiB: refused ("Use larger
    granularity"); coarser ones are taken; compared with qemu-img."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(theirs), "4T"])
    shutil.copy(theirs, ours)
    q = run(["qemu-img", "bitmap", "--add", "-g", granularity, str(theirs), "b"], check=False)
    got = qimg_here(tmp_path, "bitmap", "--add", "-g", granularity, str(ours), "b")
    expected = re.sub(r"#block\d+", str(ours), message(q.stderr, "qemu-img"))
    assert (got.returncode, message(got.stderr, "qimg")) == (q.returncode, expected)
    assert bitmap_names(ours) == bitmap_names(theirs)
    qemu_check_clean(ours)
