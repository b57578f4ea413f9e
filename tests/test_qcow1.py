"""qcow (version 1) images, QEMU's older format, read as qemu-img 7.2 reads them.

The images are made by qemu-img and qemu-io (plain, written, compressed by
`convert -c`, over a backing file, AES-encrypted), some then damaged. The
same command runs under qemu-img and qimg in one directory; they must agree
on the exit code, the message (program name stripped), the info JSON and
the data convert writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from infotools import human_facts, message, qemu_in, qimg_here, without_actual_size

from qimg.formats.qcow import QCOW_HEADER

pytestmark = pytest.mark.usefixtures("qemu_img", "qemu_io")

FIELDS = (
    "magic version backing_file_offset backing_file_size mtime size"
    " cluster_bits l2_bits padding crypt_method l1_table_offset"
).split()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A directory of qemu-made qcow images:
    plain.qcow (1 MiB, 64 KiB of 0x5a at 0, 5 KiB of 0x11 at 300 KiB),
    compressed.qcow (compressed clusters of 0x5a in the first 64 KiB and
    one of 0x11 at 300 KiB, 1 KiB of 0x12 after it uncompressed), base.raw (512 KiB of
    0x33), over.qcow (2 MiB over base.raw, 4 KiB of 0x44 at 4 KiB),
    top.qcow2 (qcow2 over over.qcow), enc.qcow (AES)."""
    d = tmp_path_factory.mktemp("qcow1")

    def q(*args: str) -> None:
        tool = "qemu-io" if args[0] == "io" else "qemu-img"
        qemu_in(d, tool, *(args[1:] if args[0] == "io" else args), check=True)

    q("create", "-q", "-f", "qcow", "plain.qcow", "1M")
    q("io", "-f", "qcow", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x11 300k 5k", "plain.qcow")
    # qemu-img 7.2's `convert -c -O qcow` exits 1 without a word (its data
    # is right): the compressed image is written cluster by cluster instead.
    q("create", "-q", "-f", "qcow", "compressed.qcow", "1M")
    writes = [f"write -c -P 0x5a {i * 4}k 4k" for i in range(16)]
    writes += ["write -c -P 0x11 300k 4k", "write -P 0x12 304k 1k"]
    q("io", "-f", "qcow", *(a for w in writes for a in ("-c", w)), "compressed.qcow")
    q("create", "-q", "-f", "raw", "base.raw", "512k")
    q("io", "-f", "raw", "-c", "write -P 0x33 0 512k", "base.raw")
    q("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", "over.qcow", "2M")
    q("io", "-f", "qcow", "-c", "write -P 0x44 4k 4k", "over.qcow")
    q("create", "-q", "-f", "qcow2", "-b", "over.qcow", "-F", "qcow", "top.qcow2")
    q("io", "-c", "write -P 0x55 100k 4k", "top.qcow2")
    q(
        "create", "-q", "-f", "qcow", "--object", "secret,id=s0,data=abc",
        "-o", "encrypt.format=aes,encrypt.key-secret=s0", "enc.qcow", "1M",
    )  # fmt: skip
    return d


def _copy(images: Path, d: Path, name: str, **fields: int) -> str:
    """images/name copied into d, with header `fields` set."""
    shutil.copyfile(images / name, d / name)
    if fields:
        with open(d / name, "r+b") as f:
            values = dict(zip(FIELDS, QCOW_HEADER.unpack(f.read(QCOW_HEADER.size))))
            values.update(fields)
            f.seek(0)
            f.write(QCOW_HEADER.pack(*values.values()))
    return name


def _poke_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(8, "big"))


def _outcome(d: Path, label: str, *args: str) -> tuple:
    """(exit code, message, result) of one command: info's JSON minus
    actual-size, human output, or the bytes convert -O raw wrote."""
    out = d / f"{label}.raw"
    out.unlink(missing_ok=True)
    args = tuple(a.replace("OUT", out.name) for a in args)
    if label == "qemu-img":
        proc = qemu_in(d, "qemu-img", *args, timeout=60)
    else:
        proc = qimg_here(d, *args)
    prog = "qemu-img" if label == "qemu-img" else "qimg"
    result = None
    if proc.returncode == 0:
        if "--output=json" in args:
            result = without_actual_size(json.loads(proc.stdout))
        elif args[0] == "info":
            result = human_facts(proc.stdout)
        elif args[0] == "convert":
            result = out.read_bytes()
    return proc.returncode, message(proc.stderr, prog), result


