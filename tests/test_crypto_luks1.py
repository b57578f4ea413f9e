"""LUKS1 volumes made by qimg open in qemu-img and the reverse; options,
refusals and key slot edits in qemu-img's words."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run, run_timing_pbkdf

from qimg.crypto import luks1
from qimg.crypto.luks1 import LuksParams
from qimg.errors import BadOptionError, InvalidImageError

SECRET = ["--object", "secret,id=s,data=pw"]


def _qemu_create(path, opts: str = "") -> None:
    """qemu-img create -f luks (run_timing_pbkdf)."""
    run_timing_pbkdf(
        ["qemu-img", "create", "-q", "-f", "luks", *SECRET, "-o",
         f"key-secret=s,iter-time=10{opts}", str(path), "1M"]
    )  # fmt: skip


def _reader(data: bytes):
    return lambda offset, length: data[offset : offset + length]


def _qemu_read(path, tmp_path) -> bytes:
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", *SECRET, "--image-opts",
         f"driver=luks,key-secret=s,file.filename={path}", "-O", "raw", str(out)])  # fmt: skip
    return out.read_bytes()


COMBOS = [
    LuksParams(iter_time_ms=10),
    LuksParams("aes-128", "cbc", "essiv", "sha256", "sha1", 10),
    LuksParams("aes-192", "xts", "plain", None, "sha512", 10),
    LuksParams("cast5-128", "cbc", "essiv", "md5", "md5", 10),
]


@pytest.mark.parametrize("params", COMBOS, ids=lambda p: f"{p.cipher_alg}-{p.cipher_mode}")
def test_volume_made_by_qimg_is_read_by_qemu(params, tmp_path, qemu_img):
    volume, master_key = luks1.format_volume(b"pw", params)
    assert len(volume) == luks1.header_length(params)
    unlocked = luks1.unlock(_reader(volume), b"pw")
    assert unlocked.master_key == master_key
    data = os.urandom(256 << 10)
    path = tmp_path / "v.luks"
    path.write_bytes(volume + bytes(unlocked.cipher().encrypt(0, data)))
    assert _qemu_read(path, tmp_path) == data
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    expected = {k: v for k, v in unlocked.info.items() if k != "format"}  # qcow2's key
    assert info["format-specific"]["data"] == expected


@pytest.mark.parametrize(
    "opts",
    ["", ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
     ",cipher-alg=aes-256,cipher-mode=ctr,ivgen-alg=plain"],
)  # fmt: skip
def test_volume_made_by_qemu_is_unlocked_by_qimg(opts, tmp_path, qemu_io):
    path = tmp_path / "q.luks"
    _qemu_create(path, opts)
    run(["qemu-io", *SECRET, "--image-opts", f"driver=luks,key-secret=s,file.filename={path}",
         "-c", "write -P 0x5a 4096 8192"])  # fmt: skip
    raw = path.read_bytes()
    unlocked = luks1.unlock(_reader(raw), b"pw")
    payload = raw[unlocked.payload_offset :]
    plain = bytes(unlocked.cipher().decrypt(0, payload))
    assert plain[4096:12288] == b"\x5a" * 8192
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    assert unlocked.payload_offset == info["format-specific"]["data"]["payload-offset"]
    with pytest.raises(InvalidImageError, match="^Invalid password, cannot unlock any keyslot$"):
        luks1.unlock(_reader(raw), b"wrong")


def test_header_length_is_qemus_payload_offset(tmp_path, qemu_img):
    for opts, params in [
        ("", LuksParams()),
        (",cipher-alg=aes-128,cipher-mode=cbc", LuksParams("aes-128", "cbc")),
        (",cipher-alg=cast5-128,cipher-mode=cbc", LuksParams("cast5-128", "cbc")),
    ]:
        _qemu_create(tmp_path / "h.luks", opts)
        info = json.loads(
            run(["qemu-img", "info", "--output=json", str(tmp_path / "h.luks")]).stdout
        )
        assert luks1.header_length(params) == info["format-specific"]["data"]["payload-offset"]


def test_truncated_key_material_reads_as_zeros_and_does_not_unlock():
    volume, _ = luks1.format_volume(b"pw", LuksParams(iter_time_ms=10))
    with pytest.raises(InvalidImageError, match="^Invalid password, cannot unlock any keyslot$"):
        luks1.unlock(_reader(volume[:100000]), b"pw")


def test_afsplit_round_trip_with_a_truncated_last_digest():
    key = os.urandom(32)  # sha1: pieces of 20 and 12 bytes
    material = luks1.afsplit_encode("sha1", key, 50)
    assert len(material) == 32 * 50
    assert luks1.afsplit_decode("sha1", material, 32, 50) == key


def test_luks_options_parse_with_qemu_defaults_and_messages():
    params = luks1.parse_luks_options({"encrypt.ivgen-alg": "essiv"}, "encrypt.")
    assert params == LuksParams(ivgen_alg="essiv", ivgen_hash_alg="sha256")
    with pytest.raises(
        BadOptionError, match="^Parameter 'cipher-alg' does not accept value 'sm4'$"
    ):
        luks1.parse_luks_options({"encrypt.cipher-alg": "sm4"}, "encrypt.")
    with pytest.raises(BadOptionError, match="^Parameter 'encrypt.iter-time' expects a number$"):
        luks1.parse_luks_options({"encrypt.iter-time": "x"}, "encrypt.")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (LuksParams("des"), "Algorithm 'des' not supported"),
        (LuksParams("twofish-256"), "Unsupported cipher algorithm twofish-256"),
        (LuksParams("cast5-128", "xts"), "Unsupported cipher mode xts"),
        (LuksParams(ivgen_alg="essiv", ivgen_hash_alg="sha1"), "No AES cipher with key size 20 available"),
        (LuksParams("cast5-128", "cbc", "essiv", "sha256"), "Cipher cast5-128 not supported with essiv"),
    ],
)  # fmt: skip
def test_volumes_qemu_or_qimg_cannot_make_are_refused(params, message):
    with pytest.raises(BadOptionError, match=f"^{message}$"):
        luks1.check_params(params)


def test_aes_192_outside_xts_is_refused_as_qemu_cannot_open_it():
    """QEMU 7.2 aborts on key material that is not whole sectors."""
    with pytest.raises(BadOptionError, match="not a whole number of sectors"):
        luks1.check_params(LuksParams("aes-192", "cbc"))
