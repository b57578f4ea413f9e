"""What info and check print, judged by the real qemu-img on crafted images.

Images are made by qemu-img/qemu-io, then fields are overwritten at offsets
computed from their own metadata (tests/damage.py). Each tool runs from the
image's directory on a relative name, so both print the same file names and
their output can be compared byte for byte (host allocation aside).
"""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import run_timing_pbkdf  # noqa: E402
from damage import Layout, write_u64  # noqa: E402
from infotools import message, qemu_in, qimg_in  # noqa: E402

from qimg.crypto import luks1  # noqa: E402
from qimg.formats.qcow2 import layout as L  # noqa: E402

U64 = (1 << 64) - 1


def _without_allocation(text: str) -> list[str]:
    """Output lines minus those that depend on host allocation."""
    return [
        ln
        for ln in text.splitlines()
        if not ln.startswith("disk size:") and '"actual-size":' not in ln
    ]


def assert_same_info(cwd: Path, name: str) -> None:
    """`info` in JSON and in text: the same bytes from both tools."""
    for output in ("json", "human"):
        want = qemu_in(cwd, "qemu-img", "info", f"--output={output}", name)
        got = qimg_in(cwd, "info", f"--output={output}", name)
        assert got.returncode == want.returncode, got.stderr
        assert message(got.stderr, "qimg") == message(want.stderr, "qemu-img")
        assert _without_allocation(got.stdout) == _without_allocation(want.stdout), output


@pytest.fixture(scope="module")
def snapshot_image(tmp_path_factory) -> Path:
    """A 1 MiB qcow2 image with one cluster written and one snapshot."""
    path = tmp_path_factory.mktemp("snap") / "base.qcow2"
    qemu_in(path.parent, "qemu-img", "create", "-q", "-f", "qcow2", path.name, "1M", check=True)
    qemu_in(path.parent, "qemu-io", "-c", "write 0 64k", path.name, check=True)
    qemu_in(path.parent, "qemu-img", "snapshot", "-c", "s1", path.name, check=True)
    return path


def _copy(src: Path, tmp_path: Path, name: str = "img.qcow2") -> Path:
    dst = tmp_path / name
    shutil.copy(src, dst)
    return dst


def _extra_data_offset(lay: Layout) -> int:
    """File offset of snapshot 0's extra data (spec: "Snapshots")."""
    return lay.snapshot_entries()[0] + L.SNAPSHOT_HEADER.size


# (field or extra-data word, value): vm_state_size_large and icount are the
# first and third u64 of the extra data.
SNAPSHOT_FIELD_CASES = {
    "icount_all_ones_is_omitted": [("icount", U64)],
    "icount_sign_bit_is_negative": [("icount", 1 << 63)],
    "vm_state_size_all_ones_is_minus_one": [
        ("vm_state_size", 0xFFFFFFFF),
        ("vm_state_size_large", U64),
    ],
    "vm_state_size_sign_bit_is_negative": [("vm_state_size_large", (1 << 63) + 1)],
    "date_zero": [("date_sec", 0), ("date_nsec", 0)],
    "date_all_ones": [("date_sec", 0xFFFFFFFF), ("date_nsec", 0xFFFFFFFF)],
    "vm_clock_all_ones": [("vm_clock_nsec", U64)],
    "vm_clock_a_thousand_hours": [("vm_clock_nsec", 3600 * 1000 * 10**9)],
}


@pytest.mark.parametrize("case", sorted(SNAPSHOT_FIELD_CASES))
def test_info_prints_unusual_snapshot_fields_as_qemu(snapshot_image, tmp_path, case):
    path = _copy(snapshot_image, tmp_path)
    lay = Layout.read(path)
    extra = _extra_data_offset(lay)
    for name, value in SNAPSHOT_FIELD_CASES[case]:
        if name == "vm_state_size_large":
            write_u64(path, extra, value)
        elif name == "icount":
            write_u64(path, extra + 16, value)
        else:
            lay.set_snapshot_field(0, name, value)
    assert_same_info(tmp_path, path.name)


def _set_snapshot_names(path: Path, id_bytes: bytes | None, name_bytes: bytes | None) -> None:
    """Rewrite snapshot 0's id and/or name (the last entry: it may change size)."""
    lay = Layout.read(path)
    pos = lay.snapshot_entries()[0]
    fields = L.SNAPSHOT_HEADER.unpack(path.read_bytes()[pos : pos + L.SNAPSHOT_HEADER.size])
    id_len, name_len, extra_len = fields[2], fields[3], fields[8]
    names = pos + L.SNAPSHOT_HEADER.size + extra_len
    with open(path, "r+b") as f:
        f.seek(names)
        old_id, old_name = f.read(id_len), f.read(name_len)
        new_id = old_id if id_bytes is None else id_bytes
        new_name = old_name if name_bytes is None else name_bytes
        f.seek(pos + 12)
        f.write(struct.pack(">HH", len(new_id), len(new_name)))
        f.seek(names)
        f.write(new_id + new_name)