def _same(d: Path, *args: str) -> tuple:
    q = _outcome(d, "qemu-img", *args)
    m = _outcome(d, "qimg", *args)
    assert m == q
    return q


# --- reading good images ---------------------------------------------------------

NAMES = ("plain.qcow", "compressed.qcow", "over.qcow", "top.qcow2", "enc.qcow")


@pytest.mark.parametrize("name", NAMES)
def test_info_of_qcow_images_matches_qemu_json_and_human(images, name):
    code, _msg, info = _same(images, "info", "--output=json", name)
    assert code == 0
    if name != "top.qcow2":
        assert info["format"] == "qcow"
    assert _same(images, "info", name)[0] == 0


@pytest.mark.parametrize("name", NAMES[:4])
def test_info_backing_chain_of_qcow_images_matches_qemu(images, name):
    assert _same(images, "info", "--backing-chain", "--output=json", name)[0] == 0


def test_info_backing_chain_probes_backing_file_whose_parent_names_no_format(images):
    # over.qcow (given as -f qcow) stores no backing format: base.raw is probed.
    code, _msg, infos = _same(
        images, "info", "--backing-chain", "--output=json", "-f", "qcow", "over.qcow"
    )
    assert code == 0 and infos[1]["format"] == "raw"


@pytest.mark.parametrize("name", ("plain.qcow", "base.raw"))
def test_convert_snapshot_of_format_without_snapshots_is_refused_in_qemus_words(images, name):
    code, msg, _ = _same(images, "convert", "-l", "snap", "-O", "raw", name, "OUT")
    assert code == 1 and "temporarily loading" in msg


@pytest.mark.parametrize("name", NAMES[:4])
def test_convert_qcow_to_raw_writes_qemus_bytes(images, name):
    code, _msg, data = _same(images, "convert", "-O", "raw", name, "OUT")
    assert code == 0 and data.strip(b"\0")


@pytest.mark.parametrize("name", ("plain.qcow", "compressed.qcow", "over.qcow"))
def test_convert_qcow_to_qcow2_holds_the_same_data(images, tmp_path, name):
    proc = qimg_here(images, "convert", "-O", "qcow2", name, str(tmp_path / "m.qcow2"))
    assert proc.returncode == 0, proc.stderr
    qemu_in(images, "qemu-img", "compare", "-q", name, str(tmp_path / "m.qcow2"), check=True)


def test_qcow_is_probed_and_taken_with_format_option(images):
    assert _same(images, "convert", "-f", "qcow", "-O", "raw", "compressed.qcow", "OUT")[0] == 0
    assert _same(images, "info", "--output=json", "-f", "qcow", "plain.qcow")[0] == 0
    name = f"json:{json.dumps({'driver': 'qcow', 'file': {'filename': 'plain.qcow'}})}"
    assert _same(images, "convert", "-O", "raw", name, "OUT")[0] == 0


# --- check, create and encryption ----------------------------------------------------


@pytest.mark.parametrize("extra", ((), ("-r", "all"), ("-r", "leaks")))
def test_check_of_qcow_image_exits_63_as_qemu_says_no_checks(images, extra):
    code, msg, _ = _same(images, "check", *extra, "plain.qcow")
    assert code == 63 and msg


@pytest.mark.parametrize("args", (("check",), ("convert", "-O", "raw")))
def test_encrypted_qcow_without_key_is_refused_as_qemu_refuses(images, args):
    cmd = (*args, "enc.qcow", "OUT") if args[0] == "convert" else (*args, "enc.qcow")
    code, msg, _ = _same(images, *cmd)
    assert code == 1 and "encrypt.key-secret" in msg
    assert not (images / "qimg.raw").exists()


