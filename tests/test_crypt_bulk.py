"""Bulk decryption (whole runs of sectors in a few calls) reads what
qemu-img reads: images made and filled by qemu-img/qemu-io (legacy AES,
LUKS qcow2 with XTS and CBC, the luks format), read back by qimg in runs
of many sector counts, at offsets that are not cluster aligned, across
clusters stored out of guest order and into the partial cluster at the
image's end, compared with qemu-img's own read-back; and the sector
ciphers' decryption against `cryptography` sector by sector, in place,
into another buffer and into an overlapping one."""

from __future__ import annotations

import json
import random
import sys

import pytest
from conftest import run, run_timing_pbkdf
from cryptography.hazmat.decrepit.ciphers import algorithms as decrepit
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import qimg
from qimg.crypto.sectors import qcow_aes_cipher, sector_cipher

SECRET = "bulk-s3cret"
KiB, MiB = 1 << 10, 1 << 20
# Not a whole number of clusters: the last cluster is partly in the image.
SIZE = 3 * MiB + 5 * 512
OBJECT = ["--object", f"secret,id=sec,data={SECRET}"]

QCOW2_CASES = {
    "aes": "encrypt.format=aes",
    "aes-v2": "encryption=on,compat=0.10,cluster_size=4096",
    "luks-xts": "encrypt.format=luks,encrypt.iter-time=10",
    "luks-cbc-essiv": (
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,"
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,"
        "cluster_size=16384"
    ),
    "luks-cbc-plain": (
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain"
    ),
}

# (offset, length) reads: sector counts 1, 2, 31, 33, 2049 and more, heads
# and tails inside a sector, runs across cluster boundaries, up to the end.
READS = [
    (0, 512),
    (512, 1024),
    (7 * 512, 31 * 512),
    (65536 - 512, 33 * 512),
    (100, 1),
    (511, 2),
    (65536 - 3, 70000),
    (4096 * 3 + 17, 2049 * 512 + 5),
    (MiB - 1000, 2 * MiB + 999),
    (SIZE - 5 * 512, 5 * 512),
    (SIZE - 700, 700),
    (SIZE - 65536 - 1, 65536 + 1),
    (0, SIZE),
]


def _qemu(*args):
    return run(["qemu-img", *map(str, args)])


def _qemu_encrypting(*args):
    """_qemu for a command that creates a LUKS image (run_timing_pbkdf)."""
    return run_timing_pbkdf(["qemu-img", *map(str, args)])


def _qemu_read(path, opts: str, tmp_path) -> bytes:
    out = tmp_path / "oracle.raw"
    _qemu("convert", *OBJECT, "--image-opts", f"{opts},file.filename={path}", "-O", "raw", out)
    data = out.read_bytes()
    out.unlink()
    return data


def _source(tmp_path) -> str:
    """Random data with zeros in it (qemu-img leaves those unallocated)."""
    rng = random.Random(13)
    data = bytearray(rng.randbytes(SIZE))
    data[MiB : MiB + 3 * 65536] = bytes(3 * 65536)
    data[2 * MiB + 512 : 2 * MiB + 4096] = bytes(4096 - 512)
    path = tmp_path / "src.raw"
    path.write_bytes(data)
    return str(path)


def _scatter(qemu_io: str, path, opts: str, tmp_path) -> None:
    """qemu-io rewrites pieces of the image back to front, and fills the
    hole: clusters then lie out of guest order in the file."""
    pattern = tmp_path / "pattern"
    pattern.write_bytes(random.Random(7).randbytes(200 * KiB))
    rng = random.Random(11)
    cmds = []
    for _ in range(10):
        offset = rng.randrange(0, SIZE - 70000) // 512 * 512
        cmds.append(f"write -s {pattern} {offset} {rng.randrange(1, 137) * 512}")
    cmds.append(f"write -s {pattern} {MiB + 65536 + 1536} {66 * 512}")
    cmds.append(f"write -s {pattern} {SIZE - 3 * 512} {3 * 512}")
    args = [a for c in reversed(cmds) for a in ("-c", c)]
    run([qemu_io, *OBJECT, "--image-opts", f"{opts},file.filename={path}", *args])


def _check_reads(name: str, oracle: bytes) -> None:
    with qimg.open_image(name, secrets={"sec": SECRET.encode()}) as img:
        assert img.size == len(oracle)
        for offset, length in READS:
            assert img.read(offset, length) == oracle[offset : offset + length], (offset, length)
        buf = bytearray(3 * 65536)
        img.readinto(65536 + 512, buf)
        assert buf == oracle[65536 + 512 : 65536 + 512 + len(buf)]


def _assert_qimg_reads(path, opts: str, name: dict, oracle: bytes, tmp_path) -> None:
    """qimg's convert to raw of `path` (`opts` in --image-opts), and its
    reads through the json: name `name`, give `oracle`."""
    out = tmp_path / "qimg.raw"
    run([sys.executable, "-m", "qimg", "convert", *OBJECT, "--image-opts",
         f"{opts},file.filename={path}", "-O", "raw", str(out)])  # fmt: skip
    assert out.read_bytes() == oracle
    _check_reads("json:" + json.dumps(name), oracle)


@pytest.mark.parametrize("case", sorted(QCOW2_CASES))
def test_qimg_reads_a_qemu_made_encrypted_qcow2_as_qemu_img_does(qemu_img, qemu_io, tmp_path, case):
    path = tmp_path / "enc.qcow2"
    _qemu_encrypting("convert", *OBJECT, "-O", "qcow2", "-o",
                     f"{QCOW2_CASES[case]},encrypt.key-secret=sec", _source(tmp_path), path)  # fmt: skip
    opts = "driver=qcow2,encrypt.key-secret=sec"
    _scatter(qemu_io, path, opts, tmp_path)
    oracle = _qemu_read(path, opts, tmp_path)
    assert len(oracle) == SIZE
    name = {"driver": "qcow2", "file": {"filename": str(path)}, "encrypt.key-secret": "sec"}
    _assert_qimg_reads(path, opts, name, oracle, tmp_path)


