"""Truncated images and tables past the end of the file, judged by qemu-img 7.2.

QEMU reads past the end of an image file as zeros (only a read ending past
its BDRV_MAX_LENGTH, 2^63 - 2^30, fails, with EIO): a truncated image opens,
converts and checks, and users salvage such images. qimg must decide as
qemu-img does: the same exit codes, the same check output (human and JSON),
the same messages (program name aside) and the same data read back. Every
damage is computed from the image's own metadata (tests/damage.py).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import qemu_read_raw, qimg, run  # noqa: E402
from damage import BDRV_MAX_LENGTH, Layout, truncate  # noqa: E402

from qimg.formats.qcow2 import layout as L  # noqa: E402

MiB = 1 << 20
CS = 65536


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 4 MiB image: data at 0 (two clusters), a compressed cluster at
    1 MiB, data at 2 MiB, in that order in the file."""
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img / qemu-io are not installed (Debian package qemu-utils)")
    path = tmp_path_factory.mktemp("eof") / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M"])
    writes = ["write -P 0x11 0 128k", "write -c -P 0x22 1M 64k", "write -P 0x33 2M 64k"]
    run(["qemu-io", *(x for w in writes for x in ("-c", w)), str(path)])
    return path


def _copy(base: Path, tmp_path: Path) -> tuple[Path, Layout]:
    path = tmp_path / "t.qcow2"
    shutil.copy(base, path)
    return path, Layout.read(path)


def _text(proc) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) with the program's name taken off."""
    return proc.returncode, proc.stdout, proc.stderr.replace("qemu-img: ", "").replace("qimg: ", "")


def _json(text: str):
    return json.loads(text) if text.strip() else None


def assert_check_as_qemu(path: Path, *extra: str) -> None:
    """qimg check == qemu-img check, human and JSON: exit code, output, messages."""
    for output in ("human", "json"):
        args = ("check", f"--output={output}", *extra, str(path))
        want = _text(run(["qemu-img", *args], check=False))
        got = _text(qimg(*args, check=False))
        assert got[0] == want[0], (output, got, want)
        assert got[2] == want[2], output
        if output == "json":
            assert _json(got[1]) == _json(want[1])
        else:
            assert got[1] == want[1]


def assert_info_as_qemu(path: Path) -> None:
    args = ("info", "--output=json", str(path))
    want = _text(run(["qemu-img", *args], check=False))
    got = _text(qimg(*args, check=False))
    assert (got[0], got[2]) == (want[0], want[2])
    assert _json(got[1]) == _json(want[1])


def assert_convert_as_qemu(path: Path, tmp_path: Path, *extra: str) -> None:
    """convert -O raw: the same success or failure (and message); the same
    bytes where both succeed. (qemu-img leaves a partial target behind on
    failure; qimg leaves none.)"""
    theirs, ours = tmp_path / "theirs.raw", tmp_path / "ours.raw"
    want = run(["qemu-img", "convert", *extra, "-O", "raw", str(path), str(theirs)], check=False)
    got = qimg("convert", *extra, "-O", "raw", path, ours, check=False)
    assert _text(got) == _text(want)
    if want.returncode == 0:
        assert ours.read_bytes() == theirs.read_bytes()
    else:
        assert not ours.exists()


def assert_all_as_qemu(path: Path, tmp_path: Path) -> None:
    before = path.read_bytes()
    assert_info_as_qemu(path)
    assert_check_as_qemu(path)
    assert_convert_as_qemu(path, tmp_path)
    assert path.read_bytes() == before  # nothing written by info, check, convert


# --- truncated images -------------------------------------------------------------

