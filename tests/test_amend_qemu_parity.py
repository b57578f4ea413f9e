"""qimg amend against qemu-img 7.2: every compat and refcount_bits pair on
images with data, zeros, compressed clusters, snapshots and bitmaps (check
clean, data unchanged, `qemu-img info` shows the new settings), and the
same refusals as qemu-img."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import qemu_check_clean, qemu_read_raw, run
from infotools import message, qemu_in, qimg_here

WIDTHS = [1, 2, 4, 8, 16, 32, 64]


def _said(proc, prog: str) -> tuple[int, str]:
    return proc.returncode, message(proc.stderr, prog).replace(f"'{prog} --help'", "'PROG --help'")


def _info(path) -> dict:
    return json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)


def _make(tmp_path, options: str, snapshot: bool = True, bitmap: bool = False):
    """A qemu-img image with data, a zero cluster, a compressed cluster, a
    snapshot (shared clusters) and, after it, a changed cluster."""
    path = tmp_path / "a.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path), "4M"])
    cs = 65536
    if "cluster_size=" in options:
        cs = int(options.split("cluster_size=")[1].split(",")[0])
    io = ["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", f"write -c -P 2 2M {cs}"]
    if "compat=0.10" not in options:
        io += ["-c", "write -z 1M 64k", "-c", "write -P 5 3M 64k", "-c", "write -z 3M 64k"]
    run([*io, str(path)])
    if bitmap:
        run(["qemu-img", "bitmap", "--add", str(path), "bm"])
    if snapshot:
        run(["qemu-img", "snapshot", "-c", "s1", str(path)])
        run(
            [
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                "write -P 3 0 64k",
                "-c",
                "write -z 64k 64k",
                str(path),
            ]
        )
    return path


def _snapshot_raw(path, tmp_path) -> bytes:
    out = tmp_path / "snap.raw"
    run(["qemu-img", "convert", "-l", "s1", "-O", "raw", str(path), str(out)])
    return out.read_bytes()


def _every_pair(widths: list[int]) -> list[int]:
    """A walk through `widths` taking every ordered pair of two different
    widths once (an Euler circuit of the complete directed graph)."""
    todo = {w: [v for v in widths if v != w] for w in widths}
    stack, walk = [widths[0]], []
    while stack:
        w = stack[-1]
        if todo[w]:
            stack.append(todo[w].pop())
        else:
            walk.append(stack.pop())
    return walk[::-1]


@pytest.mark.parametrize(
    "widths,snapshot", [(WIDTHS, False), (WIDTHS[1:], True)], ids=["all-widths", "snapshot"]
)
def test_every_refcount_width_change_keeps_data_and_snapshots(qemu_img, tmp_path, widths, snapshot):
    walk = _every_pair(widths)
    assert len(walk) == len(widths) * (len(widths) - 1) + 1
    path = _make(tmp_path, f"refcount_bits={walk[0]}", snapshot=snapshot, bitmap=True)
    data = qemu_read_raw(path, tmp_path)
    snap = _snapshot_raw(path, tmp_path) if snapshot else None
    for new in walk[1:]:
        proc = qimg_here(tmp_path, "amend", "-o", f"refcount_bits={new}", "a.qcow2")
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), new
        qemu_check_clean(path)
        specific = _info(path)["format-specific"]["data"]
        assert specific["refcount-bits"] == new
        assert specific["bitmaps"][0]["name"] == "bm"
        assert qemu_read_raw(path, tmp_path) == data
    if snapshot:
        assert _snapshot_raw(path, tmp_path) == snap


def test_narrower_width_than_a_count_is_refused_as_qemu_img_does(qemu_img, tmp_path):
    path = _make(tmp_path, "refcount_bits=16")
    shutil.copy(path, tmp_path / "q.qcow2")
    proc = qimg_here(tmp_path, "amend", "-o", "refcount_bits=1", "a.qcow2")
    oracle = qemu_in(tmp_path, "qemu-img", "amend", "-o", "refcount_bits=1", "q.qcow2")
    assert _said(proc, "qimg") == _said(oracle, "qemu-img")
    assert _info(path)["format-specific"]["data"]["refcount-bits"] == 16


@pytest.mark.parametrize("cluster_size", [512, 65536, 2097152])
@pytest.mark.parametrize("backing", [False, True])
def test_compat_down_and_up_keep_the_data(qemu_img, tmp_path, cluster_size, backing):
    options = f"cluster_size={cluster_size}"
    if backing:
        base = tmp_path / "base.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"])
        run(["qemu-io", "-c", "write -P 9 0 4M", str(base)])
        options += f",backing_file={base},backing_fmt=qcow2"
    path = _make(tmp_path, options)
    data = qemu_read_raw(path, tmp_path)
    snap = _snapshot_raw(path, tmp_path)
    for compat in ("0.10", "1.1"):
        proc = qimg_here(tmp_path, "amend", "-o", f"compat={compat}", "a.qcow2")
        assert proc.returncode == 0, proc.stderr
        qemu_check_clean(path)
        assert _info(path)["format-specific"]["data"]["compat"] == compat
        assert qemu_read_raw(path, tmp_path) == data
        assert _snapshot_raw(path, tmp_path) == snap
        if compat == "0.10":  # no zero flag is left in any L2 table
            m = json.loads(run(["qemu-img", "map", "--output=json", str(path)]).stdout)
            assert not [e for e in m if e["zero"] and e["data"] and e["depth"] == 0 and
                        e["offset"] is None]  # fmt: skip


def test_downgrade_sets_oflag_copied_from_refcounts(qemu_img, tmp_path):
    """QEMU-NOTES: 7.2 can leave OFLAG_COPIED wrong for a cluster written,
    zeroed, then shared with a snapshot; qimg's result checks clean."""
    path = tmp_path / "a.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"])
    run(["qemu-io", "-c", "write -P 7 0 64k", "-c", "write -z 0 64k", str(path)])
    run(["qemu-img", "snapshot", "-c", "s1", str(path)])
    run(["qemu-io", "-c", "write -P 8 128k 64k", str(path)])  # the active L2 table is copied
    data = qemu_read_raw(path, tmp_path)
    assert qimg_here(tmp_path, "amend", "-o", "compat=0.10", "a.qcow2").returncode == 0
    qemu_check_clean(path)
    assert qemu_read_raw(path, tmp_path) == data


