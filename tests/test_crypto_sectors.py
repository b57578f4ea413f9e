"""The bulk sector ciphers agree with `cryptography`'s own modes applied
one 512-byte sector at a time, with QEMU's IV generators."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
from cryptography.hazmat.decrepit.ciphers import algorithms as decrepit
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qimg.crypto import sectors
from qimg.crypto.sectors import qcow_aes_cipher, sector_cipher
from qimg.errors import BadOptionError

# More sectors than one chunk, so a run crosses a chunk boundary.
SECTORS = sectors._CHUNK_SECTORS + 3


def _iv(ivgen: str, sector: int, key: bytes, block: int, family: str) -> bytes:
    if ivgen == "plain":
        return struct.pack("<I", sector & 0xFFFFFFFF).ljust(block, b"\0")
    plain64 = struct.pack("<Q", sector).ljust(block, b"\0")[:block]
    if ivgen == "plain64":
        return plain64
    salt = hashlib.sha256(key).digest() if family == "aes" else hashlib.md5(key).digest()
    algorithm = algorithms.AES(salt) if family == "aes" else decrepit.CAST5(salt)
    return Cipher(algorithm, modes.ECB()).encryptor().update(plain64)


def _xts_by_hand(key: bytes, iv: bytes, data: bytes) -> bytes:
    """IEEE 1619 XTS of one data unit, block by block (cryptography has no
    XTS for AES-192)."""
    half = len(key) // 2
    ecb1 = Cipher(algorithms.AES(key[:half]), modes.ECB()).encryptor()
    tweak = int.from_bytes(
        Cipher(algorithms.AES(key[half:]), modes.ECB()).encryptor().update(iv), "little"
    )
    out = b""
    for i in range(0, len(data), 16):
        t = tweak.to_bytes(16, "little")
        block = bytes(a ^ b for a, b in zip(data[i : i + 16], t))
        out += bytes(a ^ b for a, b in zip(ecb1.update(block), t))
        tweak = (tweak << 1) ^ (0x87 if tweak >> 127 else 0)
        tweak &= (1 << 128) - 1
    return out


def _ctr_by_hand(algorithm, iv: bytes, data: bytes) -> bytes:
    """CTR with the whole block a big-endian counter (cryptography has no
    CTR for 64-bit block ciphers)."""
    size, start = len(iv), int.from_bytes(iv, "big")
    counters = b"".join(
        ((start + j) % (1 << (8 * size))).to_bytes(size, "big") for j in range(len(data) // size)
    )
    stream = Cipher(algorithm, modes.ECB()).encryptor().update(counters)
    return bytes(a ^ b for a, b in zip(data, stream))


def _reference(family: str, mode: str, key: bytes, iv: bytes, data: bytes) -> bytes:
    if mode == "xts" and len(key) == 48:
        return _xts_by_hand(key, iv, data)
    algorithm = algorithms.AES(key) if family == "aes" else decrepit.CAST5(key)
    if mode == "ctr" and family == "cast5":
        return _ctr_by_hand(algorithm, iv, data)
    mode_obj = {"xts": modes.XTS, "cbc": modes.CBC, "ctr": modes.CTR}
    made = modes.ECB() if mode == "ecb" else mode_obj[mode](iv)
    ctx = Cipher(algorithm, made).encryptor()
    return ctx.update(data) + ctx.finalize()


def _check_against_reference(alg, mode, ivgen, hash_alg, first, count=SECTORS):
    family, key_len, block = sectors.CIPHER_ALGS[alg]
    rng = random.Random(f"{alg}{mode}{ivgen}")
    key = rng.randbytes(key_len * (2 if mode == "xts" else 1))
    data = rng.randbytes(count * 512)
    cipher = sector_cipher(alg, mode, ivgen, hash_alg, key)
    encrypted = cipher.encrypt(first, data)
    for i in sorted({0, 1, count // 2, count - 2, count - 1}):
        iv = _iv(ivgen, first + i, key, block, family)
        part = data[i * 512 : (i + 1) * 512]
        assert encrypted[i * 512 : (i + 1) * 512] == _reference(family, mode, key, iv, part)
    assert cipher.decrypt(first, encrypted) == data


@pytest.mark.parametrize("ivgen", ["plain", "plain64", "essiv"])
@pytest.mark.parametrize("mode", ["xts", "cbc", "ctr", "ecb"])
@pytest.mark.parametrize("alg", ["aes-128", "aes-192", "aes-256"])
def test_aes_sector_ciphers_match_per_sector_reference(alg, mode, ivgen):
    _check_against_reference(alg, mode, ivgen, "sha256", (1 << 32) - 5)


@pytest.mark.parametrize("ivgen", ["plain64", "essiv"])
@pytest.mark.parametrize("mode", ["cbc", "ctr", "ecb"])
def test_cast5_sector_ciphers_match_per_sector_reference(mode, ivgen):
    _check_against_reference("cast5-128", mode, ivgen, "md5", 77, count=40)


def test_plain_ivgen_wraps_at_32_bits():
    """plain IVs repeat every 2^32 sectors; plain64's do not."""
    key, data = bytes(range(64)), bytes(1024)
    plain = sector_cipher("aes-256", "xts", "plain", None, key)
    plain64 = sector_cipher("aes-256", "xts", "plain64", None, key)
    assert plain.encrypt(1 << 32, data) == plain.encrypt(0, data)
    assert plain64.encrypt(1 << 32, data) != plain64.encrypt(0, data)


