"""qimg check and repair of snapshot tables, extended L2 images and images
with an external data file, judged by the real qemu-img.

As in test_check.py: images made by qemu-img/qemu-io, damaged at offsets
computed from their own metadata (tests/damage.py); qimg's exit code, JSON
counts and messages must equal qemu-img check's; after `-r all`, qemu-img
must find qimg's copy clean (where its own repair does not, qimg does
better) and both copies must read back the same bytes, snapshots included.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))

from conftest import qemu_read_raw, qimg, run  # noqa: E402
from damage import Layout, read_u64, write_u64  # noqa: E402
from test_check import same_lines  # noqa: E402

COUNTS = ("corruptions", "leaks", "check-errors")


def _json(proc) -> dict:
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def _compare_check(path, *extra) -> None:
    """qimg check == qemu-img check: exit code, JSON, stderr line for line
    (prefix aside)."""
    want = run(["qemu-img", "check", "--output=json", *extra, str(path)], check=False)
    got = qimg("check", "--output=json", *extra, path, check=False)
    assert got.returncode == want.returncode, got.stderr[-2000:]
    strip = {"filename"}
    assert {k: v for k, v in _json(got).items() if k not in strip} == {
        k: v for k, v in _json(want).items() if k not in strip
    }
    same_lines(got.stderr, want.stderr)


def _repair_both(tmp_path, path):
    """(ours, theirs, theirs clean after its repair?) after `check -r all`."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(path, ours)
    shutil.copy(path, theirs)
    got = qimg("check", "--output=json", "-r", "all", ours, check=False)
    want = run(["qemu-img", "check", "--output=json", "-r", "all", str(theirs)], check=False)
    after = run(["qemu-img", "check", str(ours)], check=False)
    assert after.returncode == 0, after.stdout + after.stderr
    theirs_clean = run(["qemu-img", "check", str(theirs)], check=False).returncode == 0
    if theirs_clean:
        # Where qemu-img's repair succeeds, qimg's reports the same.
        for key in COUNTS + ("corruptions-fixed", "leaks-fixed"):
            assert _json(got).get(key, 0) == _json(want).get(key, 0), (key, got.stderr)
    return ours, theirs, theirs_clean


def _damage_check_repair(tmp_path, path, damage):
    """Damage `path`, compare both checks, repair copies with both tools:
    (bytes before damage, qimg's repaired bytes, qemu-img's copy, its
    copy clean?)."""
    before = qemu_read_raw(path, tmp_path, "qcow2")
    damage(Layout.read(path))
    _compare_check(path)
    ours, theirs, theirs_clean = _repair_both(tmp_path, path)
    return before, qemu_read_raw(ours, tmp_path, "qcow2"), theirs, theirs_clean


def _read(path, tmp_path, snapshot: str | None = None) -> bytes | None:
    out = tmp_path / "snap.raw"
    args = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    proc = run(args + [str(path), str(out)], check=False)
    if proc.returncode:
        return None
    data = out.read_bytes()
    out.unlink()
    return data


def _snapshot_names(path) -> list[str]:
    info = json.loads(run(["qemu-img", "info", "-U", "--output=json", str(path)]).stdout)
    return [s["name"] for s in info.get("snapshots", [])]


# --- snapshot tables ----------------------------------------------------------------


def make_snapshots(path, qemu_img, qemu_io, cs=65536):
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(path), "4M"])
    run([qemu_io, "-c", "write -P 1 0 128k", str(path)])
    run([qemu_img, "snapshot", "-c", "s1", str(path)])
    run([qemu_io, "-c", "write -P 2 0 64k", str(path)])
    run([qemu_img, "snapshot", "-c", "s2", str(path)])
    run([qemu_io, "-c", "write -P 3 64k 64k", "-c", "write -P 4 1M 4k", str(path)])