def test_lazy_refcounts_on_and_off(qemu_img, tmp_path):
    path = _make(tmp_path, "cluster_size=65536", snapshot=False)
    for value, shown in (("on", True), ("off", False)):
        assert (
            qimg_here(tmp_path, "amend", "-o", f"lazy_refcounts={value}", "a.qcow2").returncode == 0
        )
        assert _info(path)["format-specific"]["data"]["lazy-refcounts"] is shown
        qemu_check_clean(path)


def test_size_resizes_as_resize_does(qemu_img, tmp_path):
    path = _make(tmp_path, "cluster_size=65536", snapshot=False)
    data = qemu_read_raw(path, tmp_path)
    assert qimg_here(tmp_path, "amend", "-o", "size=8M", "a.qcow2").returncode == 0
    assert _info(path)["virtual-size"] == 8 << 20
    assert qimg_here(tmp_path, "amend", "-o", "size=2M", "a.qcow2").returncode == 0
    qemu_check_clean(path)
    assert qemu_read_raw(path, tmp_path) == data[: 2 << 20]


def test_data_file_name_and_raw_flag(qemu_img, tmp_path):
    for name in ("a.qcow2", "q.qcow2"):
        qemu_in(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o",
                f"data_file={name}.data,data_file_raw=on", name, "1M", check=True)  # fmt: skip
    for opts in ("data_file_raw=off", "data_file_raw=on", "data_file=other.data"):
        proc = qimg_here(tmp_path, "amend", "-o", opts, "a.qcow2")
        oracle = qemu_in(tmp_path, "qemu-img", "amend", "-o", opts, "q.qcow2")
        assert _said(proc, "qimg") == _said(oracle, "qemu-img")
    info = _info(tmp_path / "a.qcow2")["format-specific"]["data"]
    assert (info["data-file"], info["data-file-raw"]) == ("other.data", False)