def test_create_qcow_is_refused_in_one_line_and_writes_nothing(tmp_path):
    for args in (("create", "-f", "qcow", "n.qcow", "1M"), ("convert", "-O", "qcow")):
        if args[0] == "convert":
            qemu_in(tmp_path, "qemu-img", "create", "-q", "-f", "raw", "s.raw", "1M", check=True)
            args = (*args, "s.raw", "n.qcow")
        proc = qimg_here(tmp_path, *args)
        assert proc.returncode == 1
        assert len(proc.stderr.splitlines()) == 1
        assert "qcow images can be read but not created by qimg" in proc.stderr
        assert not (tmp_path / "n.qcow").exists()


def test_convert_into_existing_qcow_is_refused_in_one_line_and_writes_nothing(images, tmp_path):
    shutil.copyfile(images / "plain.qcow", tmp_path / "t.qcow")
    before = (tmp_path / "t.qcow").read_bytes()
    proc = qimg_here(tmp_path, "convert", "-n", "-O", "qcow", str(images / "base.raw"), "t.qcow")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["qimg: qcow images can be read but not written by qimg"]
    assert (tmp_path / "t.qcow").read_bytes() == before


def test_qcow_create_options_help_matches_qemu(tmp_path):
    q = qemu_in(tmp_path, "qemu-img", "create", "-f", "qcow", "-o", "help", check=True)
    m = qimg_here(tmp_path, "create", "-f", "qcow", "-o", "help")
    assert (m.returncode, m.stdout) == (0, q.stdout)


# --- damaged headers -----------------------------------------------------------------

HEADER_DAMAGE = {
    "size_1": {"size": 1},
    "size_0": {"size": 0},
    "size_2_is_empty": {"size": 2},
    "size_not_sector_multiple": {"size": 1000},
    "cluster_bits_8": {"cluster_bits": 8},
    "cluster_bits_17": {"cluster_bits": 17},
    "l2_bits_5": {"l2_bits": 5},
    "l2_bits_14": {"l2_bits": 14},
    "crypt_method_2": {"crypt_method": 2},
    "crypt_method_2_and_cluster_bits_8": {"crypt_method": 2, "cluster_bits": 8},
    "aes_and_size_1": {"crypt_method": 1, "size": 1},
    "size_u64_max": {"size": (1 << 64) - 1},
    "size_l1_past_int_max": {"size": 1 << 56},
    "l1_past_request_limit": {"l1_table_offset": 0x7FFFFFFFBFFFFFFF},
    "l1_just_inside_request_limit": {"l1_table_offset": 0x7FFFFFFFBFFFFFF0},
    "l1_past_eof": {"l1_table_offset": 0x100000},
    "l1_unaligned": {"l1_table_offset": 1},
    "backing_name_too_long": {"backing_file_offset": 0x100, "backing_file_size": 1024},
    "backing_name_past_eof": {"backing_file_offset": 0x100000, "backing_file_size": 10},
    "backing_name_past_request_limit": {
        "backing_file_offset": 0x7FFFFFFFFFFFFF00,
        "backing_file_size": 10,
    },
    "version_0_with_f_qcow": {"version": 0},
    "version_2": {"version": 2},
    "version_3": {"version": 3},
    "version_5": {"version": 5},
    "magic_0_with_f_qcow": {"magic": 0},
}


@pytest.mark.parametrize("case", HEADER_DAMAGE, ids=list(HEADER_DAMAGE))
def test_damaged_qcow_header_is_judged_as_qemu_judges_it(images, tmp_path, case):
    name = _copy(images, tmp_path, "plain.qcow", **HEADER_DAMAGE[case])
    fmt = ("-f", "qcow") if "with_f_qcow" in case or case.startswith("version_") else ()
    _same(tmp_path, "info", "--output=json", *fmt, name)
    _same(tmp_path, "convert", *fmt, "-O", "raw", name, "OUT")
    _same(tmp_path, "check", *fmt, name)


def test_qcow2_image_opened_as_qcow_gets_qemus_two_line_hint(tmp_path):
    qemu_in(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "t.qcow2", "1M", check=True)
    code, msg, _ = _same(tmp_path, "info", "-f", "qcow", "t.qcow2")
    assert code == 1 and msg.endswith("Try the 'qcow2' driver instead.")


