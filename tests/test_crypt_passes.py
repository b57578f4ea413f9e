"""Encrypted reads of whole sectors decrypt from a mapping of the data file
straight into the caller's buffer (qcow2's DataIO.read and the luks
format's readinto, through Storage.mapped); shorter reads, reads that
start or end inside a sector, and ranges the file does not hold in full
are read into a buffer and decrypted there. Both ways read what qemu-img
reads, for legacy AES (CBC, IV from the guest sector), LUKS qcow2 (XTS,
and CBC with essiv; IV from the host sector) and LUKS volumes (XTS, CBC),
at sector ranges of odd lengths and offsets, across clusters qemu-io
wrote out of guest order."""

from __future__ import annotations

import json
import random
import sys

import pytest
from conftest import run, run_timing_pbkdf

import qimg
from qimg.crypto.sectors import MAPPED_READ
from qimg.storage import FileStorage

SECRET = "passes-s3cret"
OBJECT = ["--object", f"secret,id=sec,data={SECRET}"]
KiB, MiB = 1 << 10, 1 << 20
SIZE = 2 * MiB + 7 * 512  # the last cluster partly in the image
CASES = {
    "aes": "encrypt.format=aes",
    "luks-xts": "encrypt.format=luks,encrypt.iter-time=10",
    "luks-cbc-essiv": (
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,"
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256"
    ),
}
MAPPED = MAPPED_READ
# (offset, length) whole-sector reads at least MAPPED_READ long, at odd
# sector offsets and counts, up to the image's end; and two that are not
# whole sectors (read into a buffer whatever their length).
READS = [
    (0, MAPPED),
    (7 * 512, MAPPED + 13 * 512),
    (65536 - 512, 2 * MAPPED + 512),
    (3 * 65536 + 33 * 512, MAPPED + 2049 * 512),
    (SIZE - MAPPED - 5 * 512, MAPPED + 5 * 512),
    (0, SIZE),
    (100, MAPPED + 1),
    (SIZE - MAPPED - 3, MAPPED + 3),
]


def _qemu_encrypting(*args) -> None:
    """qemu-img creating a LUKS image (run_timing_pbkdf)."""
    run_timing_pbkdf(["qemu-img", *map(str, args)])


def _image(tmp_path, case: str) -> tuple[str, bytes]:
    """A qemu-made encrypted qcow2 image of random data, pieces rewritten
    by qemu-io back to front (clusters out of guest order), its json:
    name for qimg, and the guest data as qemu-img reads it."""
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(case).randbytes(SIZE))
    path = tmp_path / "enc.qcow2"
    _qemu_encrypting("convert", *OBJECT, "-O", "qcow2", "-o",
                     f"{CASES[case]},encrypt.key-secret=sec", src, path)  # fmt: skip
    opts = f"driver=qcow2,encrypt.key-secret=sec,file.filename={path}"
    pattern = tmp_path / "pattern"
    pattern.write_bytes(random.Random(5).randbytes(400 * KiB))
    writes = [(MiB + 3 * 512, 700 * 512), (65536 + 512, 300 * 512), (SIZE - 3 * 512, 3 * 512)]
    cmds = [a for off, n in writes for a in ("-c", f"write -s {pattern} {off} {n}")]
    run(["qemu-io", *OBJECT, "--image-opts", opts, *cmds])
    out = tmp_path / "oracle.raw"
    run(["qemu-img", "convert", *OBJECT, "--image-opts", opts, "-O", "raw", str(out)])
    name = {"driver": "qcow2", "file": {"filename": str(path)}, "encrypt.key-secret": "sec"}
    return "json:" + json.dumps(name), out.read_bytes()


def _counting_maps(monkeypatch, allow: bool = True) -> list:
    """Storage.mapped spied on: the lengths it mapped (none if not `allow`)."""
    mapped = []
    real = FileStorage.mapped

    def spy(self, offset, length):
        if not allow:
            return None
        view = real(self, offset, length)
        if view is not None:
            mapped.append(length)
        return view

    monkeypatch.setattr(FileStorage, "mapped", spy)
    return mapped


def _reads(name: str, oracle: bytes) -> None:
    with qimg.open_image(name, secrets={"sec": SECRET.encode()}) as img:
        assert img.size == len(oracle) == SIZE
        for offset, length in READS:
            got = img.read(offset, length)
            assert got == oracle[offset : offset + length], (offset, length)
            buf = bytearray(length)
            img.readinto(offset, buf)
            assert buf == got, (offset, length)


@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_sector_reads_decrypt_from_a_mapping_as_qemu_img_reads(
    qemu_img, qemu_io, tmp_path, monkeypatch, case
):
    name, oracle = _image(tmp_path, case)
    mapped = _counting_maps(monkeypatch)
    _reads(name, oracle)
    assert mapped and min(mapped) >= MAPPED


@pytest.mark.parametrize("case", sorted(CASES))
def test_reads_decrypt_in_a_buffer_where_the_file_cannot_be_mapped(
    qemu_img, qemu_io, tmp_path, monkeypatch, case
):
    name, oracle = _image(tmp_path, case)
    _counting_maps(monkeypatch, allow=False)
    _reads(name, oracle)


@pytest.mark.parametrize("case", ["aes", "luks-xts"])
def test_convert_of_an_encrypted_qcow2_reads_what_qemu_img_reads(qemu_img, qemu_io, tmp_path, case):
    name, oracle = _image(tmp_path, case)
    out = tmp_path / "qimg.raw"
    path = json.loads(name[5:])["file"]["filename"]
    run([sys.executable, "-m", "qimg", "convert", *OBJECT, "--image-opts",
         f"driver=qcow2,encrypt.key-secret=sec,file.filename={path}", "-O", "raw", str(out)])  # fmt: skip
    assert out.read_bytes() == oracle


@pytest.mark.parametrize("cipher", ["aes-256-xts", "aes-128-cbc"])
@pytest.mark.parametrize("mapping", [True, False])
def test_a_luks_volume_reads_from_a_mapping_or_a_buffer_as_qemu_img_reads(
    qemu_img, tmp_path, monkeypatch, cipher, mapping
):
    alg, mode = cipher.rsplit("-", 1)
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(cipher).randbytes(SIZE))
    path = tmp_path / "vol.luks"
    _qemu_encrypting("convert", *OBJECT, "-O", "luks", "-o",
                     f"key-secret=sec,iter-time=10,cipher-alg={alg},cipher-mode={mode}",
                     src, path)  # fmt: skip
    out = tmp_path / "oracle.raw"
    run(["qemu-img", "convert", *OBJECT, "--image-opts",
         f"driver=luks,key-secret=sec,file.filename={path}", "-O", "raw", str(out)])  # fmt: skip
    name = {"driver": "luks", "file": {"filename": str(path)}, "key-secret": "sec"}
    mapped = _counting_maps(monkeypatch, allow=mapping)
    _reads("json:" + json.dumps(name), out.read_bytes())
    assert bool(mapped) == mapping
