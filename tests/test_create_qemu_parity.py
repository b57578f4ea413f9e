"""create beside qemu-img 7.2: file sizes, size syntax, bad option values
and -o help, each judged by running qemu-img at test time."""

from __future__ import annotations

import os

import pytest

from tests.conftest import qimg, run


def _both(tmp_path, args: list[str], name: str = "t.qcow2"):
    """Run `create ARGS` with qemu-img and qimg on their own file; return
    (qemu proc, qimg proc, qemu file, qimg file). FILE in ARGS is the path."""
    qdir, mdir = tmp_path / "q", tmp_path / "m"
    qdir.mkdir(exist_ok=True)
    mdir.mkdir(exist_ok=True)
    qfile, mfile = qdir / name, mdir / name
    q = run(["qemu-img", "create", *[str(qfile) if a == "FILE" else a for a in args]], check=False)
    m = qimg("create", *[str(mfile) if a == "FILE" else a for a in args], check=False)
    return q, m, qfile, mfile


def _text(proc, path) -> str:
    """stdout and stderr with the program name and the path made neutral."""
    out = proc.stdout + "|" + proc.stderr
    return out.replace("qemu-img:", "PROG:").replace("qimg:", "PROG:").replace(str(path), "FILE")


# Same file size, other places: where the refcount table must grow (small
# clusters, large L1) or where qemu-img moves it for falloc/full
# preallocation (qcow2_refcount_area), qimg's refcount structures sit elsewhere.
DIFFERENT_LAYOUT = {
    ("1G", "cluster_size=512"),
    ("3T", "cluster_size=4k"),
    ("1M", "preallocation=falloc"),
    ("1M", "preallocation=full,cluster_size=4k"),
}


@pytest.mark.parametrize(
    "size,options",
    [
        ("64M", ""),
        ("0", ""),
        ("1G", "cluster_size=512"),
        ("3T", "cluster_size=4k"),
        ("1G", "cluster_size=2M"),
        ("1G", "refcount_bits=1"),
        ("300M", "refcount_bits=64,lazy_refcounts=on"),
        ("1G", "extended_l2=on,cluster_size=16k"),
        ("1G", "compat=0.10"),
        ("1M", "compression_type=zstd"),
        ("1G", "preallocation=metadata"),
        ("1M", "preallocation=falloc"),
        ("1M", "preallocation=full,cluster_size=4k"),
    ],
)
def test_create_qcow2_file_size_and_bytes_match_qemu_img(qemu_img, tmp_path, size, options):
    args = ["-q", "-f", "qcow2", *(["-o", options] if options else []), "FILE", size]
    q, m, qfile, mfile = _both(tmp_path, args)
    assert q.returncode == m.returncode == 0, m.stderr
    assert mfile.stat().st_size == qfile.stat().st_size
    if (size, options) not in DIFFERENT_LAYOUT:
        assert mfile.read_bytes() == qfile.read_bytes()  # the same layout
    assert run(["qemu-img", "check", str(mfile)], check=False).returncode == 0


def test_create_with_data_file_and_backing_file_sizes_match_qemu_img(qemu_img, tmp_path):
    base = tmp_path / "base.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "100M"])
    cases = [
        ["-o", "data_file=DATA"],
        ["-o", "data_file=DATA,data_file_raw=on"],
        ["-o", "data_file=DATA,preallocation=metadata"],
        ["-b", str(base), "-F", "qcow2"],
        ["-b", str(base), "-F", "qcow2", "-o", "extended_l2=on,preallocation=metadata"],
    ]
    for i, extra in enumerate(cases):
        sizes = []
        for tool in ("q", "m"):
            d = tmp_path / f"{tool}{i}"
            d.mkdir()
            args = ["create", "-q", "-f", "qcow2"]
            args += [a.replace("DATA", str(d / "data")) for a in extra]
            args += [str(d / "t.qcow2"), "1M"]
            proc = run(["qemu-img", *args]) if tool == "q" else qimg(*args)
            assert proc.returncode == 0
            assert run(["qemu-img", "check", str(d / "t.qcow2")], check=False).returncode == 0
            data = d / "data"
            sizes.append(
                (
                    (d / "t.qcow2").stat().st_size,
                    data.stat().st_size if data.exists() else None,
                )
            )
        assert sizes[0] == sizes[1], extra


def test_create_info_disk_size_of_new_image_agrees_with_qemu_img(qemu_img, tmp_path):
    q, m, qfile, mfile = _both(tmp_path, ["-q", "-f", "qcow2", "FILE", "64M"])
    assert m.returncode == 0
    assert mfile.stat().st_size == qfile.stat().st_size == 196616


SIZES = [
    "1024.0",
    "1024.0b",
    "1.",
    "1.5G",
    "1.k",
    "0.0005k",
    "1.0000000000000000001k",
    "1.00000000000000000000000000001",
    "7.99E",
    "1e3",
    " 1k",
    "1k ",
    "+1k",
    "0x10",
    "0x10k",
    "0x1p3",
    "0x",
    "0x1.8k",
    "1k5",
    "1.5",
    "1.5b",
    ".5k",
    "1.e5",
    "1.5e3",
    "1kB",
    "010",
    "",
    "8E",
    "9223372036854775807",
    "9223372036854775295",
    "9223372036854775808",
    "18446744073709551616",
]