@pytest.mark.parametrize("cipher", ["aes-256-xts", "aes-128-cbc"])
def test_qimg_reads_a_qemu_made_luks_volume_as_qemu_img_does(qemu_img, qemu_io, tmp_path, cipher):
    alg, mode = cipher.rsplit("-", 1)
    path = tmp_path / "vol.luks"
    _qemu_encrypting("convert", *OBJECT, "-O", "luks", "-o",
                     f"key-secret=sec,iter-time=10,cipher-alg={alg},cipher-mode={mode}",
                     _source(tmp_path), path)  # fmt: skip
    opts = "driver=luks,key-secret=sec"
    _scatter(qemu_io, path, opts, tmp_path)
    oracle = _qemu_read(path, opts, tmp_path)
    name = {"driver": "luks", "file": {"filename": str(path)}, "key-secret": "sec"}
    _assert_qimg_reads(path, opts, name, oracle, tmp_path)


# --- the sector ciphers against cryptography, sector by sector -------------------

SECTOR_COUNTS = [1, 2, 3, 33, 2049, 4100]


def _by_sector(algorithm, mode_of_iv, ivs, data: bytes) -> bytes:
    out = b""
    for i, iv in enumerate(ivs):
        ctx = Cipher(algorithm, mode_of_iv(iv)).decryptor()
        out += ctx.update(data[i * 512 : (i + 1) * 512]) + ctx.finalize()
    return out


def _plain64(first: int, n: int, block: int) -> list[bytes]:
    return [(first + i).to_bytes(8, "little").ljust(block, b"\0") for i in range(n)]


@pytest.mark.parametrize("n", SECTOR_COUNTS)
def test_legacy_aes_decrypts_runs_as_cbc_sector_by_sector(n):
    cipher = qcow_aes_cipher(b"bulk-s3cret")
    key = b"bulk-s3cret".ljust(16, b"\0")
    first = (1 << 33) + 5  # IVs past 32 bits
    data = random.Random(n).randbytes(n * 512)
    want = _by_sector(algorithms.AES(key), modes.CBC, _plain64(first, n, 16), data)
    assert bytes(cipher.decrypt(first, data)) == want
    buf = bytearray(data)
    cipher.decrypt(first, buf, out=buf)
    assert buf == want
    out = bytearray(n * 512)
    assert cipher.decrypt(first, memoryview(data), out=memoryview(out)) is not None
    assert out == want


@pytest.mark.parametrize("shift", [-512, 512, 16])
def test_cbc_decrypts_into_an_overlapping_buffer(shift):
    n = 40
    cipher = qcow_aes_cipher(b"overlap")
    data = random.Random(shift).randbytes(n * 512)
    want = bytes(cipher.decrypt(9, data))
    room = bytearray(n * 512 + 1024)
    at = 512
    room[at : at + n * 512] = data
    view = memoryview(room)
    cipher.decrypt(9, view[at : at + n * 512], out=view[at + shift : at + shift + n * 512])
    assert room[at + shift : at + shift + n * 512] == want


@pytest.mark.parametrize("ivgen", ["plain", "plain64", "essiv"])
@pytest.mark.parametrize("alg", ["aes-256", "cast5-128"])
@pytest.mark.parametrize("n", [1, 3, 2049])
def test_cbc_decrypts_runs_with_every_ivgen_as_sector_by_sector(ivgen, alg, n):
    import hashlib

    key = bytes(range(32 if alg == "aes-256" else 16))
    family = alg.split("-")[0]
    block = 16 if family == "aes" else 8
    make = algorithms.AES if family == "aes" else decrepit.CAST5
    first = 0xFFFFFFFF - 1  # plain wraps at 32 bits
    hash_alg = "sha256" if family == "aes" else "md5"  # digest as long as the key
    ivs = _plain64(first, n, block)
    if ivgen == "plain":
        ivs = [
            ((first + i) & 0xFFFFFFFF).to_bytes(4, "little").ljust(block, b"\0") for i in range(n)
        ]
    elif ivgen == "essiv":
        ecb = Cipher(make(hashlib.new(hash_alg, key).digest()), modes.ECB()).encryptor()
        ivs = [ecb.update(iv) for iv in ivs]
    cipher = sector_cipher(alg, "cbc", ivgen, hash_alg, key)
    data = random.Random(n).randbytes(n * 512)
    want = _by_sector(make(key), modes.CBC, ivs, data)
    buf = bytearray(data)
    cipher.decrypt(first, buf, out=buf)
    assert buf == want


@pytest.mark.parametrize("mode", ["xts", "cbc", "ctr", "ecb"])
def test_decryption_in_the_calling_thread_equals_the_pools(mode):
    key = bytes(range(64 if mode == "xts" else 32))
    cipher = sector_cipher("aes-256", mode, "plain64", None, key)
    n = 2 * 2048 + 7  # more than one of the pool's chunks
    data = random.Random(mode).randbytes(n * 512)
    pooled = bytes(cipher.decrypt(3, data))
    assert bytes(cipher.decrypt(3, data, split=False)) == pooled
    buf = bytearray(data)
    cipher.decrypt(3, buf, out=buf, split=False)
    assert buf == pooled
    assert bytes(cipher.encrypt(3, pooled)) == data