def test_help_lists_the_amendable_options(qemu_img, tmp_path):
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M"])
    for args in (["-f", "qcow2", "-o", "help"], ["-o", "help", "a.qcow2"]):
        proc = qimg_here(tmp_path, "amend", *args)
        oracle = qemu_in(tmp_path, "qemu-img", "amend", *args)
        assert (proc.returncode, proc.stdout) == (oracle.returncode, oracle.stdout)


REFUSALS = [
    ["a.qcow2"],
    ["-o", "help"],
    ["-f", "raw", "-o", "help"],
    ["-o", "size=2M", "r.raw"],
    ["-f", "raw", "-o", "size=2M", "r.raw"],
    ["-o", "compat=0.9", "a.qcow2"],
    ["-o", "refcount_bits=3", "a.qcow2"],
    ["-o", "refcount_bits=128", "a.qcow2"],
    ["-o", "refcount_bits=x", "a.qcow2"],
    ["-o", "refcount_bits=8,compat=0.10", "a.qcow2"],
    ["-o", "lazy_refcounts=maybe", "a.qcow2"],
    ["-o", "lazy_refcounts=on,compat=0.10", "a.qcow2"],
    ["-o", "cluster_size=4096", "a.qcow2"],
    ["-o", "cluster_size=4096,compat=1.1", "a.qcow2"],
    ["-o", "foo=bar", "a.qcow2"],
    ["-o", "backing_file=x", "a.qcow2"],
    ["-o", "backing_fmt=raw", "a.qcow2"],
    ["-o", "data_file=x", "a.qcow2"],
    ["-o", "data_file_raw=on", "a.qcow2"],
    ["-o", "encrypt.new-secret=x", "a.qcow2"],
    ["-o", "size=1000", "a.qcow2"],
    ["-o", ",compat=1.1", "a.qcow2"],
    ["-o", "compat=0.10", "z.qcow2"],
    ["-o", "compat=0.10", "e.qcow2"],
    ["-o", "compat=0.10", "d.qcow2"],
    ["-o", "compat=0.10", "s.qcow2"],
    ["-o", "compat=0.10", "a.qcow2", "b.qcow2"],
    ["-o", "compat=0.10", "missing.qcow2"],
]


@pytest.fixture(scope="module")
def refusal_images(tmp_path_factory):
    """One set of images each refusal is tried on (copied per test)."""
    d = tmp_path_factory.mktemp("amend-refusals")
    q = ["qemu-img", "create", "-q", "-f", "qcow2"]
    run([*q, str(d / "a.qcow2"), "1M"])
    run(["qemu-img", "create", "-q", "-f", "raw", str(d / "r.raw"), "1M"])
    run([*q, "-o", "compression_type=zstd", str(d / "z.qcow2"), "1M"])
    run(["qemu-io", "-c", "write -c 0 64k", str(d / "z.qcow2")])
    run([*q, "-o", "extended_l2=on", str(d / "e.qcow2"), "1M"])
    qemu_in(d, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw",
            "d.qcow2", "1M", check=True)  # fmt: skip
    run([*q, str(d / "s.qcow2"), "1M"])
    run(["qemu-img", "snapshot", "-c", "s1", str(d / "s.qcow2")])
    run(["qemu-img", "resize", "-q", str(d / "s.qcow2"), "2M"])
    return d


@pytest.mark.parametrize("args", REFUSALS, ids=[" ".join(a) for a in REFUSALS])
def test_refusals_match_qemu_img(qemu_img, tmp_path, refusal_images, args):
    shutil.copytree(refusal_images, tmp_path / "q")
    shutil.copytree(refusal_images, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    oracle = qemu_in(tmp_path / "q", "qemu-img", "amend", *args)
    proc = qimg_here(tmp_path / "m", "amend", *args)
    assert _said(proc, "qimg") == _said(oracle, "qemu-img")
    assert proc.stdout == oracle.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


def test_zstd_image_without_compressed_clusters_downgrades(qemu_img, tmp_path):
    path = tmp_path / "a.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", str(path), "1M"])
    run(["qemu-io", "-c", "write -P 1 0 64k", str(path)])
    assert qimg_here(tmp_path, "amend", "-o", "compat=0.10", "a.qcow2").returncode == 0
    specific = _info(path)["format-specific"]["data"]
    assert (specific["compat"], specific["compression-type"]) == ("0.10", "zlib")
    qemu_check_clean(path)