SNAPSHOT_NAME_CASES = {
    "empty_name": (None, b""),
    "empty_id": (b"", None),
    "non_numeric_id": (b"x", None),
    "id_longer_than_its_column": (b"ABCDEFGHIJKL", None),
    "name_longer_than_its_column": (None, b"ABCDEFGHIJKLMNOPQRSTU"),
    "multibyte_name": (None, "\u00e9t\u00e9".encode()),
    "name_beyond_the_bmp": (None, "a\U0001f600".encode()),
    "name_with_quote_backslash_and_control": (None, b'"<\\\n\t\x7f'),
}


@pytest.mark.parametrize("case", sorted(SNAPSHOT_NAME_CASES))
def test_info_prints_unusual_snapshot_names_as_qemu(snapshot_image, tmp_path, case):
    """JSON escapes (\\uXXXX, upper-case hex) and the text table's columns,
    padded in bytes as printf pads them."""
    path = _copy(snapshot_image, tmp_path)
    _set_snapshot_names(path, *SNAPSHOT_NAME_CASES[case])
    assert_same_info(tmp_path, path.name)


def _set_u64(path: Path, offset: int, set_bits: int = 0, clear_bits: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        value = struct.unpack(">Q", f.read(8))[0]
        f.seek(offset)
        f.write(struct.pack(">Q", (value & ~clear_bits) | set_bits))


@pytest.fixture(scope="module")
def data_file_image(tmp_path_factory) -> Path:
    """An image with an external raw data file, then turned into a
    snapshot-bearing image whose extension names the data file but whose
    incompatible bit is clear (qemu-img snapshots it then)."""
    d = tmp_path_factory.mktemp("df")
    qemu_in(
        d,
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=img.raw",
        "df.qcow2",
        "1M",
        check=True,
    )
    qemu_in(d, "qemu-io", "-c", "write 0 64k", "df.qcow2", check=True)
    _set_u64(
        d / "df.qcow2", L.HEADER_OFF_INCOMPATIBLE_FEATURES, clear_bits=L.QCOW2_INCOMPAT_DATA_FILE
    )
    qemu_in(d, "qemu-img", "snapshot", "-c", "s1", "df.qcow2", check=True)
    return d / "df.qcow2"


def test_info_shows_data_file_extension_without_the_incompatible_bit(data_file_image, tmp_path):
    """qemu-img shows "data-file" from the extension alone (no data-file-raw)
    and lists the snapshots."""
    path = _copy(data_file_image, tmp_path)
    assert_same_info(tmp_path, path.name)


def test_info_lists_no_snapshots_of_an_image_with_an_external_data_file(data_file_image, tmp_path):
    path = _copy(data_file_image, tmp_path)
    shutil.copy(data_file_image.parent / "img.raw", tmp_path / "img.raw")
    _set_u64(path, L.HEADER_OFF_INCOMPATIBLE_FEATURES, set_bits=L.QCOW2_INCOMPAT_DATA_FILE)
    assert_same_info(tmp_path, path.name)


def test_info_data_file_bit_without_extension_shows_data_file_raw_only(snapshot_image, tmp_path):
    """No "data-file": null; "data-file-raw" is shown; snapshots are not."""
    path = _copy(snapshot_image, tmp_path)
    _set_u64(path, L.HEADER_OFF_INCOMPATIBLE_FEATURES, set_bits=L.QCOW2_INCOMPAT_DATA_FILE)
    assert_same_info(tmp_path, path.name)


@pytest.mark.parametrize(
    "offset,bits",
    [
        (L.HEADER_OFF_INCOMPATIBLE_FEATURES, L.QCOW2_INCOMPAT_DIRTY),
        (L.HEADER_OFF_INCOMPATIBLE_FEATURES, L.QCOW2_INCOMPAT_CORRUPT),
        (L.HEADER_OFF_COMPATIBLE_FEATURES, L.QCOW2_COMPAT_LAZY_REFCOUNTS),
        (L.HEADER_OFF_COMPATIBLE_FEATURES, 1 << 40),
        (L.HEADER_OFF_AUTOCLEAR_FEATURES, 1 << 40),
    ],
    ids=["dirty", "corrupt", "lazy_refcounts", "unknown_compatible", "unknown_autoclear"],
)
def test_info_prints_feature_bits_as_qemu(snapshot_image, tmp_path, offset, bits):
    path = _copy(snapshot_image, tmp_path)
    _set_u64(path, offset, set_bits=bits)
    assert_same_info(tmp_path, path.name)


def test_info_prints_bitmaps_with_no_flags_and_non_ascii_names_as_qemu(tmp_path):
    """An empty flags list is "[" and "]" on two lines in qemu-img's JSON."""
    qemu_in(tmp_path, "qemu-img", "create", "-q", "-f", "qcow2", "bm.qcow2", "1M", check=True)
    qemu_in(tmp_path, "qemu-img", "bitmap", "--add", "--disable", "bm.qcow2", "b0", check=True)
    qemu_in(tmp_path, "qemu-img", "bitmap", "--add", "-g", "512", "bm.qcow2", "b\u00e9", check=True)
    assert_same_info(tmp_path, "bm.qcow2")


def test_info_prints_compat_0_10_image_as_qemu(tmp_path):
    qemu_in(
        tmp_path,
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "1M",
        check=True,
    )
    qemu_in(tmp_path, "qemu-img", "snapshot", "-c", "s", "v2.qcow2", check=True)
    assert_same_info(tmp_path, "v2.qcow2")


# --- check: the repair report -------------------------------------------------------


@pytest.fixture(scope="module", params=[(65536, 16), (512, 1), (512, 64)], ids=str)
def check_image(request, tmp_path_factory) -> Path:
    """Data, a snapshot sharing it, then more data (small clusters: many
    refblocks and a reftable of more than one cluster)."""
    cluster_size, refcount_bits = request.param
    d = tmp_path_factory.mktemp("chk")
    opts = f"cluster_size={cluster_size},refcount_bits={refcount_bits}"
    qemu_in(d, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "c.qcow2", "8M", check=True)
    qemu_in(d, "qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 5M 64k", "c.qcow2", check=True)
    if refcount_bits > 1:
        qemu_in(d, "qemu-img", "snapshot", "-c", "s", "c.qcow2", check=True)
    qemu_in(d, "qemu-io", "-c", "write -P 3 512k 8k", "c.qcow2", check=True)
    return d / "c.qcow2"


def _damage(path: Path, kind: str) -> None:
    lay = Layout.read(path)
    if kind == "refcount_zero":  # too low, zero: the structure is rebuilt
        for guest in (0, 5 << 20):
            lay.set_refcount(lay.data_cluster(guest), 0)
    elif kind == "refcount_too_high":  # one too high (a leak), one too low (not zero)
        lay.set_refcount(lay.data_cluster(5 << 20), 3)
        lay.set_refcount(lay.data_cluster(0), 1)
    elif kind == "leaked":
        n = lay.file_size // lay.cluster_size
        with open(path, "ab") as f:
            f.write(b"\xaa" * lay.cluster_size * 2)
        for c in (n, n + 1):
            lay.set_refcount(c, 1)
    elif kind == "refblock_lost":  # a reftable entry cleared: rebuilt
        lay.set_reftable_entry(0, 0)
    elif kind == "refblock_lost_mid":
        lay.set_reftable_entry(1, 0)


@pytest.mark.parametrize(
    "kind,mode",
    [
        ("refcount_zero", "all"),
        ("refcount_too_high", "all"),
        ("refcount_too_high", "leaks"),
        ("leaked", "leaks"),
        ("refblock_lost", "all"),
        ("refblock_lost_mid", "all"),
    ],
)
def test_check_repair_prints_qemus_report(check_image, tmp_path, kind, mode):
    """check -r: every line qemu-img prints (Repairing cluster N refcount=R
    reference=F for the old refcount structure after a rebuild included),
    the same exit code, and a repaired image qemu-img finds the same."""
    damaged = tmp_path / "damaged.qcow2"
    shutil.copy(check_image, damaged)
    lay = Layout.read(damaged)
    if kind == "refblock_lost_mid" and lay.refblock(1) == 0:
        pytest.skip("one refcount block covers the whole image")
    if kind == "refcount_too_high" and lay.refcount_bits == 1:
        pytest.skip("a 1-bit refcount cannot be too high")
    _damage(damaged, kind)
    shutil.copy(damaged, tmp_path / "img.qcow2")
    want = qemu_in(tmp_path, "qemu-img", "check", "-r", mode, "img.qcow2")
    repaired_by_qemu = (tmp_path / "img.qcow2").read_bytes()
    shutil.copy(damaged, tmp_path / "img.qcow2")
    got = qimg_in(tmp_path, "check", "-r", mode, "img.qcow2")
    assert got.returncode == want.returncode, got.stderr[-2000:]
    assert got.stdout == want.stdout
    assert message(got.stderr, "qimg") == message(want.stderr, "qemu-img")
    # Placed where QEMU places it: the same bytes, freed clusters zeroed.
    assert (tmp_path / "img.qcow2").read_bytes() == repaired_by_qemu


# --- encrypted images: info reads the metadata without a key -----------------------


def _create_encrypted(cwd: Path, name: str, opts: str, *extra: str) -> None:
    """qemu-img create with a secret (run_timing_pbkdf)."""
    args = ["create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw"]
    run_timing_pbkdf(["qemu-img", *args, "-o", opts, *extra, name, "1M"], cwd=cwd)


ENCRYPTED_CASES = {
    "luks_xts_plain64": "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
    "luks_cbc_essiv": (
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,"
        "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
        "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512"
    ),
    "aes_compat_1_1": "encrypt.format=aes,encrypt.key-secret=s0",
    "aes_compat_0_10": "compat=0.10,encrypt.format=aes,encrypt.key-secret=s0",
}


@pytest.mark.parametrize("case", sorted(ENCRYPTED_CASES))
def test_info_describes_encrypted_image_without_its_key(snapshot_image, tmp_path, case):
    """ "encrypted": true, the "encrypt" block (LUKS slots, ciphers), and
    "encrypted: yes" in text, with a backing file for the keys' order."""
    shutil.copy(snapshot_image, tmp_path / "base.qcow2")
    _create_encrypted(
        tmp_path, "enc.qcow2", ENCRYPTED_CASES[case], "-b", "base.qcow2", "-F", "qcow2"
    )
    assert_same_info(tmp_path, "enc.qcow2")


def test_encrypted_image_data_needs_its_key(tmp_path):
    """Only info opens an encrypted image without its key; reading its
    data without one fails as qemu-img's does."""
    _create_encrypted(tmp_path, "enc.qcow2", ENCRYPTED_CASES["aes_compat_1_1"])
    got = qimg_in(tmp_path, "convert", "-O", "raw", "enc.qcow2", "out.raw")
    want = qemu_in(tmp_path, "qemu-img", "convert", "-O", "raw", "enc.qcow2", "out.raw")
    assert got.returncode == want.returncode == 1
    assert message(got.stderr, "qimg") == message(want.stderr, "qemu-img")
    assert not (tmp_path / "out.raw").exists()


def test_info_refuses_unknown_encryption_method_in_qemus_words(snapshot_image, tmp_path):
    path = _copy(snapshot_image, tmp_path)
    with open(path, "r+b") as f:
        f.seek(32)  # crypt_method
        f.write(struct.pack(">I", 3))
    assert_same_info(tmp_path, path.name)


def test_luks_method_without_crypto_extension_fails_cleanly(snapshot_image, tmp_path):
    """qemu-img info segfaults here; check says why, and so does qimg info."""
    path = _copy(snapshot_image, tmp_path)
    with open(path, "r+b") as f:
        f.seek(32)  # crypt_method
        f.write(struct.pack(">I", L.QCOW_CRYPT_LUKS))
    want = qemu_in(tmp_path, "qemu-img", "check", path.name)
    for command in ("info", "check"):
        got = qimg_in(tmp_path, command, path.name)
        assert got.returncode == 1, got.stderr
        assert message(got.stderr, "qimg") == message(want.stderr, "qemu-img")


@pytest.mark.parametrize("size", [0, 1, 1000, 70000])
def test_info_counts_a_raw_file_in_whole_sectors(tmp_path, size):
    """qemu-img reports a raw file's size rounded up to 512 bytes."""
    (tmp_path / "img.raw").write_bytes(b"\x01" * size)
    assert_same_info(tmp_path, "img.raw")


def test_info_omits_backing_format_without_a_backing_file(snapshot_image, tmp_path):
    """A backing-format extension in an image whose backing name was cleared."""
    shutil.copy(snapshot_image, tmp_path / "base.qcow2")
    qemu_in(
        tmp_path,
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        check=True,
    )
    with open(tmp_path / "top.qcow2", "r+b") as f:
        f.seek(8)  # backing_file_offset, backing_file_size
        f.write(struct.pack(">QI", 0, 0))
    assert_same_info(tmp_path, "top.qcow2")


def test_info_prints_backing_paths_as_qemu(snapshot_image, tmp_path):
    """From another directory: "(actual path: ...)" in text, the full name
    in JSON; a non-ASCII backing name escaped in JSON."""
    sub = tmp_path / "d\u00e9p\u00f4t"
    sub.mkdir()
    shutil.copy(snapshot_image, sub / "b\u00e4se.qcow2")
    qemu_in(
        sub,
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b\u00e4se.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        check=True,
    )
    assert_same_info(tmp_path, f"{sub.name}/top.qcow2")


@pytest.mark.parametrize("kind", ["refcount_zero", "refblock_lost"])
def test_check_repair_json_after_rebuild_matches_qemu(check_image, tmp_path, kind):
    """--output=json after a rebuild: the fixed counts (the old structure's
    freed clusters not counted as leaks fixed), messages, exit code."""
    damaged = tmp_path / "damaged.qcow2"
    shutil.copy(check_image, damaged)
    _damage(damaged, kind)
    results = []
    for tool in ("qemu-img", "qimg"):
        shutil.copy(damaged, tmp_path / "img.qcow2")
        args = ("check", "--output=json", "-r", "all", "img.qcow2")
        run_tool = qimg_in(tmp_path, *args) if tool == "qimg" else qemu_in(tmp_path, tool, *args)
        results.append((run_tool.returncode, run_tool.stdout, message(run_tool.stderr, tool)))
    assert results[1] == results[0]


@pytest.fixture(scope="module")
def luks_image(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("luks")
    _create_encrypted(d, "luks.qcow2", ENCRYPTED_CASES["luks_xts_plain64"])
    return d / "luks.qcow2"


_SLOTS = luks1.PHDR.size  # key slot 0; each slot is luks1.KEYSLOT.size bytes
# (offset in the LUKS header, bytes written there)
LUKS_HEADER_CASES = {
    "bad_magic": [(0, b"XXXX")],
    "version_2": [(6, b"\0\x02")],
    "unknown_cipher_mode": [(40, b"foo-plain64\0")],
    "mode_without_ivgen": [(40, b"xts\0")],
    "unknown_ivgen": [(40, b"xts-bar\0")],
    "unknown_hash": [(72, b"md7\0")],
    "essiv_without_hash": [(8, b"aes\0"), (40, b"cbc-essiv\0"), (108, struct.pack(">I", 32))],
    "essiv_hash_too_long_for_aes": [(40, b"cbc-essiv:sha512\0"), (108, struct.pack(">I", 32))],
    "plain64_ignores_its_hash": [(40, b"xts-plain64:sha1\0")],
    "unknown_cipher": [(8, b"foo\0")],
    "key_size_unusable": [(108, struct.pack(">I", 7))],
    "name_not_terminated": [(8, b"a" * 32)],
    "payload_over_header": [(104, struct.pack(">I", 4))],
    "stripes": [(_SLOTS + 44, struct.pack(">I", 5))],
    "slot_state": [(_SLOTS, struct.pack(">I", 7))],
    "slot_over_payload": [(_SLOTS + 7 * luks1.KEYSLOT.size + 40, struct.pack(">I", 100000))],
    "slots_overlap": [(_SLOTS + luks1.KEYSLOT.size + 40, struct.pack(">I", 8))],
}


@pytest.mark.parametrize("case", sorted(LUKS_HEADER_CASES))
def test_info_checks_luks_header_as_qemu(luks_image, tmp_path, case):
    """qcrypto_block_luks_open's checks without a key: the same refusal, in
    the same words, or the same description."""
    path = _copy(luks_image, tmp_path)
    header = path.read_bytes().find(luks1.MAGIC)
    with open(path, "r+b") as f:
        for offset, data in LUKS_HEADER_CASES[case]:
            f.seek(header + offset)
            f.write(data)
    assert_same_info(tmp_path, path.name)


@pytest.mark.parametrize("length", [0, 100])
def test_info_refuses_crypto_extension_shorter_than_the_luks_header(luks_image, tmp_path, length):
    path = _copy(luks_image, tmp_path)
    data = path.read_bytes()
    ext = data.find(struct.pack(">I", L.QCOW2_EXT_MAGIC_CRYPTO_HEADER))
    with open(path, "r+b") as f:
        f.seek(ext + 8 + 8)  # type, length, then offset and length of the header
        f.write(struct.pack(">Q", length))
    assert_same_info(tmp_path, path.name)
