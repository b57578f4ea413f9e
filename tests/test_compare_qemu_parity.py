"""qimg compare against qemu-img 7.2 compare: on a corpus of images made by
qemu-img and qemu-io, the same exit code, the same stdout (messages,
progress lines) and stderr, with and without -s and -p."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from chaintools import compare_both
from conftest import require_tool, run

MiB = 1 << 20
# One byte different from base.raw at each of these offsets (sector
# starts and ends, a cluster's last byte, inside data, the last byte).
DIFF_OFFSETS = (0, 511, 512, 65535, MiB + 7, 3 * MiB + 5000, 4 * MiB - 1)


def _io(d: Path, fmt: str, name: str, *commands: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    run([*args, name], cwd=d)


def _img(d: Path, *args: str) -> None:
    run(["qemu-img", *args], cwd=d)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Images of the same 4 MiB of guest data (and some that differ) in
    every shape qemu-img makes: raw, qcow2, compressed (zlib, zstd),
    extended L2, 512-byte clusters, an external data file, metadata
    preallocation, zero clusters, backing chains over qcow2 and raw, other
    sizes, an odd-sized raw file."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("compare")
    _img(d, "create", "-q", "-f", "raw", "base.raw", "4M")
    _io(d, "raw", "base.raw", "write -P 1 64k 192k", "write -P 2 1M 4k", f"write -P 3 {3 * MiB} 1M")
    for name, opts in (
        ("base.qcow2", []),
        ("zlib.qcow2", ["-c"]),
        ("zstd.qcow2", ["-c", "-o", "compression_type=zstd"]),
        ("ext.qcow2", ["-o", "extended_l2=on"]),
        ("df.qcow2", ["-o", "data_file=df.data"]),
        ("c512.qcow2", ["-o", "cluster_size=512"]),
        ("full.qcow2", ["-S", "0"]),
    ):
        _img(d, "convert", "-O", "qcow2", *opts, "base.raw", name)
    _img(d, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "pm.qcow2", "4M")
    _img(d, "convert", "-n", "-O", "qcow2", "base.raw", "pm.qcow2")
    _img(d, "convert", "-O", "qcow2", "base.raw", "zeroed.qcow2")
    _io(d, "qcow2", "zeroed.qcow2", "write -z 64k 64k", "write -z -u 128k 64k")
    _img(d, "convert", "-O", "raw", "base.raw", "zeroed.raw")
    _io(d, "raw", "zeroed.raw", "write -z 64k 128k")
    _img(d, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2")
    _io(d, "qcow2", "ov.qcow2", "write -P 9 2M 64k")
    _img(d, "convert", "-O", "raw", "ov.qcow2", "ov-flat.raw")
    _img(d, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ovr.qcow2")
    _img(d, "create", "-q", "-f", "qcow2", "-b", "ov.qcow2", "-F", "qcow2", "ov2.qcow2", "8M")
    _io(d, "qcow2", "ov2.qcow2", "write -P 7 6M 4k")
    _img(d, "convert", "-O", "qcow2", "ov2.qcow2", "ov2-flat.qcow2")
    _img(d, "create", "-q", "-f", "qcow2", "big.qcow2", "8M")
    _img(d, "convert", "-n", "-O", "qcow2", "base.raw", "big.qcow2")
    _img(d, "create", "-q", "-f", "raw", "bigd.raw", "8M")
    _img(d, "convert", "-n", "-O", "raw", "base.raw", "bigd.raw")
    _io(d, "raw", "bigd.raw", f"write -P 5 {6 * MiB + 1000} 1")
    (d / "odd.raw").write_bytes((d / "base.raw").read_bytes()[:1000000])
    _img(d, "create", "-q", "-f", "qcow2", "empty.qcow2", "4M")
    for off in DIFF_OFFSETS:
        _img(d, "convert", "-O", "raw", "base.raw", f"d{off}.raw")
        _io(d, "raw", f"d{off}.raw", f"write -P 200 {off} 1")
        _img(d, "convert", "-c", "-O", "qcow2", f"d{off}.raw", f"d{off}-zlib.qcow2")
    return d


SAME_DATA = (
    "base.raw",
    "base.qcow2",
    "zlib.qcow2",
    "zstd.qcow2",
    "ext.qcow2",
    "df.qcow2",
    "c512.qcow2",
    "full.qcow2",
    "pm.qcow2",
    "ovr.qcow2",
)
OTHERS = (
    "zeroed.qcow2",
    "zeroed.raw",
    "ov.qcow2",
    "ov-flat.raw",
    "ov2.qcow2",
    "ov2-flat.qcow2",
    "big.qcow2",
    "bigd.raw",
    "odd.raw",
    "empty.qcow2",
)


@pytest.mark.parametrize("mode", [(), ("-s",), ("-p",)], ids=["plain", "strict", "progress"])
def test_compare_of_every_shape_of_the_same_data_matches_qemu_img(corpus, mode):
    """Each pair of images holding base.raw's data (raw against qcow2,
    compressed, extended L2, data file, backing chain...): qemu-img's
    outcome, its strict-mode verdict and its progress lines."""
    for a, b in itertools.combinations(SAME_DATA, 2):
        theirs, ours = compare_both(corpus, "-U", *mode, a, b)
        assert ours == theirs, (mode, a, b)


@pytest.mark.parametrize("mode", [(), ("-s",), ("-p",)], ids=["plain", "strict", "progress"])
def test_compare_of_differing_images_names_qemu_img_offset(corpus, mode):
    """Zero clusters, chains with new data, other sizes (the longer tail
    zero or not), an odd-sized raw file, against the base images both ways."""
    for a, b in itertools.product(("base.raw", "base.qcow2", "zlib.qcow2"), OTHERS):
        for pair in ((a, b), (b, a)):
            theirs, ours = compare_both(corpus, "-U", *mode, *pair)
            assert ours == theirs, (mode, pair)


@pytest.mark.parametrize("offset", DIFF_OFFSETS)
def test_compare_reports_one_differing_byte_where_qemu_img_does(corpus, offset):
    """One byte different, from the first to the last: the offset qemu-img
    names (the differing sector's start within its chunk), raw and
    compressed, against raw, qcow2 and compressed copies."""
    for a in (f"d{offset}.raw", f"d{offset}-zlib.qcow2"):
        for b in ("base.raw", "base.qcow2", "zstd.qcow2", "ext.qcow2"):
            for mode in ((), ("-s",), ("-q",)):
                theirs, ours = compare_both(corpus, *mode, a, b)
                assert ours == theirs, (a, b, mode)


@pytest.mark.parametrize(
    "args",
    [
        ("base.raw", "missing.qcow2"),
        ("missing.qcow2", "base.raw"),
        ("-f", "qcow2", "base.raw", "base.qcow2"),
        ("-F", "raw", "base.raw", "base.qcow2"),
        ("-f", "foo", "base.raw", "base.raw"),
        ("-T", "foo", "base.raw", "base.raw"),
        ("-p", "-T", "foo", "base.raw", "base.raw"),
        ("-p", "base.raw", "missing"),
        ("--object", "foo", "base.raw", "base.raw"),
        ("--image-opts", "base.raw", "base.raw"),
        ("base.raw",),
        ("base.raw", "base.raw", "base.raw"),
        ("",),
        ("", "base.raw"),
        ("-x", "base.raw", "base.raw"),
        ("--force", "base.raw", "base.raw"),
        ("-T", "none", "-f", "raw", "-F", "qcow2", "base.raw", "base.qcow2"),
        ("--image-opts", "-f", "raw", "driver=raw,file.filename=base.raw", "base.raw"),
        ("--image-opts", "-F", "raw", "driver=raw,file.filename=base.raw", "base.raw"),
        (
            "--image-opts",
            "driver=raw,file.filename=base.raw",
            "driver=qcow2,file.filename=base.qcow2",
        ),
    ],
)
def test_compare_bad_input_fails_as_qemu_img_does(corpus, args):
    """Missing files, wrong or unknown formats, a bad cache mode or
    --object, the wrong number of names: qemu-img's code (1 usage, 2 open)
    and its one-line message."""
    theirs, ours = compare_both(corpus, *args)
    assert ours == theirs


def _l2_damage(d: Path, source: str, name: str, guest: int, value) -> None:
    from damage import Layout

    _img(d, "convert", "-O", "qcow2", *(["-c"] if "zlib" in name else []), source, name)
    layout = Layout.read(d / name)
    layout.set_l2_entry(guest, value(layout, layout.l2_entry(guest)))


def test_compare_failures_inside_images_exit_as_qemu_img_does(corpus):
    """A data cluster's L2 entry unaligned: block status fails (exit 3,
    "Sector allocation test failed for F"); a compressed cluster whose
    data is garbage: the read fails (exit 4, "Error while reading offset N
    of F: ..."), after the chunks before it compared equal."""
    d = corpus
    _l2_damage(d, "base.raw", "unaligned.qcow2", 3 * MiB, lambda lay, e: e + 512)
    _l2_damage(d, "base.raw", "garbage-zlib.qcow2", 3 * MiB, lambda lay, e: e)
    from damage import Layout

    layout = Layout.read(d / "garbage-zlib.qcow2")
    entry = layout.l2_entry(3 * MiB)
    host = entry & ((1 << (62 - (layout.header.cluster_bits - 8))) - 1)
    with open(d / "garbage-zlib.qcow2", "r+b") as f:
        f.seek(host)
        f.write(b"\xff" * 64)
    for args in (
        ("unaligned.qcow2", "base.raw"),
        ("base.raw", "unaligned.qcow2"),
        ("garbage-zlib.qcow2", "base.raw"),
        ("base.qcow2", "garbage-zlib.qcow2"),
        ("-p", "garbage-zlib.qcow2", "base.raw"),
    ):
        theirs, ours = compare_both(d, *args)
        assert ours == theirs, args
        assert ours[0] in (3, 4), args


def test_compare_images_library_call(corpus):
    """The library function behind the command: opened images in, the
    outcome and qemu-img's line out, progress reported chunk by chunk."""
    import qimg
    from qimg.compare import compare_images

    steps = []
    with qimg.open_image(str(corpus / "d512-zlib.qcow2")) as a:
        with qimg.open_image(str(corpus / "base.qcow2")) as b:
            got = compare_images(a, b, progress=lambda n, base: steps.append((n, base)))
    assert got == (1, "Content mismatch at offset 512!")
    assert steps[0] == (0, 4 * MiB)
    with qimg.open_image(str(corpus / "ext.qcow2")) as a:
        with qimg.open_image(str(corpus / "ovr.qcow2")) as b:
            assert compare_images(a, b, strict=False).code == 0


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """More shapes qemu-img makes: 2 MiB clusters (with and without
    extended L2), an extended-L2 overlay with subclusters over raw,
    preallocation full and falloc, a compat=0.10 image, a zstd-compressed
    backing file under zero and discarded clusters, a chain whose backing
    files are shorter than the top, qcow version 1."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    d = tmp_path_factory.mktemp("shapes")
    _img(d, "create", "-q", "-f", "raw", "base.raw", "6M")
    _io(d, "raw", "base.raw", "write -P 1 0 100k", "write -P 2 2M 1M", f"write -P 4 {5 * MiB} 64k")
    _img(d, "convert", "-O", "qcow2", "-o", "cluster_size=2M", "base.raw", "c2m.qcow2")
    _img(
        d, "convert", "-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "base.raw", "x2m.qcow2"
    )
    _img(
        d,
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "xov.qcow2",
    )
    _io(d, "qcow2", "xov.qcow2", "write -P 7 8k 2k", "write -z 100k 4k")
    _img(d, "convert", "-O", "raw", "xov.qcow2", "xov-flat.raw")
    for mode in ("full", "falloc"):
        _img(d, "create", "-q", "-f", "qcow2", "-o", f"preallocation={mode}", f"{mode}.qcow2", "6M")
        _img(d, "convert", "-n", "-O", "qcow2", "base.raw", f"{mode}.qcow2")
    _img(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "6M")
    _img(d, "convert", "-n", "-O", "qcow2", "base.raw", "v2.qcow2")
    _io(d, "qcow2", "v2.qcow2", "write -z 2M 64k")
    _img(d, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "base.raw", "zstd.qcow2")
    _img(d, "create", "-q", "-f", "qcow2", "-b", "zstd.qcow2", "-F", "qcow2", "zov.qcow2")
    _io(d, "qcow2", "zov.qcow2", "write -z 2M 64k", "discard 5M 64k")
    _img(d, "convert", "-O", "raw", "zov.qcow2", "zov-flat.raw")
    _img(d, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "short.qcow2", "8M")
    _img(
        d, "create", "-q", "-f", "qcow2", "-b", "short.qcow2", "-F", "qcow2", "short2.qcow2", "10M"
    )
    _io(d, "qcow2", "short2.qcow2", "write -P 3 9M 4k")
    _img(d, "convert", "-O", "qcow", "base.raw", "v1.qcow")
    _img(d, "create", "-q", "-f", "raw", "big.raw", "10M")
    _img(d, "convert", "-n", "-O", "raw", "base.raw", "big.raw")
    _io(d, "raw", "big.raw", "write -P 3 9M 4k")
    return d


@pytest.mark.parametrize("mode", [(), ("-s",), ("-p",)], ids=["plain", "strict", "progress"])
def test_compare_of_more_shapes_matches_qemu_img(shapes, mode):
    pairs = [
        ("base.raw", name)
        for name in (
            "c2m.qcow2",
            "x2m.qcow2",
            "full.qcow2",
            "falloc.qcow2",
            "v2.qcow2",
            "zstd.qcow2",
        )
    ]
    pairs += [
        ("xov.qcow2", "xov-flat.raw"),
        ("xov.qcow2", "base.raw"),
        ("zov.qcow2", "zov-flat.raw"),
        ("zov.qcow2", "zstd.qcow2"),
        ("short2.qcow2", "big.raw"),
        ("short.qcow2", "base.raw"),
        ("c2m.qcow2", "x2m.qcow2"),
        ("full.qcow2", "falloc.qcow2"),
        ("v1.qcow", "base.raw"),
        ("v1.qcow", "c2m.qcow2"),
    ]
    for a, b in pairs:
        for pair in ((a, b), (b, a)):
            theirs, ours = compare_both(shapes, "-U", *mode, *pair)
            assert ours == theirs, (mode, pair)