SNAPSHOT_DAMAGE = {
    "l1_unaligned": lambda lay: lay.set_snapshot_field(
        0, "l1_table_offset", lay.snapshot_l1_offsets()[0] + 512
    ),
    "l1_too_large": lambda lay: lay.set_snapshot_field(1, "l1_size", 0x4000000),
    "extra_too_large": lambda lay: lay.set_snapshot_field(0, "extra_data_size", 2000),
    "claims_too_many": lambda lay: lay.set_snapshot_table(lay.header.nb_snapshots + 2),
    "count_over_limit": lambda lay: lay.set_snapshot_table(70000),
    # Entries read past the real table, ending past the end of the file:
    # the repair must place new clusters where that phantom table "lies".
    "claims_past_eof": lambda lay: lay.set_snapshot_table(3000),
    "table_unaligned": lambda lay: lay.set_snapshot_table(2, lay.header.snapshots_offset + 8),
    "table_past_eof": lambda lay: lay.set_snapshot_table(2, lay.file_size * 4),
    # An aligned L1 table offset at the wrong place: one cluster on (into an
    # L2 table or data in use), or at the header.
    "l1_misplaced": lambda lay: lay.set_snapshot_field(
        0, "l1_table_offset", lay.snapshot_l1_offsets()[0] + lay.cluster_size
    ),
    "l1_on_header": lambda lay: lay.set_snapshot_field(1, "l1_table_offset", 0),
    # An L1 table running on over the snapshot table and past the end.
    "l1_overruns": lambda lay: lay.set_snapshot_field(1, "l1_size", 0x10000),
}

# With 512-byte clusters a refcount block covers few clusters (the repair
# must create some) and an offset moved by 512 bytes stays aligned.
SMALL_CLUSTER_CASES = [
    "l1_unaligned",
    "claims_past_eof",
    "l1_misplaced",
    "l1_on_header",
    "l1_overruns",
]


def _snapshot_image(tmp_path, qemu_img, qemu_io, cs):
    """A copy of the image make_snapshots builds, made once per worker."""
    cached = _SNAPSHOT_IMAGES.get(cs)
    if cached is None or not cached.exists():
        cached = tmp_path.parent / f"snapshots-{cs}.qcow2"
        make_snapshots(cached, qemu_img, qemu_io, cs)
        _SNAPSHOT_IMAGES[cs] = cached
    path = tmp_path / "s.qcow2"
    shutil.copy(cached, path)
    return path


_SNAPSHOT_IMAGES: dict = {}


@pytest.mark.parametrize(
    "name,cs",
    [(n, 65536) for n in SNAPSHOT_DAMAGE] + [(n, 512) for n in SMALL_CLUSTER_CASES],
)
def test_snapshot_table_damage_checked_and_repaired_like_qemu(
    tmp_path, qemu_img, qemu_io, name, cs
):
    path = _snapshot_image(tmp_path, qemu_img, qemu_io, cs)
    pristine = tmp_path / "pristine.qcow2"
    shutil.copy(path, pristine)
    SNAPSHOT_DAMAGE[name](Layout.read(path))
    # Damaged snapshots may name garbage L2 tables (data, the header, the
    # snapshot table): their many messages come in QEMU's walk order.
    _compare_check(path)
    if name == "table_unaligned":
        # Neither tool can find the table: the check fails, nothing is written.
        before = path.read_bytes()
        proc = qimg("check", "-r", "all", path, check=False)
        assert proc.returncode == 1 and path.read_bytes() == before
        return
    ours, theirs, theirs_clean = _repair_both(tmp_path, path)
    assert _read(ours, tmp_path) == _read(pristine, tmp_path)
    kept = _snapshot_names(ours)
    if theirs_clean:
        assert kept == _snapshot_names(theirs)
    # Snapshots that survive keep their data (garbage entries read from
    # past the table, nameless, are not read one by one).
    for snap in set(kept) & set(_snapshot_names(pristine)):
        assert _read(ours, tmp_path, snap) == _read(pristine, tmp_path, snap)


def test_repair_discards_only_the_unusable_snapshot(tmp_path, qemu_img, qemu_io):
    # qemu-img keeps a snapshot whose L1 table is unaligned (and the image
    # stays corrupt); qimg discards it and keeps the other.
    path = tmp_path / "s.qcow2"
    make_snapshots(path, qemu_img, qemu_io)
    SNAPSHOT_DAMAGE["l1_unaligned"](Layout.read(path))
    proc = qimg("check", "-r", "all", path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Repairing snapshot 1 (s1)" in proc.stderr
    assert _snapshot_names(path) == ["s2"]


# --- extended L2 entries ------------------------------------------------------------


def make_extended(path, qemu_img, qemu_io, cs=65536):
    opts = f"extended_l2=on,cluster_size={cs}"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, str(path), "4M"])
    cmds = ["write -P 1 0 4k", "write -P 2 64k 64k", "write -z 128k 8k", "write -c -P 3 192k 64k"]
    run([qemu_io, *sum((["-c", c] for c in cmds), []), str(path)])