@pytest.mark.parametrize("size", SIZES)
def test_create_size_syntax_and_messages_match_qemu_img(qemu_img, tmp_path, size):
    q, m, qfile, mfile = _both(tmp_path, ["-f", "qcow2", "FILE", size])
    assert (m.returncode, _text(m, mfile)) == (q.returncode, _text(q, qfile))
    assert mfile.exists() == qfile.exists()


@pytest.mark.parametrize(
    "size",
    ["1024.0", "1.5", "-1", "1k5", "0x10k", "99999999999999999999", "8E", "18446744073709551615"],
)
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_option_size_syntax_and_messages_match_qemu_img(qemu_img, tmp_path, size, fmt):
    q, m, qfile, mfile = _both(tmp_path, ["-f", fmt, "-o", f"size={size}", "FILE"])
    assert (m.returncode, _text(m, mfile)) == (q.returncode, _text(q, qfile))


BAD_VALUES = [
    "refcount_bits=-1",
    "refcount_bits=3",
    "refcount_bits=abc",
    "refcount_bits=99999999999999999999",
    "refcount_bits=0x",
    "refcount_bits=+16",
    "refcount_bits=8,compat=0.10",
    "cluster_size=0",
    "cluster_size=3",
    "cluster_size=4M",
    "cluster_size=-1",
    "compat=foo",
    "compat=0.10,lazy_refcounts=on",
    "lazy_refcounts=maybe",
    "preallocation=bad",
    "compression_type=bad",
    "compression_type=zstd,compat=0.10",
    "extended_l2=on,cluster_size=4k",
    "extended_l2=on,compat=0.10",
    "data_file_raw=on",
    "backing_fmt=raw",
    "backing_file=",
    "cluster_size=3,compat=foo",
    "preallocation=bad,compression_type=bad",
    "nocow=x",
    "foo=bar",
    "help=on",
]


@pytest.mark.parametrize("options", BAD_VALUES)
def test_create_bad_option_value_formatting_line_and_message_match_qemu_img(
    qemu_img, tmp_path, options
):
    q, m, qfile, mfile = _both(tmp_path, ["-f", "qcow2", "-o", options, "FILE", "1M"])
    assert (m.returncode, _text(m, mfile)) == (q.returncode, _text(q, qfile))
    assert mfile.exists() == qfile.exists()


@pytest.mark.parametrize("options", ["", ",a=b", "cluster_size=4k,", "cluster_size=4k,,,"])
def test_create_invalid_option_list_is_refused_as_qemu_img_does(qemu_img, tmp_path, options):
    q, m, qfile, mfile = _both(tmp_path, ["-f", "qcow2", "-o", options, "FILE", "1M"])
    assert (m.returncode, _text(m, mfile)) == (q.returncode, _text(q, qfile))


def _option_names(text: str) -> list[str]:
    return [line.split("=")[0].strip() for line in text.splitlines() if line.startswith("  ")]


@pytest.mark.parametrize(
    "options", ["?", "help", "cluster_size=64k,help", "foo=bar,?", "cluster_size=3,help"]
)
@pytest.mark.parametrize("with_file", [True, False])
def test_create_question_mark_and_combined_help_list_qemu_img_options(
    qemu_img, tmp_path, options, with_file
):
    args = ["-f", "qcow2", "-o", options] + (["FILE"] if with_file else [])
    q, m, qfile, mfile = _both(tmp_path, args)
    assert m.returncode == q.returncode == 0
    assert m.stdout.splitlines()[0] == q.stdout.splitlines()[0]
    assert _option_names(m.stdout) == _option_names(q.stdout)
    assert not mfile.exists()


def test_create_size_help_value_escaped_comma_is_not_help(qemu_img, tmp_path):
    q, m, qfile, mfile = _both(tmp_path, ["-f", "qcow2", "-o", "size=1k,,help", "FILE"])
    assert (m.returncode, _text(m, mfile)) == (q.returncode, _text(q, qfile))
    assert os.path.exists(qfile) == os.path.exists(mfile)


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs. Preallocating past its free space fails as on a full
    disk, without taking the machine's disk from the tests that run beside
    (ext4's fallocate of a data file fills the disk before it fails)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize(
    "options",
    ["preallocation=falloc", "preallocation=falloc,data_file=DATA", "preallocation=full"],
)
def test_create_preallocation_past_free_space_fails_in_qemu_img_words(qemu_img, small_fs, options):
    texts = []
    for tool in ("q", "m"):
        d = small_fs / tool
        d.mkdir()
        args = ["create", "-f", "qcow2", "-o", options.replace("DATA", str(d / "data"))]
        args += [str(d / "t.qcow2"), "1G"]
        proc = run(["qemu-img", *args], check=False) if tool == "q" else qimg(*args, check=False)
        texts.append((proc.returncode, _text(proc, d), sorted(os.listdir(d))))
    assert texts[0][0] == 1
    assert texts[1] == texts[0]