CUTS = {
    "inside-refcount-table": lambda lay: lay.header.refcount_table_offset + 4,
    "inside-refcount-block": lambda lay: lay.refblock(0) + 6,
    "before-l1-table": lambda lay: lay.header.l1_table_offset,
    "inside-l1-table": lambda lay: lay.header.l1_table_offset + 4,
    "inside-l2-table": lambda lay: lay.l2_table(0) + 8,
    "inside-data": lambda lay: lay.data_cluster(CS) * CS + CS // 2,
    "at-compressed-cluster": lambda lay: lay.compressed_offset(MiB),
    "inside-compressed-cluster": lambda lay: lay.compressed_offset(MiB) + 16,
}


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_truncated_image_checks_and_converts_as_qemu_img(base, tmp_path, cut):
    path, lay = _copy(base, tmp_path)
    truncate(path, CUTS[cut](lay))
    assert_all_as_qemu(path, tmp_path)


def test_truncated_image_reads_through_the_library_as_qemu_img(base, tmp_path):
    import qimg as api

    path, lay = _copy(base, tmp_path)
    truncate(path, CUTS["inside-compressed-cluster"](lay))
    want = qemu_read_raw(path, tmp_path)
    with api.open_image(str(path)) as img:
        assert img.read(0, img.size) == want


def test_check_repairs_leaks_of_truncated_image_as_qemu_img(base, tmp_path):
    path, lay = _copy(base, tmp_path)
    truncate(path, CUTS["inside-data"](lay))
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(path, theirs)
    want = _text(run(["qemu-img", "check", "-r", "leaks", str(theirs)], check=False))
    got = _text(qimg("check", "-r", "leaks", path, check=False))
    assert got == want


@pytest.mark.parametrize(
    "cut", ["inside-refcount-table", "inside-refcount-block", "inside-l2-table", "inside-data"]
)
def test_check_repair_all_of_truncated_image_leaves_it_clean(base, tmp_path, cut):
    # qimg's addition (qemu-img's rebuild fails its overlap check where a
    # table lies past the end, and it keeps entries past the end): after
    # `check -r all` qemu-img finds the image clean, and reads the data it
    # read before (past the end of the file: zeros).
    path, lay = _copy(base, tmp_path)
    truncate(path, CUTS[cut](lay))
    probe = tmp_path / "before.raw"
    readable = run(["qemu-img", "convert", "-O", "raw", str(path), str(probe)], check=False)
    before = probe.read_bytes() if readable.returncode == 0 else None
    qimg("check", "-r", "all", path, check=False)
    after = run(["qemu-img", "check", str(path)], check=False)
    assert after.returncode == 0, after.stdout + after.stderr
    if before is not None:
        assert qemu_read_raw(path, tmp_path) == before


# --- tables far past the end of the file --------------------------------------------

FAR = 1 << 45

HEADER_DAMAGE = {
    # Tables far past the end (read as zeros).
    "l1-table-far": [(L.HEADER_OFF_L1_TABLE_OFFSET, FAR)],
    "l1-table-last-readable": [(L.HEADER_OFF_L1_TABLE_OFFSET, BDRV_MAX_LENGTH - CS)],
    "refcount-table-far": [(L.HEADER_OFF_REFCOUNT_TABLE_OFFSET, FAR)],
    "refcount-table-last-readable": [(L.HEADER_OFF_REFCOUNT_TABLE_OFFSET, BDRV_MAX_LENGTH - CS)],
    "snapshot-table-far": [(L.HEADER_OFF_SNAPSHOTS_OFFSET, FAR)],
    # Tables QEMU's block layer cannot read (EIO at open).
    "l1-table-unreadable": [(L.HEADER_OFF_L1_TABLE_OFFSET, BDRV_MAX_LENGTH)],
    "refcount-table-unreadable": [(L.HEADER_OFF_REFCOUNT_TABLE_OFFSET, BDRV_MAX_LENGTH)],
    "snapshot-table-unreadable": [(L.HEADER_OFF_SNAPSHOTS_OFFSET, BDRV_MAX_LENGTH)],
    # Header offsets naming other metadata.
    "l1-table-on-refcount-table": [(L.HEADER_OFF_L1_TABLE_OFFSET, "reftable")],
    "refcount-table-on-l1-table": [(L.HEADER_OFF_REFCOUNT_TABLE_OFFSET, "l1")],
    "refcount-table-on-l2-table": [(L.HEADER_OFF_REFCOUNT_TABLE_OFFSET, "l2")],
    "snapshot-table-on-l1-table": [(L.HEADER_OFF_SNAPSHOTS_OFFSET, "l1")],
}