def test_large_l1_table_mostly_past_eof_is_read_without_allocating_it(images, tmp_path):
    # 8 Mi L1 entries (64 MiB), all but the first past the end of the file.
    name = _copy(images, tmp_path, "plain.qcow", size=(1 << 23) << 21)
    assert _same(tmp_path, "info", "--output=json", name)[0] == 0


# --- damaged tables ------------------------------------------------------------------

# (image, offset of a u64 in it, value): L1 entry of plain.qcow at 48, its
# L2 table at 0x1000; compressed.qcow's L2 table at 0x1000.
TABLE_DAMAGE = {
    "compressed_offset_unaligned": ("compressed.qcow", 0x1000, 0x80B0000000002001),
    "compressed_size_too_small": ("compressed.qcow", 0x1000, 0x8010000000002000),
    "compressed_past_eof": ("compressed.qcow", 0x1000, 0x80B0000000F00000),
    "compressed_size_0": ("compressed.qcow", 0x1000, 0x8000000000002000),
    "compressed_all_ones": ("compressed.qcow", 0x1000, (1 << 64) - 1),
    "l2_table_past_eof": ("plain.qcow", 48, 0x100000),
    "l2_table_past_request_limit": ("plain.qcow", 48, 0x7FFFFFFFFFFF0000),
    "l2_table_unaligned": ("plain.qcow", 48, 0x1001),
    "data_cluster_unaligned": ("plain.qcow", 0x1000, 0x2001),
    "data_cluster_sector_aligned": ("plain.qcow", 0x1000, 0x2200),
    "data_cluster_past_eof": ("plain.qcow", 0x1000, 0x100000),
    "data_cluster_past_request_limit": ("plain.qcow", 0x1000, 0x7FFFFFFFFFFFF000),
    "data_cluster_shared": ("plain.qcow", 0x1008, 0x2000),
}


@pytest.mark.parametrize("case", TABLE_DAMAGE, ids=list(TABLE_DAMAGE))
def test_damaged_qcow_tables_read_as_qemu_reads(images, tmp_path, case):
    image, offset, value = TABLE_DAMAGE[case]
    name = _copy(images, tmp_path, image)
    _poke_u64(tmp_path / name, offset, value)
    _same(tmp_path, "convert", "-O", "raw", name, "OUT")
    _same(tmp_path, "convert", "-S", "0", "-O", "raw", name, "OUT")


@pytest.mark.parametrize("cluster_size", ("512", "64k"))
def test_qcow2_image_with_version_1_is_read_as_qcow_as_qemu_reads_it(tmp_path, cluster_size):
    qemu_in(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o",
            f"compat=0.10,cluster_size={cluster_size}", "t.qcow2", "1M", check=True)  # fmt: skip
    qemu_in(tmp_path, "qemu-io", "-c", "write -P 0x41 0 64k", "t.qcow2", check=True)
    with open(tmp_path / "t.qcow2", "r+b") as f:
        f.seek(4)
        f.write((1).to_bytes(4, "big"))
    for args in (("info", "--output=json"), ("check",), ("convert", "-O", "raw")):
        tail = ("t.qcow2", "OUT") if args[0] == "convert" else ("t.qcow2",)
        _same(tmp_path, *args, *tail)


def test_compressed_qcow2_over_compressed_qcow_converts_to_qemus_bytes(images, tmp_path):
    shutil.copyfile(images / "compressed.qcow", tmp_path / "compressed.qcow")
    qemu_in(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k",
            "-b", "compressed.qcow", "-F", "qcow", "t.qcow2", check=True)  # fmt: skip
    writes = [f"write -c -P 0x{i + 1:02x} {i * 8}k 4k" for i in range(40)]
    qemu_in(tmp_path, "qemu-io", *(a for w in writes for a in ("-c", w)), "t.qcow2", check=True)
    code, _msg, data = _same(tmp_path, "convert", "-O", "raw", "t.qcow2", "OUT")
    assert code == 0 and data.count(0x5A) == 32 * 1024