def test_bitmaps_go_cleanly_with_a_downgrade(qemu_img, tmp_path):
    path = _make(tmp_path, "cluster_size=65536", bitmap=True)
    data = qemu_read_raw(path, tmp_path)
    proc = qimg_here(tmp_path, "amend", "-o", "compat=0.10", "a.qcow2")
    assert proc.returncode == 0, proc.stderr
    qemu_check_clean(path)  # qemu-img 7.2 leaks the bitmap clusters here
    assert qemu_read_raw(path, tmp_path) == data


def test_compat_and_width_change_together(qemu_img, tmp_path):
    """One amend changing both: the width first, the downgrade last (and
    the upgrade first, the width after), as qcow2_amend_options orders them."""
    path = _make(tmp_path, "refcount_bits=64", bitmap=True)
    data = qemu_read_raw(path, tmp_path)
    snap = _snapshot_raw(path, tmp_path)
    for opts, compat, bits in (("compat=0.10,refcount_bits=16", "0.10", 16),
                               ("refcount_bits=4,compat=1.1", "1.1", 4)):  # fmt: skip
        proc = qimg_here(tmp_path, "amend", "-o", opts, "a.qcow2")
        assert proc.returncode == 0, proc.stderr
        qemu_check_clean(path)
        specific = _info(path)["format-specific"]["data"]
        assert (specific["compat"], specific["refcount-bits"]) == (compat, bits)
        assert qemu_read_raw(path, tmp_path) == data
        assert _snapshot_raw(path, tmp_path) == snap


def _drop_snapshot_extra_data(path) -> None:
    """Rewrite the (one-entry) snapshot table as QEMU before 1.1 wrote it:
    no extra data (no disk size, no large VM state size)."""
    import struct

    from qimg.formats.qcow2 import layout as L

    with open(path, "r+b") as f:
        head = f.read(L.HEADER_V2_SIZE)
        offset = struct.unpack_from(">Q", head, 64)[0]
        f.seek(offset)
        raw = f.read(4096)
        fields = list(L.SNAPSHOT_HEADER.unpack_from(raw))
        id_len, name_len, extra = fields[2], fields[3], fields[8]
        start = L.SNAPSHOT_HEADER.size + extra
        names = raw[start : start + id_len + name_len]
        fields[8] = 0
        f.seek(offset)
        f.write(L.SNAPSHOT_HEADER.pack(*fields) + names + bytes(extra))


def test_upgrade_rewrites_a_snapshot_table_without_extra_data_as_qemu_img(qemu_img, tmp_path):
    # qemu-img 7.2's qcow2_upgrade writes the table in the version 3 form
    # first; the snapshot reads the same and the disk size is the image's.
    base = tmp_path / "base.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(base), "1M"])
    run(["qemu-io", "-c", "write -P 5 0 64k", str(base)])
    run([qemu_img, "snapshot", "-c", "old", str(base)])
    run(["qemu-io", "-c", "write -P 6 0 64k", str(base)])
    _drop_snapshot_extra_data(base)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copy(base, ours)
    shutil.copy(base, theirs)
    run([qemu_img, "amend", "-o", "compat=1.1", str(theirs)])
    assert qimg_here(tmp_path, "amend", "-o", "compat=1.1", str(ours)).returncode == 0
    qemu_check_clean(ours)
    info = [
        json.loads(run([qemu_img, "info", "--output=json", str(p)]).stdout) for p in (ours, theirs)
    ]
    assert info[0]["format-specific"]["data"]["compat"] == "1.1"
    for key in ("date-sec", "date-nsec"):
        for i in info:
            i["snapshots"][0].pop(key)
    assert info[0]["snapshots"] == info[1]["snapshots"]
    for p in (ours, theirs):
        run([qemu_img, "convert", "-l", "snapshot.name=old", "-O", "raw", str(p), f"{p}.raw"])
    assert (tmp_path / "ours.qcow2.raw").read_bytes() == (
        tmp_path / "theirs.qcow2.raw"
    ).read_bytes()
    assert (tmp_path / "ours.qcow2.raw").read_bytes()[:65536] == b"\x05" * 65536
