"""qimg convert, judged by qemu-img: `qemu-img compare` of source and target
exits 0 and `qemu-img check` finds a qcow2 target clean."""

from __future__ import annotations

import glob
import os

import pytest

from tests.conftest import host_data, qemu_check_clean, qemu_json, qemu_read_raw, qimg, run

MiB = 1 << 20


def qemu_io(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(args + [str(path)])


def compare(a, b, fmt_a=None, fmt_b=None):
    args = ["qemu-img", "compare"]
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    proc = run(args + [str(a), str(b)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def make_qcow2(path, size="8M", opts=None, writes=(), backing=None):
    args = ["qemu-img", "create", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", str(backing), "-F", "qcow2" if str(backing).endswith("qcow2") else "raw"]
    run(args + [str(path), size] if size else args + [str(path)])
    if writes:
        qemu_io(path, *writes)
    return path


MIXED_WRITES = (
    "write -P 0x11 0 64k",
    "write -P 0x22 100k 3000",  # unaligned
    "write -z 1M 256k",
    "write -P 0x33 2M 1M",
    "write -P 0 4M 64k",  # data that is zeros
    "write -P 0x44 8388096 512",  # the last sector
)


def mixed_raw(path, size=8 * MiB):
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(b"A" * 70000)
        f.seek(3 * MiB + 123)
        f.write(os.urandom(200000))
        f.seek(size - 4096)
        f.write(b"end!" * 1024)
    return path


# --- every direction --------------------------------------------------------------


@pytest.mark.parametrize("cluster_size", ["512", "4k", "64k", "2M"])
def test_convert_qcow2_to_qcow2_keeps_data_for_each_cluster_size(tmp_path, qemu_img, cluster_size):
    src = make_qcow2(
        tmp_path / "src.qcow2", opts=f"cluster_size={cluster_size}", writes=MIXED_WRITES
    )
    out = tmp_path / "out.qcow2"
    qimg("convert", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", src, out)
    compare(src, out)
    qemu_check_clean(out)
    expected = {"512": 512, "4k": 4096, "64k": 65536, "2M": 2 << 20}[cluster_size]
    assert qemu_json("info", "--output=json", out)["cluster-size"] == expected


def test_convert_raw_to_qcow2_and_back_round_trips(tmp_path, qemu_img):
    src = mixed_raw(tmp_path / "src.raw")
    q = tmp_path / "out.qcow2"
    back = tmp_path / "back.raw"
    qimg("convert", "-f", "raw", "-O", "qcow2", src, q)
    compare(src, q, "raw", "qcow2")
    qemu_check_clean(q)
    qimg("convert", "-O", "raw", q, back)
    assert back.read_bytes() == src.read_bytes()


def test_convert_raw_target_is_sparse_where_source_is_zero(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "64M", writes=("write -P 1 0 1M", "write -P 0 8M 8M"))
    out = tmp_path / "out.raw"
    qimg("convert", "-O", "raw", src, out)
    compare(src, out, "qcow2", "raw")
    assert os.stat(out).st_blocks * 512 < 4 * MiB


def test_convert_qcow2_target_allocates_no_zero_clusters(tmp_path, qemu_img):
    src = mixed_raw(tmp_path / "src.raw", 32 * MiB)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qimg("convert", "-f", "raw", "-O", "qcow2", src, ours)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src), str(theirs)])
    compare(ours, theirs)
    assert os.path.getsize(ours) <= os.path.getsize(theirs) + 64 * 1024


def test_convert_sparse_size_zero_allocates_everything(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "4M", writes=("write -P 7 0 64k",))
    out = tmp_path / "out.qcow2"
    qimg("convert", "-S", "0", "-O", "qcow2", src, out)
    compare(src, out)
    qemu_check_clean(out)
    extents = qemu_json("map", "--output=json", out)
    assert all(e["data"] for e in extents)
    raw = tmp_path / "out.raw"
    qimg("convert", "-S", "0", "-O", "raw", src, raw)
    assert os.stat(raw).st_blocks * 512 >= 4 * MiB


ALLOCATION_CASES = [
    ["-O", "raw"],
    ["-O", "qcow2"],
    ["-O", "raw", "-S", "1M"],
    ["-O", "raw", "-S", "12k"],
    ["-O", "raw", "-S", "1536"],
    ["-O", "raw", "-S", "96k"],
    ["-O", "qcow2", "-S", "1M"],
    ["-O", "qcow2", "-S", "96k"],
    ["-O", "qcow2", "-o", "cluster_size=4k", "-S", "12k"],
    ["-O", "qcow2", "-o", "preallocation=metadata"],
    ["-O", "qcow2", "-o", "extended_l2=on"],
    ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "-S", "8k"],
]


# Whole clusters, with zero clusters and zero gaps in the data.
DENSE_WRITES = (
    "write -P 0x11 0 64k",
    "write -P 0 64k 64k",  # a data cluster of zeros
    "write -P 0x22 128k 64k",
    "write -P 0 192k 128k",
    "write -P 0x33 320k 64k",
    "write -z 1M 256k",
    "write -P 0x44 2M 1M",
    "write -c -P 5 5M 64k",
    "write -P 0x55 8323072 64k",  # the last cluster
)


@pytest.mark.parametrize("holes", [False, True], ids=["dense", "host-holes"])
@pytest.mark.parametrize("args", ALLOCATION_CASES, ids=lambda a: " ".join(a))
def test_convert_allocates_what_qemu_img_allocates(tmp_path, qemu_img, args, holes):
    """-S is qemu-img's: zero runs after data shorter than -S are written,
    data runs are not widened past what the source holds; targets that
    allocate below a cluster (preallocated, extended L2) get the same
    finer map. Holes in the host file under data clusters read as zeros
    without being read, as in qemu-img's block status."""
    src = make_qcow2(tmp_path / "src.qcow2", writes=DENSE_WRITES)
    if holes:
        # Holes inside the data at guest 2M..3M and in the first cluster.
        host = next(
            e["offset"] for e in qemu_json("map", "--output=json", src) if e["start"] == 2 * MiB
        )
        with open(src, "r+b") as f:
            for off, n in (
                (host + 4096, 8192),
                (host + 300 * 1024, 200 * 1024),
                (0x50000 + 8192, 4096),
            ):
                punch_hole(f.fileno(), off, n)
    fmt = args[1]
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    run(["qemu-img", "convert", *args, str(src), str(theirs)])
    qimg("convert", *args, src, ours)
    compare(src, ours, fmt_b=fmt)
    if fmt == "qcow2":
        qemu_check_clean(ours)

    def extents(path):
        return [
            (e["start"], e["length"], e["data"], e["zero"])
            for e in qemu_json("map", "--output=json", "-f", fmt, path)
        ]

    assert extents(ours) == extents(theirs)
    # ...and the host files hold data in the same places (a subcluster
    # the write does not touch stays a hole). Not compared: a qcow2 target
    # that allocates whole clusters, from a source with holes inside them;
    # qemu-img writes around the hole and leaves it in the new cluster,
    # qimg writes the whole cluster (same data, same map, a few KiB more
    # on disk).
    whole_clusters = fmt == "qcow2" and not any("=" in a for a in args)
    if not (holes and whole_clusters):
        assert host_data(ours) == host_data(theirs)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): the range reads as zeros."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    assert libc.fallocate(fd, 0x02 | 0x01, offset, length) == 0, os.strerror(ctypes.get_errno())


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert_copy_offload_copies_zero_data_as_qemu_img_does(tmp_path, qemu_img, fmt):
    """-C copies data as it is: a zero block inside data is allocated, holes are not."""
    src = mixed_raw(tmp_path / "src.raw", 8 * MiB)
    with open(src, "r+b") as f:
        f.seek(5 * MiB)
        f.write(bytes(MiB))  # data that reads as zeros
    ours, theirs = tmp_path / f"ours.{fmt}", tmp_path / f"theirs.{fmt}"
    qimg("convert", "-C", "-f", "raw", "-O", fmt, src, ours)
    run(["qemu-img", "convert", "-C", "-f", "raw", "-O", fmt, str(src), str(theirs)])
    compare(ours, theirs, fmt, fmt)
    assert qemu_json("map", "--output=json", "-f", fmt, ours) == qemu_json(
        "map", "--output=json", "-f", fmt, theirs
    )