def test_ctr_counter_carries_into_the_high_word(monkeypatch):
    """CTR counts the whole block as one big-endian integer."""
    import numpy as np

    key, data = bytes(range(16)), bytes(range(256)) * 2
    cipher = sector_cipher("aes-128", "ctr", "plain64", None, key)
    iv = bytes(8) + b"\xff" * 8  # low word about to wrap
    ivs = np.frombuffer(iv, dtype="<u8").reshape(1, 2)
    monkeypatch.setattr(cipher, "_ivs", lambda sector, n: ivs)
    assert cipher.encrypt(0, data) == _reference("aes", "ctr", key, iv, data)


def test_legacy_qcow_aes_key_is_the_secret_cut_or_padded_to_16_bytes():
    """QEMU's qcrypto_block_qcow_init: the secret up to NUL, 16 bytes."""
    data = bytes(range(256)) * 4
    for secret, key in (
        (b"sesame", b"sesame".ljust(16, b"\0")),
        (b"0123456789abcdefXYZ", b"0123456789abcdef"),
        (b"ab\0cd", b"ab".ljust(16, b"\0")),
    ):
        cipher = qcow_aes_cipher(secret)
        assert cipher.iv_from_host is False
        iv = struct.pack("<Q", 9).ljust(16, b"\0")
        assert cipher.encrypt(9, data)[:512] == _reference("aes", "cbc", key, iv, data[:512])


@pytest.mark.parametrize(
    ("alg", "mode", "message"),
    [
        ("twofish-256", "xts", "Unsupported cipher algorithm twofish-256"),
        ("serpent-128", "cbc", "Unsupported cipher algorithm serpent-128"),
        ("cast5-128", "xts", "Unsupported cipher mode xts"),
        ("des", "cbc", "Algorithm 'des' not supported"),
    ],
)
def test_ciphers_cryptography_lacks_are_refused_in_qemus_words(alg, mode, message):
    with pytest.raises(BadOptionError, match=f"^{message}$"):
        sector_cipher(alg, mode, "plain64", None, bytes(64))


def test_essiv_needs_a_cipher_with_the_digests_key_size():
    with pytest.raises(BadOptionError, match="^No AES cipher with key size 20 available$"):
        sector_cipher("aes-256", "cbc", "essiv", "sha1", bytes(32))


def test_cipher_repr_shows_no_key():
    key = b"K" * 64
    assert "K" * 4 not in repr(sector_cipher("aes-256", "xts", "plain64", None, key))


@pytest.mark.parametrize("mode", ["xts", "cbc", "ctr", "ecb"])
def test_ciphers_write_into_a_given_buffer_even_in_place(mode):
    key = bytes(range(64 if mode == "xts" else 32))
    cipher = sector_cipher("aes-256", mode, "plain64", None, key)
    data = random.Random(mode).randbytes(SECTORS * 512)
    expected = cipher.encrypt(5, data)
    buf = bytearray(data)
    assert cipher.encrypt(5, buf, out=buf) is buf and buf == expected
    assert cipher.decrypt(5, buf, out=memoryview(buf)) is not None and buf == data
