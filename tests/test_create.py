"""`qimg create` makes what `qemu-img create` makes, judged by qemu-img.

Each case runs both tools in sibling directories with the same relative
names: the "Formatting ..." lines must be equal, `qemu-img check` must find
qimg's image clean, and `qemu-img info --output=json` must equal `qimg info
--output=json` on it (and on qemu-img's own image) except actual-size.
Invalid options must fail as qemu-img fails: exit code, message text after
the program name, and nothing left on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from infotools import assert_same_info, message, pairwise, qemu_in, qimg_in

pytestmark = pytest.mark.usefixtures("qemu_img", "qemu_io")

AXES = {
    "compat": ["0.10", "1.1"],
    "cluster_size": [512, 4096, 65536, 2 << 20],
    "refcount_bits": [1, 2, 4, 8, 16, 32, 64],
    "lazy_refcounts": ["off", "on"],
    "extended_l2": ["off", "on"],
    "preallocation": ["off", "metadata", "falloc", "full"],
    "data_file": ["none", "file", "raw"],
    "backing": ["none", "qcow2", "raw"],
}


def _valid(c: dict) -> bool:
    """qemu-img's own rules for qcow2 create options."""
    v2 = c["compat"] == "0.10"
    if v2 and (
        c["refcount_bits"] != 16
        or c["lazy_refcounts"] == "on"
        or c["extended_l2"] == "on"
        or c["data_file"] != "none"
    ):
        return False
    if c["extended_l2"] == "on" and c["cluster_size"] < 16384:
        return False
    if c["data_file"] == "raw" and c["backing"] != "none":
        return False
    if c["backing"] != "none" and c["preallocation"] != "off" and c["extended_l2"] == "off":
        return False
    return True


GRID = pairwise(AXES, _valid)


def _case_id(c: dict) -> str:
    return "-".join(str(v) for v in c.values())