def test_rate_limit_waits_while_writes_run_ahead_of_the_rate(monkeypatch):
    """-r: after each write, the writer sleeps while the bytes written are
    more than one 100 ms slice ahead of the rate (a fake clock: no timing)."""
    import qimg.convert.writer as engine

    clock = [100.0]
    sleeps: list[float] = []

    def sleep(seconds):
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(engine.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(engine.time, "sleep", sleep)
    limit = engine.RateLimit(MiB)  # 1 MiB a second
    limit.account(64 << 10)  # 1/16 s of data: within the slice, no wait
    assert sleeps == []
    limit.account(MiB)  # now ~1.06 s ahead at t=0: wait all but the slice
    assert sleeps == [pytest.approx(1 + 1 / 16 - 0.1)]
    clock[0] += 10  # ten idle seconds: the average is far below the rate, no wait
    limit.account(MiB)
    assert len(sleeps) == 1
    engine.RateLimit(0).account(1 << 40)  # no limit: never waits
    assert len(sleeps) == 1


def test_convert_with_rate_limit_copies_the_same_data(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "4M", writes=("write -P 5 0 256k",))
    for args, fmt in ((["-O", "raw"], "raw"), (["-c", "-O", "qcow2"], "qcow2")):
        out = tmp_path / f"out.{fmt}"
        qimg("convert", "-r", "16M", *args, src, out)
        compare(src, out, "qcow2", fmt)


# --- sources with every kind of cluster -------------------------------------------------


def test_convert_reads_compressed_zero_and_subcluster_sources(tmp_path, qemu_img):
    src = make_qcow2(
        tmp_path / "src.qcow2",
        opts="cluster_size=64k,extended_l2=on",
        writes=(
            "write -c -P 0x55 0 64k",
            "write -P 0x66 64k 64k",
            "write -P 0x77 132k 2k",  # one subcluster
            "write -z 256k 128k",
            "write -P 0x88 1M 5000",
        ),
    )
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"out.{fmt}"
        qimg("convert", "-O", fmt, src, out)
        compare(src, out, "qcow2", fmt)
        if fmt == "qcow2":
            qemu_check_clean(out)


def test_convert_flattens_a_backing_chain(tmp_path, qemu_img):
    base = make_qcow2(tmp_path / "base.qcow2", writes=("write -P 1 0 4M",))
    mid = make_qcow2(tmp_path / "mid.qcow2", None, backing=base, writes=("write -P 2 1M 1M",))
    top = make_qcow2(
        tmp_path / "top.qcow2", None, backing=mid, writes=("write -z 1536k 64k", "write -P 3 3M 4k")
    )
    out = tmp_path / "flat.qcow2"
    qimg("convert", "-O", "qcow2", top, out)
    compare(top, out)
    qemu_check_clean(out)
    assert "backing-filename" not in qemu_json("info", "--output=json", out)


# --- compression --------------------------------------------------------------------


def _real_data(path, size=4 * MiB):
    """A raw image of real files: shared libraries and text from /usr/lib."""
    out = bytearray()
    for pattern in ("/usr/lib/x86_64-linux-gnu/*.so*", "/usr/lib/python3*/*.py"):
        for name in sorted(glob.glob(pattern)):
            if len(out) >= size:
                break
            try:
                if os.path.isfile(name):
                    out += open(name, "rb").read(512 * 1024)
            except OSError:
                pass
    if len(out) < size:
        out += os.urandom(1024) * ((size - len(out)) // 2048)
    data = bytes(out[:size]).ljust(size, b"\0")
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_convert_compressed_matches_qemu_size_within_one_percent(tmp_path, qemu_img, ctype):
    src = _real_data(tmp_path / "src.raw")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    o = f"compression_type={ctype}"
    qimg("convert", "-f", "raw", "-c", "-O", "qcow2", "-o", o, src, ours)
    run(["qemu-img", "convert", "-f", "raw", "-c", "-O", "qcow2", "-o", o, str(src), str(theirs)])
    compare(src, ours, "raw", "qcow2")
    qemu_check_clean(ours)
    info = qemu_json("info", "--output=json", ours)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    assert os.path.getsize(ours) <= os.path.getsize(theirs) * 1.01


@pytest.mark.parametrize("level", ["fast", "best"])
def test_convert_compression_levels_give_images_qemu_reads(tmp_path, qemu_img, level):
    src = _real_data(tmp_path / "src.raw", 2 * MiB)
    out = tmp_path / "out.qcow2"
    qimg("convert", "-f", "raw", "-c", "--compression-level", level, "-O", "qcow2", src, out)
    compare(src, out, "raw", "qcow2")
    qemu_check_clean(out)


def test_convert_compressed_with_small_clusters_and_unaligned_size(tmp_path, qemu_img):
    src = tmp_path / "src.raw"
    src.write_bytes((b"hello world " * 50000)[: 600 * 1024 - 512])
    out = tmp_path / "out.qcow2"
    qimg("convert", "-f", "raw", "-c", "-O", "qcow2", "-o", "cluster_size=4k", src, out)
    compare(src, out, "raw", "qcow2")
    qemu_check_clean(out)


def test_convert_library_takes_compression_level_and_progress(tmp_path, qemu_img):
    from qimg.convert import convert

    src = _real_data(tmp_path / "src.raw", 1 * MiB)
    out = tmp_path / "out.qcow2"
    seen = []
    convert(
        [str(src)],
        str(out),
        source_format="raw",
        target_format="qcow2",
        compress=True,
        compression_level="fast",
        progress=lambda done, total: seen.append((done, total)),
    )
    compare(src, out, "raw", "qcow2")
    assert seen[-1] == (MiB, MiB)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


# --- options ---------------------------------------------------------------------


def test_convert_with_backing_writes_only_what_differs(tmp_path, qemu_img):
    base = make_qcow2(tmp_path / "base.qcow2", writes=("write -P 1 0 8M",))
    top = make_qcow2(
        tmp_path / "top.qcow2", None, backing=base, writes=("write -P 2 1M 64k", "write -z 2M 64k")
    )
    out = tmp_path / "out.qcow2"
    qimg("convert", "-O", "qcow2", "-B", base.name, "-F", "qcow2", top, out)
    compare(top, out)
    qemu_check_clean(out)
    info = qemu_json("info", "--output=json", out)
    assert info["backing-filename"] == base.name
    assert info["actual-size"] < 2 * MiB


def test_convert_with_backing_compares_against_another_base(tmp_path, qemu_img):
    """-B naming a file with the same data as parts of the source: only the
    clusters that differ from it are written."""
    src = mixed_raw(tmp_path / "src.raw")
    base = tmp_path / "base.raw"
    base.write_bytes(src.read_bytes()[: 4 * MiB] + bytes(4 * MiB))
    out = tmp_path / "out.qcow2"
    qimg("convert", "-f", "raw", "-O", "qcow2", "-B", str(base), "-F", "raw", src, out)
    compare(src, out, "raw", "qcow2")
    qemu_check_clean(out)
    extents = qemu_json("map", "--output=json", out)
    own = sum(e["length"] for e in extents if e["depth"] == 0 and e["data"])
    assert own <= 512 * 1024


def test_convert_into_existing_target_overwrites_everything(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", writes=MIXED_WRITES)
    for fmt in ("qcow2", "raw"):
        out = tmp_path / f"out.{fmt}"
        run(["qemu-img", "create", "-f", fmt, str(out), "8M"])
        qemu_io(out, "write -P 0xaa 0 8M", fmt=fmt)
        qimg("convert", "-n", "-O", fmt, src, out)
        compare(src, out, "qcow2", fmt)
        if fmt == "qcow2":
            qemu_check_clean(out)


def convert_onto_prefilled(tmp_path, fmt: str, writes: tuple[str, ...], args: list[str]):
    """Each tool converts a qcow2 source made of `writes` onto an 8M target
    full of 0xaa (`-n`); returns what (qemu-img, qimg) left in the targets."""
    src = make_qcow2(tmp_path / "src.qcow2", writes=writes)
    outs = {}
    for tool in ("qemu-img", "qimg"):
        outs[tool] = tmp_path / f"{tool}.{fmt}"
        run(["qemu-img", "create", "-q", "-f", fmt, str(outs[tool]), "8M"])
        qemu_io(outs[tool], "write -P 0xaa 0 8M", fmt=fmt)
    args = ["convert", "-n", *args, "-O", fmt, str(src)]
    run(["qemu-img", *args, str(outs["qemu-img"])])
    qimg(*args, outs["qimg"])
    if fmt == "qcow2":
        qemu_check_clean(outs["qimg"])
    return tuple(qemu_read_raw(outs[tool], tmp_path, fmt) for tool in ("qemu-img", "qimg"))


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert_target_is_zero_skips_zeroing(tmp_path, qemu_img, fmt):
    # The target is not zero: what the flag makes convert skip (unallocated,
    # zeroed and all-zero source clusters) keeps the target's 0xaa.
    writes = ("write -P 3 0 64k", "write -z 1M 64k", "write -P 0 2M 64k")
    theirs, ours = convert_onto_prefilled(tmp_path, fmt, writes, ["--target-is-zero"])
    assert ours == theirs
    assert ours[:65536] == b"\x03" * 65536
    assert ours[MiB : MiB + 65536] == b"\xaa" * 65536  # not zeroed: the flag was taken
    # Without the flag both tools zero the target where the source reads zeros.
    theirs, ours = convert_onto_prefilled(tmp_path, fmt, writes, [])
    assert ours == theirs and ours[MiB : MiB + 65536] == bytes(65536)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert_target_is_zero_skips_zero_runs_inside_a_cluster(tmp_path, qemu_img, fmt):
    # A cluster with 512 bytes of data: qemu-img writes the first 4k (-S 4k)
    # and leaves the rest of the target's cluster as it was.
    theirs, ours = convert_onto_prefilled(
        tmp_path, fmt, ("write -P 4 3M 512",), ["--target-is-zero"]
    )
    assert theirs[3 * MiB + 4096 : 3 * MiB + 65536] == b"\xaa" * 61440
    assert ours == theirs


@pytest.mark.parametrize(
    "fmt,mode",
    [
        ("qcow2", "off"),
        ("qcow2", "metadata"),
        ("qcow2", "falloc"),
        ("qcow2", "full"),
        ("raw", "falloc"),
        ("raw", "full"),
    ],
)
def test_convert_preallocation_modes(tmp_path, qemu_img, fmt, mode):
    # Judged against qemu-img's target: the same file size, the same clusters
    # preallocated (map), the same space taken on the host (within 64 KiB).
    src = make_qcow2(tmp_path / "src.qcow2", "4M", writes=("write -P 9 64k 1M",))
    out, theirs = tmp_path / f"out.{fmt}", tmp_path / f"theirs.{fmt}"
    qimg("convert", "-O", fmt, "-o", f"preallocation={mode}", src, out)
    run(["qemu-img", "convert", "-O", fmt, "-o", f"preallocation={mode}", str(src), str(theirs)])
    compare(src, out, "qcow2", fmt)
    assert os.stat(out).st_size == os.stat(theirs).st_size
    assert abs(os.stat(out).st_blocks - os.stat(theirs).st_blocks) * 512 <= 64 * 1024
    if fmt == "qcow2":
        qemu_check_clean(out)
        mapped = [qemu_json("map", "--output=json", path) for path in (out, theirs)]
        assert mapped[0] == mapped[1]


def test_convert_concatenates_several_sources(tmp_path, qemu_img):
    a = mixed_raw(tmp_path / "a.raw", 1 * MiB)
    b = make_qcow2(tmp_path / "b.qcow2", "3M", writes=("write -P 5 1M 100k",))
    c = tmp_path / "c.raw"
    c.write_bytes(b"odd size" * 1000)  # not a multiple of 512
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qimg("convert", "-O", "qcow2", a, b, c, ours)
    run(["qemu-img", "convert", "-O", "qcow2", str(a), str(b), str(c), str(theirs)])
    compare(ours, theirs)
    qemu_check_clean(ours)
    assert (
        qemu_json("info", "--output=json", ours)["virtual-size"]
        == qemu_json("info", "--output=json", theirs)["virtual-size"]
    )


@pytest.mark.parametrize("how", ["-l name", "-l id", "-s"])
def test_convert_reads_an_internal_snapshot(tmp_path, qemu_img, how):
    src = make_qcow2(tmp_path / "src.qcow2", writes=("write -P 1 0 2M",))
    run(["qemu-img", "snapshot", "-c", "snap1", str(src)])
    qemu_io(src, "write -P 2 1M 2M", "write -z 0 64k")
    expected = tmp_path / "expected.raw"
    run(["qemu-img", "convert", "-l", "snapshot.name=snap1", "-O", "raw", str(src), str(expected)])
    args = {
        "-l name": ["-l", "snapshot.name=snap1"],
        "-l id": ["-l", "snapshot.id=1"],
        "-s": ["-s", "snap1"],
    }[how]
    out = tmp_path / "out.qcow2"
    qimg("convert", *args, "-O", "qcow2", src, out)
    compare(expected, out, "raw", "qcow2")
    qemu_check_clean(out)


def test_convert_missing_snapshot_fails_like_qemu(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "1M")
    out = tmp_path / "out.raw"
    proc = qimg("convert", "-l", "snapshot.name=nope", "-O", "raw", src, out, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "qimg: Failed to load snapshot: Can't find snapshot"
    assert not out.exists()


def test_convert_progress_prints_qemu_lines_when_not_a_tty(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "4M", writes=("write -P 1 0 1M",))
    proc = qimg("convert", "-p", "-O", "raw", src, tmp_path / "out.raw")
    theirs = run(["qemu-img", "convert", "-p", "-O", "raw", str(src), str(tmp_path / "q.raw")])
    # (run() reads text: qemu-img's "\r" line ends arrive as "\n")
    lines = proc.stdout.splitlines()
    assert lines[0] == theirs.stdout.splitlines()[0] == "    (0.00/100%)"
    assert lines[-1] == theirs.stdout.splitlines()[-1] == "    (100.00/100%)"
    assert proc.stdout.endswith("\n")
    quiet = qimg("convert", "-p", "-q", "-O", "raw", src, tmp_path / "out2.raw")
    assert quiet.stdout == "" and quiet.stderr == ""


# --- errors, as qemu-img words them ------------------------------------------------------


BAD_COMBINATIONS = [
    ["--target-is-zero", "-O", "raw"],
    ["-c", "-O", "raw"],
    ["-B", "SRC", "-O", "raw"],
    ["-S", "513", "-O", "raw"],
    ["-m", "0", "-O", "raw"],
    ["-m", "17", "-O", "raw"],
    ["-t", "foo", "-O", "raw"],
    ["-O", "foo"],
    ["--skip-broken-bitmaps", "-O", "raw"],
    ["--bitmaps", "-O", "raw"],
    ["-O", "qcow2", "-o", "foo=1"],
    ["-c", "-O", "qcow2", "-o", "preallocation=full"],
    ["-C", "-c", "-O", "qcow2"],
    ["-C", "-S", "4k", "-O", "raw"],
    ["-C", "-S", "0", "-O", "raw"],
    ["-C", "--salvage", "-O", "raw"],
    ["-C", "-c", "-S", "4k", "--salvage", "-O", "qcow2"],
    ["-r", "abc", "-O", "raw"],
    ["-r", "-5", "-O", "raw"],
    ["-B", "SRC", "-O", "qcow2"],
    ["-O", "qcow2", "-o", "backing_file=base.qcow2"],
    ["-c", "-B", "SRC", "-O", "qcow2", "-o", "preallocation=full"],
    ["-c", "-B", "SRC", "-O", "raw"],
]


@pytest.mark.parametrize("args", BAD_COMBINATIONS, ids=lambda a: " ".join(a))
def test_convert_rejects_bad_combinations_like_qemu(tmp_path, qemu_img, args):
    src = make_qcow2(tmp_path / "src.qcow2", "1M")
    args = [str(src) if a == "SRC" else a for a in args]
    theirs = run(["qemu-img", "convert", *args, str(src), str(tmp_path / "t1")], check=False)
    ours = qimg("convert", *args, src, tmp_path / "t2", check=False)
    assert theirs.returncode != 0
    assert ours.returncode == theirs.returncode
    # qemu-img splits one message over two lines; qimg keeps errors on one.
    theirs_text = theirs.stderr.replace(" for\nqemu-img: ", " for ")
    assert (
        ours.stderr.replace("qimg:", "qemu-img:").replace(
            str(tmp_path / "t2"), str(tmp_path / "t1")
        )
        == theirs_text
    )
    assert not (tmp_path / "t2").exists()


def test_convert_with_one_file_asks_for_a_target_like_qemu(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "1M")
    theirs = run(["qemu-img", "convert", str(src)], check=False)
    ours = qimg("convert", src, check=False)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("qimg:", "qemu-img:") == theirs.stderr


def test_convert_unopenable_backing_fails_like_qemu_and_leaves_no_target(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "1M")
    args = ["-O", "qcow2", "-B", "missing.qcow2", "-F", "qcow2", str(src)]
    theirs = run(["qemu-img", "convert", *args, str(tmp_path / "t1")], check=False)
    ours = qimg("convert", *args, tmp_path / "t2", check=False)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("qimg:", "qemu-img:").replace("t2", "t1") == theirs.stderr
    assert "Could not open backing file" in ours.stderr
    assert not (tmp_path / "t2").exists()  # qemu-img leaves its new target behind


def test_convert_sizes_the_target_after_its_sources_whatever_o_size_says(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "8M", writes=("write -P 7 7M 64k",))
    for fmt in ("qcow2", "raw"):
        ours, theirs = tmp_path / f"ours.{fmt}", tmp_path / f"theirs.{fmt}"
        run(["qemu-img", "convert", "-O", fmt, "-o", "size=4M", str(src), str(theirs)])
        qimg("convert", "-O", fmt, "-o", "size=4M", src, ours)
        for image in (ours, theirs):
            info = qemu_json("info", "--output=json", "-f", fmt, image)
            assert info["virtual-size"] == 8 * MiB
        compare(src, ours, fmt_b=fmt)


def test_convert_into_missing_existing_target_fails_like_qemu(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "1M")
    theirs = run(["qemu-img", "convert", "-n", str(src), str(tmp_path / "t1")], check=False)
    ours = qimg("convert", "-n", src, tmp_path / "t2", check=False)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("qimg:", "qemu-img:").replace("t2", "t1") == theirs.stderr


def test_convert_of_a_huge_sparse_image_plans_in_growing_windows(tmp_path, qemu_img):
    """16 PiB with one cluster of data: the plan asks for ever larger
    windows across the empty stretches (one call per GiB would take
    hours), and the copy holds exactly the data."""
    src = make_qcow2(tmp_path / "src.qcow2", "16P", opts="cluster_size=2M")
    qemu_io(src, "write -P 7 15P 1M")
    out = tmp_path / "out.qcow2"
    qimg("convert", "-O", "qcow2", "-o", "cluster_size=2M", src, out, timeout=60)
    qemu_check_clean(out)
    assert qemu_json("info", "--output=json", out)["virtual-size"] == 16 << 50
    qemu_io(out, "read -P 7 15P 1M", "read -P 0 16895M 1M", "read -P 0 0 2M")
    assert os.path.getsize(out) < 16 * MiB


def test_convert_to_a_raw_file_too_large_fails_like_qemu_and_leaves_nothing(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "16P", opts="cluster_size=2M")
    theirs = run(["qemu-img", "convert", "-O", "raw", str(src), str(tmp_path / "t1")], check=False)
    ours = qimg("convert", "-O", "raw", src, tmp_path / "t2", check=False)
    if theirs.returncode == 0:
        pytest.skip("this file system takes a 16 PiB file")
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("qimg:", "qemu-img:").replace("t2", "t1") == theirs.stderr
    assert not (tmp_path / "t2").exists()  # qemu-img leaves an empty file


def test_create_of_a_raw_file_too_large_fails_like_qemu(tmp_path, qemu_img):
    theirs = run(["qemu-img", "create", "-f", "raw", str(tmp_path / "t1"), "16P"], check=False)
    ours = qimg("create", "-f", "raw", tmp_path / "t2", "16P", check=False)
    if theirs.returncode == 0:
        pytest.skip("this file system takes a 16 PiB file")
    assert ours.returncode == theirs.returncode == 1
    assert ours.stderr.replace("qimg:", "qemu-img:").replace("t2", "t1") == theirs.stderr
    assert not (tmp_path / "t2").exists()


def test_convert_missing_target_directory_fails_cleanly(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "1M")
    target = tmp_path / "nope" / "out.qcow2"
    proc = qimg("convert", "-O", "qcow2", src, target, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"qimg: {target}: error while converting qcow2: ")


def test_convert_missing_source_fails_like_qemu(tmp_path, qemu_img):
    out = tmp_path / "out.qcow2"
    proc = qimg("convert", "-O", "qcow2", tmp_path / "missing", out, check=False)
    assert proc.returncode == 1
    missing = tmp_path / "missing"
    assert proc.stderr == (
        f"qimg: Could not open '{missing}': Could not open '{missing}': No such file or directory\n"
    )
    assert not out.exists()


def test_convert_hostile_source_leaves_no_target(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "8M", writes=("write -P 1 0 1M",))
    data = bytearray(src.read_bytes())
    # Point the L1 table's first entry at an unaligned L2 table far past the
    # end of the file (one past the end but aligned reads as zeros, as QEMU
    # reads it: see test_truncated_qemu_parity.py).
    l1_offset = int.from_bytes(data[40:48], "big")
    data[l1_offset : l1_offset + 8] = (0x8000_0000_0000_0000 | (1 << 40) | 512).to_bytes(8, "big")
    src.write_bytes(data)
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"out.{fmt}"
        proc = qimg("convert", "-O", fmt, src, out, check=False)
        want = run([qemu_img, "convert", "-O", fmt, str(src), str(out)], check=False)
        # The qcow2 driver's corruption notice, then qemu-img's own error line.
        assert (proc.returncode, proc.stderr.replace("qimg: ", "")) == (
            want.returncode,
            want.stderr.replace("qemu-img: ", ""),
        )
        assert want.returncode != 0 and "Traceback" not in proc.stderr
        out.unlink(missing_ok=True)  # qemu-img leaves its partial target
        proc = qimg("convert", "-O", fmt, src, out, check=False)
        assert not out.exists()


def test_convert_salvage_goes_on_past_a_corrupt_region(tmp_path, qemu_img):
    src = make_qcow2(
        tmp_path / "src.qcow2", "8M", writes=("write -c -P 1 0 64k", "write -P 2 1M 64k")
    )
    data = bytearray(src.read_bytes())
    # Garble the compressed cluster's bytes (the first data cluster after metadata).
    l1_offset = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1_offset : l1_offset + 8], "big") & 0x00FF_FFFF_FFFF_FE00
    entry = int.from_bytes(data[l2 : l2 + 8], "big")
    coffset = entry & ((1 << 54) - 1)  # 64k clusters: csize_shift 54
    data[coffset : coffset + 64] = b"\xff" * 64
    src.write_bytes(data)
    out = tmp_path / "out.raw"
    assert qimg("convert", "-O", "raw", src, out, check=False).returncode != 0
    assert not out.exists()
    qimg("convert", "--salvage", "-O", "raw", src, out)
    got = out.read_bytes()
    assert got[:65536] == bytes(65536)
    assert got[MiB : MiB + 65536] == b"\x02" * 65536


def test_convert_bitmaps_without_bitmaps_is_a_no_op(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "1M", writes=("write -P 1 0 64k",))
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qimg("convert", "--bitmaps", "-O", "qcow2", src, ours)
    run(["qemu-img", "convert", "--bitmaps", "-O", "qcow2", str(src), str(theirs)])
    compare(src, ours)

    def described(path):
        data = qemu_json("info", "--output=json", path)
        return {k: v for k, v in data.items() if k not in ("filename", "actual-size")}

    assert described(ours) == described(theirs)
    assert "bitmaps" not in described(ours)["format-specific"]["data"]
    # No bitmaps extension, no autoclear "bitmaps" bit (header bytes 72..96:
    # incompatible, compatible, autoclear features), as in qemu-img's target.
    assert ours.read_bytes()[72:96] == theirs.read_bytes()[72:96] == bytes(24)


def test_convert_bitmaps_with_bitmaps_copies_them(tmp_path, qemu_img):
    # Contents are compared with qemu-img's in tests/test_bitmaps.py.
    src = make_qcow2(tmp_path / "src.qcow2", "1M")
    run(["qemu-img", "bitmap", "--add", str(src), "b0"])
    out = tmp_path / "out.qcow2"
    qimg("convert", "--bitmaps", "-O", "qcow2", src, out)
    bitmaps = qemu_json("info", "--output=json", out)["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in bitmaps] == ["b0"]


def test_convert_onto_its_own_source_fails_and_keeps_the_source(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "1M", writes=("write -P 1 0 64k",))
    before = src.read_bytes()
    proc = qimg("convert", "-O", "raw", src, src, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"qimg: {src}: error while converting raw: Failed to get")
    assert src.read_bytes() == before


def test_convert_into_smaller_existing_target_fails_like_qemu(tmp_path, qemu_img):
    src = make_qcow2(tmp_path / "src.qcow2", "2M")
    out = make_qcow2(tmp_path / "out.qcow2", "1M")
    proc = qimg("convert", "-n", "-O", "qcow2", src, out, check=False)
    assert (proc.returncode, proc.stderr) == (1, "qimg: output file is smaller than input file\n")
    assert out.exists()