def _ext_entry(lay, guest: int) -> int:
    """File offset of the extended L2 entry (16 bytes) mapping `guest`."""
    per = lay.cluster_size // 16
    return lay.l2_table(guest) + (guest // lay.cluster_size % per) * 16


def _or_bitmap(lay, guest: int, bits: int) -> None:
    where = _ext_entry(lay, guest) + 8
    write_u64(lay.path, where, read_u64(lay.path, where) | bits)


EXTENDED_DAMAGE = {
    # Subcluster 0 of an allocated cluster: both allocated and zero.
    "alloc_and_zero": lambda lay: _or_bitmap(lay, 0, 1 << 32),
    # Allocation bits on an unallocated cluster.
    "alloc_on_unallocated": lambda lay: _or_bitmap(lay, 1 << 20, 0x3),
    # Any bitmap bit on a compressed cluster.
    "bitmap_on_compressed": lambda lay: _or_bitmap(lay, 192 << 10, 0x1),
    # A data cluster moved off its alignment (its data is lost).
    "data_unaligned": lambda lay: write_u64(
        lay.path, _ext_entry(lay, 64 << 10), read_u64(lay.path, _ext_entry(lay, 64 << 10)) + 512
    ),
}


@pytest.mark.parametrize("name", list(EXTENDED_DAMAGE))
@pytest.mark.parametrize("cs", [65536, 16384])
def test_extended_l2_damage_checked_like_qemu_and_repaired(tmp_path, qemu_img, qemu_io, name, cs):
    path = tmp_path / "x.qcow2"
    make_extended(path, qemu_img, qemu_io, cs)
    before, mine, _theirs, _clean = _damage_check_repair(tmp_path, path, EXTENDED_DAMAGE[name])
    if name != "data_unaligned":
        assert mine == before  # every bitmap repair keeps the data
    else:
        differ = [i for i in range(0, len(before), cs) if before[i : i + cs] != mine[i : i + cs]]
        assert differ == [64 << 10] and mine[64 << 10 : (64 << 10) + cs] == bytes(cs)


# --- external data files ------------------------------------------------------------


def make_data_file(path, qemu_img, qemu_io, raw=False):
    opts = f"data_file={path}.data" + (",data_file_raw=on" if raw else "")
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, str(path), "4M"])
    run([qemu_io, "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k", str(path)])


def _leak(lay):
    with open(lay.path, "ab") as f:
        f.write(bytes(-lay.file_size % lay.cluster_size + lay.cluster_size))
    lay = Layout.read(lay.path)
    lay.set_refcount(lay.file_size // lay.cluster_size - 1, 1)


DATA_FILE_DAMAGE = {
    "clean": lambda lay: None,
    "leak": _leak,
    "copied_missing": lambda lay: lay.set_l2_entry(0, lay.l2_entry(0) & ~(1 << 63)),
    "compressed_entry": lambda lay: lay.set_l2_entry(
        0, (1 << 62) | (lay.l2_entry(0) & ((1 << 62) - 1))
    ),
}


@pytest.mark.parametrize("name", list(DATA_FILE_DAMAGE))
@pytest.mark.parametrize("raw", [False, True])
def test_data_file_images_checked_like_qemu_and_repaired(tmp_path, qemu_img, qemu_io, name, raw):
    # Data clusters live in the data file: they are neither refcounted nor
    # bounded by the qcow2 file's end, and a repair must never drop them.
    path = tmp_path / "d.qcow2"
    make_data_file(path, qemu_img, qemu_io, raw)
    before, mine, theirs, theirs_clean = _damage_check_repair(
        tmp_path, path, DATA_FILE_DAMAGE[name]
    )
    if name == "compressed_entry":
        # The entry cannot be read by anyone: its cluster now reads as zeros.
        assert mine[:65536] == bytes(65536) and mine[65536:] == before[65536:]
    else:
        # (Clearing COPIED on the entry of data-file offset 0 makes it
        # unallocated for QEMU too: compare with qemu-img's repaired copy.)
        assert theirs_clean and mine == qemu_read_raw(theirs, tmp_path, "qcow2")
        if name != "copied_missing":
            assert mine == before