def _create_args(c: dict) -> list[str]:
    opts = [
        f"compat={c['compat']}",
        f"cluster_size={c['cluster_size']}",
        f"refcount_bits={c['refcount_bits']}",
        f"lazy_refcounts={c['lazy_refcounts']}",
        f"extended_l2={c['extended_l2']}",
        f"preallocation={c['preallocation']}",
    ]
    if c["data_file"] != "none":
        opts.append("data_file=t.data")
    if c["data_file"] == "raw":
        opts.append("data_file_raw=on")
    args = ["create", "-f", "qcow2", "-o", ",".join(opts)]
    if c["backing"] == "qcow2":
        args += ["-b", "base.qcow2", "-F", "qcow2"]
    elif c["backing"] == "raw":
        args += ["-b", "base.raw", "-F", "raw"]
    return args + ["t.qcow2", "3M"]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two directories, each with the same backing files: `q` for
    qemu-img's images, `m` for qimg's."""
    pair = []
    for name in ("q", "m"):
        d = tmp_path / name
        d.mkdir()
        qemu_in(d, "qemu-img", "create", "-q", "-f", "raw", "base.raw", "2M", check=True)
        qemu_in(d, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "2M", check=True)
        pair.append(d)
    return pair[0], pair[1]


def _both(dirs, args: list[str]):
    q, m = dirs
    return qemu_in(q, "qemu-img", *args), qimg_in(m, *args)


@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_create_grid_is_clean_and_described_as_qemu_img_does(dirs, case):
    qp, mp = _both(dirs, _create_args(case))
    assert qp.returncode == 0, qp.stderr
    assert mp.returncode == 0, mp.stderr
    assert mp.stdout == qp.stdout
    q, m = dirs
    check = qemu_in(m, "qemu-img", "check", "t.qcow2")
    assert check.returncode == 0, check.stdout + check.stderr
    assert_same_info(m, "t.qcow2")
    assert_same_info(q, "t.qcow2")
    assert_same_info(m, "t.qcow2", "--backing-chain")


def test_grid_covers_every_value_of_every_option():
    for name, values in AXES.items():
        assert {c[name] for c in GRID} == set(values), name
    assert len(GRID) < 60


INVALID = [
    "cluster_size=1000",
    "cluster_size=256",
    "cluster_size=4M",
    "cluster_size=abc",
    "refcount_bits=3",
    "refcount_bits=128",
    "refcount_bits=0",
    "refcount_bits=abc",
    "compat=0.10,refcount_bits=8",
    "compat=0.10,lazy_refcounts=on",
    "compat=0.10,extended_l2=on",
    "compat=0.10,data_file=t.data",
    "compat=0.10,compression_type=zstd",
    "extended_l2=on,cluster_size=4k",
    "extended_l2=on,cluster_size=8k",
    "data_file_raw=on",
    "compat=2",
    "preallocation=foo",
    "compression_type=lz4",
    "lazy_refcounts=maybe",
    "bogus=1",
    "size=abc",
    "size=1M",  # and a SIZE argument too: given twice
    "backing_file=base.raw",
    "backing_fmt=raw",
    "backing_file=nope.raw,backing_fmt=raw",
    "backing_file=base.raw,backing_fmt=qcow2",
    "backing_file=base.raw,backing_fmt=raw,preallocation=metadata",
    "backing_file=base.raw,backing_fmt=raw,data_file=t.data,data_file_raw=on",
    "backing_file=t.qcow2,backing_fmt=qcow2",
    "cluster_size=512,size=7E",
]


@pytest.mark.parametrize("opts", INVALID)
def test_invalid_create_fails_as_qemu_img_does_and_leaves_nothing(dirs, opts):
    q, m = dirs
    before = sorted(os.listdir(m))
    args = ["create", "-f", "qcow2", "-o", opts, "t.qcow2"]
    if "size=" not in opts or opts == "size=1M":
        args.append("1M")
    qp, mp = _both(dirs, args)
    assert qp.returncode == 1
    assert mp.returncode == 1
    assert mp.stdout == qp.stdout
    assert message(mp.stderr, "qimg") == message(qp.stderr, "qemu-img")
    assert "Traceback" not in mp.stderr
    assert sorted(os.listdir(m)) == before
    assert sorted(os.listdir(q)) == before


@pytest.mark.parametrize(
    "size", ["0", "1000", "1k", "2k", "1.5M", "1G", "2.5G", "1T", "1P", "0x10000"]
)
def test_size_suffixes_give_qemu_img_sizes(dirs, size):
    qp, mp = _both(dirs, ["create", "-f", "qcow2", "t.qcow2", size])
    assert (mp.returncode, mp.stdout) == (qp.returncode, qp.stdout), mp.stderr + qp.stderr
    if qp.returncode == 0:
        assert_same_info(dirs[1], "t.qcow2")


@pytest.mark.parametrize("size", ["1.5", "abc", "1e3", "12345678901234567890", "8E", "7E"])
def test_bad_sizes_fail_as_qemu_img_does(dirs, size):
    qp, mp = _both(dirs, ["create", "-f", "qcow2", "t.qcow2", size])
    assert (mp.returncode, mp.stdout) == (qp.returncode, qp.stdout)
    assert message(mp.stderr, "qimg") == message(qp.stderr, "qemu-img")
    assert not (dirs[1] / "t.qcow2").exists()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_size_comes_from_the_backing_file_when_omitted(dirs, fmt):
    args = ["create", "-f", "qcow2", "-b", f"base.{fmt}", "-F", fmt, "t.qcow2"]
    qp, mp = _both(dirs, args)
    assert qp.returncode == mp.returncode == 0, mp.stderr
    assert mp.stdout == qp.stdout
    assert_same_info(dirs[1], "t.qcow2", "--backing-chain")


def test_backing_name_resolves_next_to_the_new_image(dirs):
    for d in dirs:
        (d / "sub").mkdir()
    qp, mp = _both(
        dirs, ["create", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", "sub/t.qcow2"]
    )
    assert qp.returncode == mp.returncode == 0, mp.stderr
    assert mp.stdout == qp.stdout
    assert_same_info(dirs[1], "sub/t.qcow2", "--backing-chain")


def test_unsafe_create_with_a_missing_backing_file(dirs):
    args = ["create", "-f", "qcow2", "-u", "-b", "nope.qcow2", "-F", "qcow2", "t.qcow2"]
    qp, mp = _both(dirs, args)  # no size: it cannot come from the backing file
    assert qp.returncode == mp.returncode == 1
    assert message(mp.stderr, "qimg") == message(qp.stderr, "qemu-img")
    qp, mp = _both(dirs, args + ["1G"])
    assert qp.returncode == mp.returncode == 0, mp.stderr
    assert mp.stdout == qp.stdout
    assert_same_info(dirs[1], "t.qcow2")


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("with_file", [True, False])
def test_options_help_lists_qemu_img_options(tmp_path, fmt, with_file):
    args = ["create", "-f", fmt, "-o", "help"] + (["t.img"] if with_file else [])
    qp = qemu_in(tmp_path, "qemu-img", *args, check=True)
    mp = qimg_in(tmp_path, *args, check=True)
    assert mp.stdout.splitlines() == qp.stdout.splitlines()
    assert not (tmp_path / "t.img").exists()


@pytest.mark.parametrize("prealloc", [None, "off", "falloc", "full"])
def test_raw_create_with_preallocation(dirs, prealloc):
    opts = ["-o", f"preallocation={prealloc}"] if prealloc else []
    qp, mp = _both(dirs, ["create", "-f", "raw", *opts, "t.raw", "1001k"])
    assert qp.returncode == mp.returncode == 0, mp.stderr
    assert mp.stdout == qp.stdout
    q, m = dirs
    assert (m / "t.raw").stat().st_size == (q / "t.raw").stat().st_size
    if prealloc in ("falloc", "full"):
        assert (m / "t.raw").stat().st_blocks * 512 >= 1001 * 1024
    assert_same_info(m, "t.raw")


def test_create_quiet_prints_nothing(dirs):
    qp, mp = _both(dirs, ["create", "-q", "-f", "qcow2", "t.qcow2", "1M"])
    assert qp.returncode == mp.returncode == 0
    assert mp.stdout == qp.stdout == ""


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_in_a_missing_directory_fails_as_qemu_img_does(dirs, fmt):
    qp, mp = _both(dirs, ["create", "-f", fmt, "nodir/t.img", "1M"])
    assert qp.returncode == mp.returncode == 1
    assert message(mp.stderr, "qimg") == message(qp.stderr, "qemu-img")


@pytest.mark.parametrize("size", ["100", "1M"])
def test_raw_create_allocates_the_first_block_as_qemu_img_does(dirs, size):
    q, m = dirs
    _both(dirs, ["create", "-q", "-f", "raw", "t.raw", size])
    maps = [
        qemu_in(d, "qemu-img", "map", "--output=json", "t.raw", check=True).stdout for d in (q, m)
    ]
    assert maps[0] == maps[1]
