"""Helpers for tests with secrets: encrypted images made by qemu-img,
secrets encrypted with another secret (QEMU's keyid/iv), secret files."""

from __future__ import annotations

import base64

from conftest import run_timing_pbkdf


def qemu_create_encrypted(qemu_img: str, path, secret_file, fmt: str = "qcow2", size="4M"):
    """An encrypted image made by qemu-img: LUKS qcow2 (fmt "qcow2"), a raw
    LUKS container ("luks") or legacy AES qcow2 ("aes"), whose secret is
    the contents of `secret_file` (id "sec")."""
    obj = f"secret,id=sec,file={secret_file}"
    if fmt == "luks":
        opts = ["-f", "luks", "-o", "key-secret=sec,iter-time=10"]
    elif fmt == "aes":
        opts = ["-f", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=sec"]
    else:
        opts = [
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec,encrypt.iter-time=10",
        ]
    run_timing_pbkdf([qemu_img, "create", "-q", "--object", obj, *opts, str(path), str(size)])


def encrypt_secret(key: bytes, iv: bytes, plain: bytes) -> bytes:
    """`plain` as a keyid secret holds it: AES-256-CBC under `key`, padded
    with PKCS#7."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    padder = padding.PKCS7(128).padder()
    data = padder.update(plain) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_opts(path, fmt: str = "qcow2", secret: str = "sec") -> str:
    """The --image-opts string opening an encrypted image with `secret`."""
    if fmt == "luks":
        return f"driver=luks,key-secret={secret},file.filename={path}"
    return f"driver=qcow2,encrypt.key-secret={secret},file.filename={path}"
