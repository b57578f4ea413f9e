"""A CBC decryption cut into pieces over the crypto pool (split=True, runs
of two SPLIT_PIECEs or more) gives the bytes of the same decryption in the
calling thread, into another buffer, in place, and into an overlapping
buffer; and reads of a legacy AES image that qemu-img made give its data."""

from __future__ import annotations

import os

import pytest

import qimg as qimg_lib
from qimg.crypto import sectors
from qimg.crypto.sectors import SECTOR_SIZE, SPLIT_PIECE, qcow_aes_cipher, sector_cipher
from tests.conftest import qimg, run

SECRET = b"split-pass"


@pytest.fixture
def many_cores(monkeypatch):
    """Pieces as on a machine of three cores, whatever this one has."""
    monkeypatch.setattr(sectors.os, "cpu_count", lambda: 3)


def _ciphers():
    yield qcow_aes_cipher(SECRET)
    yield sector_cipher("aes-256", "cbc", "essiv", "sha256", bytes(range(32)))


@pytest.mark.parametrize("length", [2 * SPLIT_PIECE, 3 * SPLIT_PIECE + 7 * SECTOR_SIZE])
def test_split_cbc_decryption_matches_one_thread(many_cores, length):
    plain = os.urandom(length)
    for cipher in _ciphers():
        secret = bytes(cipher.encrypt(12345, plain))
        one = cipher.decrypt(12345, secret, split=False)
        assert bytes(one) == plain
        assert bytes(cipher.decrypt(12345, secret)) == plain
        buf = bytearray(secret)
        assert cipher.decrypt(12345, buf, out=buf) is buf
        assert bytes(buf) == plain
        # Output overlapping the input one sector further on.
        wide = bytearray(SECTOR_SIZE) + bytearray(secret)
        view = memoryview(wide)
        cipher.decrypt(12345, view[SECTOR_SIZE:], out=view[: len(secret)])
        assert bytes(view[: len(secret)]) == plain


def test_split_cbc_reads_of_qemu_aes_image_match_its_data(tmp_path, many_cores):
    size = 4 * SPLIT_PIECE
    data = os.urandom(size)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    path = tmp_path / "aes.qcow2"
    opts = ["--object", f"secret,id=sec,data={SECRET.decode()}"]
    run(["qemu-img", "convert", *opts, "-O", "qcow2", "-o",
         "encrypt.format=aes,encrypt.key-secret=sec", str(src), str(path)])  # fmt: skip
    name = (
        f'json:{{"driver": "qcow2", "file": {{"filename": "{path}"}}, "encrypt.key-secret": "sec"}}'
    )
    with qimg_lib.open_image(name, secrets={"sec": SECRET}) as img:
        buf = bytearray(size)  # one read: mapped, cut into three pieces
        img.readinto(0, buf)
        assert bytes(buf) == data
        part = bytearray(2 * SPLIT_PIECE + SECTOR_SIZE)  # unaligned: read, then decrypted
        img.readinto(SECTOR_SIZE - 3, part)
        assert bytes(part) == data[SECTOR_SIZE - 3 : SECTOR_SIZE - 3 + len(part)]
    out = tmp_path / "out.raw"
    qimg("convert", *opts, "--image-opts",
         f"driver=qcow2,encrypt.key-secret=sec,file.filename={path}", "-O", "raw", str(out))  # fmt: skip
    assert out.read_bytes() == data