def _damage_header(path: Path, lay: Layout, changes) -> None:
    where = {
        "reftable": lay.header.refcount_table_offset,
        "l1": lay.header.l1_table_offset,
        "l2": lay.l2_table(0),
        "data": lay.data_cluster(0) * CS,
    }
    for offset, value in changes:
        lay.set_header_u64(offset, where.get(value, value))
        if offset == L.HEADER_OFF_SNAPSHOTS_OFFSET:
            lay.set_header_u32(L.HEADER_OFF_NB_SNAPSHOTS, 3)


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_header_offsets_far_away_or_on_other_metadata_as_qemu_img(base, tmp_path, damage):
    # No internal error anywhere: each tool's decision (open, read as zeros,
    # or fail with EIO) and what it reports must be qemu-img's.
    path, lay = _copy(base, tmp_path)
    _damage_header(path, lay, HEADER_DAMAGE[damage])
    assert_all_as_qemu(path, tmp_path)


@pytest.mark.parametrize("table", ["l1", "l2"])
def test_check_with_refcount_table_on_another_table_fails_as_qemu_img(base, tmp_path, table):
    # The refcount blocks it names lie at 2^63 and more: "Can't get refcount
    # for cluster N: Input/output error", then "Check failed", exit 1.
    path, lay = _copy(base, tmp_path)
    _damage_header(path, lay, [(L.HEADER_OFF_REFCOUNT_TABLE_OFFSET, table)])
    assert_check_as_qemu(path)
    proc = qimg("check", path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.endswith("qimg: Check failed\n")
    assert "internal error" not in proc.stderr


@pytest.mark.parametrize("entry", [BDRV_MAX_LENGTH, (1 << 64) - CS])
def test_check_with_refcount_block_at_huge_offset_as_qemu_img(base, tmp_path, entry):
    path, lay = _copy(base, tmp_path)
    lay.set_reftable_entry(0, entry)
    assert_check_as_qemu(path)
    assert_check_as_qemu(path, "-r", "leaks")
    assert_convert_as_qemu(path, tmp_path)


@pytest.mark.parametrize("damage", ["table-on-data", "unaligned-entry"])
def test_check_reports_unaligned_refcount_block_as_qemu_img(base, tmp_path, damage):
    # QEMU signals the corruption once ("qcow2: Image is corrupt: Refblock
    # offset ... unaligned"), then cannot get the refcounts it covers.
    path, lay = _copy(base, tmp_path)
    if damage == "table-on-data":
        _damage_header(path, lay, [(L.HEADER_OFF_REFCOUNT_TABLE_OFFSET, "data")])
    else:
        lay.set_reftable_entry(0, lay.refblock(0) + 512)
    assert_check_as_qemu(path)


def test_check_of_refcount_table_of_zero_clusters_as_qemu_img(base, tmp_path):
    # info and convert refuse it; check opens it and finds every refcount missing.
    path, lay = _copy(base, tmp_path)
    lay.set_header_u32(L.HEADER_OFF_REFCOUNT_TABLE_CLUSTERS, 0)
    assert_all_as_qemu(path, tmp_path)
    assert qimg("check", path, check=False).returncode == 2


# --- snapshot tables that run past the end of the file --------------------------------


@pytest.fixture(scope="module")
def with_snapshot(base, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eof-snap") / "snap.qcow2"
    shutil.copy(base, path)
    run(["qemu-img", "snapshot", "-c", "s1", str(path)])
    return path


@pytest.mark.parametrize("cut", [False, True])
def test_snapshot_table_with_more_entries_than_the_file_holds_as_qemu_img(
    with_snapshot, tmp_path, cut
):
    # Entries past the first read what follows it, or (cut) zeros: empty
    # snapshots, listed by info and checked by check.
    path, lay = _copy(with_snapshot, tmp_path)
    if cut:
        truncate(path, lay.snapshot_entries()[0] + lay.snapshot_entry_size(0))
    lay.set_header_u32(L.HEADER_OFF_NB_SNAPSHOTS, 5)
    assert_all_as_qemu(path, tmp_path)
    assert_convert_as_qemu(path, tmp_path, "-l", "s1")


def test_snapshot_l1_table_far_past_the_end_reads_as_qemu_img(with_snapshot, tmp_path):
    path, lay = _copy(with_snapshot, tmp_path)
    lay.set_snapshot_field(0, "l1_table_offset", FAR)
    assert_all_as_qemu(path, tmp_path)
    assert_convert_as_qemu(path, tmp_path, "-l", "s1")


# --- bounded work on tables past the end -----------------------------------------------


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_largest_tables_past_the_end_are_read_in_bounded_memory(base, tmp_path):
    # QEMU bounds table sizes by constants (an L1 table of 32 MiB, a refcount
    # table of 8 MiB), not by the file's size: such tables far past the end
    # read as zeros, in memory those constants bound.
    path, lay = _copy(base, tmp_path)
    lay.set_header_u32(L.HEADER_OFF_L1_SIZE, L.QCOW_MAX_L1_SIZE // 8)
    lay.set_header_u64(L.HEADER_OFF_L1_TABLE_OFFSET, FAR)
    lay.set_header_u32(L.HEADER_OFF_REFCOUNT_TABLE_CLUSTERS, L.QCOW_MAX_REFTABLE_SIZE // CS)
    lay.set_header_u64(L.HEADER_OFF_REFCOUNT_TABLE_OFFSET, 2 * FAR)
    for args in (["info", str(path)], ["check", str(path)], ["convert", "-O", "raw", str(path)]):
        if args[0] == "convert":
            args.append(str(tmp_path / "ours.raw"))
        ours = subprocess.run(
            [sys.executable, "-m", "qimg", *args],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_limit,
        )
        if args[0] == "convert":
            args[-1] = str(tmp_path / "theirs.raw")
        theirs = run(["qemu-img", *args], check=False)
        assert _text(ours) == _text(theirs)
    assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "theirs.raw").read_bytes()


def test_snapshot_entry_with_too_much_extra_data_is_named_as_qemu_img_names_it(
    with_snapshot, tmp_path
):
    path, lay = _copy(with_snapshot, tmp_path)
    lay.set_snapshot_field(0, "extra_data_size", 5000)
    want = run(["qemu-img", "info", str(path)], check=False)
    got = qimg("info", path, check=False)
    assert got.returncode == want.returncode == 1
    # qemu-img adds a hint on a second line; qimg's error is its first line.
    assert _text(got)[2] == _text(want)[2].splitlines(keepends=True)[0]


@pytest.mark.parametrize("options", ["extended_l2=on", "cluster_size=4k,refcount_bits=1"])
def test_truncated_image_of_other_geometries_checks_as_qemu_img(tmp_path, options):
    path = tmp_path / "g.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path), "4M"])
    writes = ["write -P 0x11 0 128k", "write -c -P 0x22 1M 64k", "write -P 0x33 2M 64k"]
    run(["qemu-io", *(x for w in writes for x in ("-c", w)), str(path)])
    truncate(path, path.stat().st_size // 2)
    assert_info_as_qemu(path)
    assert_check_as_qemu(path)
    # One reader, so that qemu-img reports one failed request, as qimg does.
    assert_convert_as_qemu(path, tmp_path, "-m", "1")
