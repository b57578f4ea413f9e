"""`--object secret,...`: QEMU's user_creatable_process_cmdline for the
objects an image can use (secrets), checked as the command line is read.

The secret bytes are kept by id (a Secrets mapping) for the images that
name them. A secret's value never appears in a message, and the mapping's
repr shows ids only.

A secret may itself be encrypted with another one given before it
(`keyid=K,iv=IV`): AES-256-CBC with K's 32 bytes as the key, the base64 IV
of 16 bytes, the PKCS#7-style padding removed (QEMU's secret objects).
Base64 is decoded as QEMU's qbase64_decode does (GLib's lenient decoder):
newlines are skipped, '=' counts as a zero digit anywhere, and a last
group of fewer than four digits is dropped.
"""

from __future__ import annotations

import binascii
import os
import re
from collections.abc import Mapping

from qimg.errors import BadOptionError, QimgError
from qimg.options import split_options

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_SECRET_KEYS = frozenset({"qom-type", "id", "data", "file", "format", "keyid", "iv", "loaded"})


class SecretBytes(bytes):
    """A secret's value: bytes whose repr and str hide them, so that a
    traceback that shows local variables (pytest -l, error reporters) does
    not show the secret either. What is computed from it (slices, keys)
    is plain bytes again."""

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


class Secrets(dict):
    """Secret values (bytes) by id. Its repr names the ids only, so that
    a value cannot reach a message or a traceback through it."""

    def __repr__(self) -> str:
        return f"Secrets({sorted(self)!r})"

    __str__ = __repr__


def parse_objects(texts: tuple[str, ...] | list[str]) -> Secrets:
    """The secrets of every --object, by id, in command-line order."""
    secrets = Secrets()
    for text in texts:
        sid, value = _parse_object(text, secrets)
        if sid in secrets:
            raise BadOptionError(
                f"attempt to add duplicate property '{sid}' to object (type 'container')"
            )
        secrets[sid] = SecretBytes(value)
    return secrets


def _parse_object(text: str, known: Mapping[str, bytes]) -> tuple[str, bytes]:
    opts: dict[str, str] = {}
    for n, (key, value) in enumerate(split_options(text)):
        if value is None and n == 0:
            key, value = "qom-type", key
        opts[key] = "on" if value is None else value
    qom_type = opts.get("qom-type")
    if qom_type is None:
        raise BadOptionError("Parameter 'qom-type' is missing")
    if qom_type not in ("secret", "secret_keyring"):
        raise BadOptionError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    sid = opts.get("id")
    if not sid:
        raise BadOptionError("Parameter 'id' is missing")
    if not _IDENTIFIER.match(sid):
        raise BadOptionError(
            "Parameter 'id' expects an identifier\n"
            "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
        )
    if qom_type == "secret_keyring":
        if "serial" not in opts:
            raise BadOptionError("Parameter 'serial' is missing")
        raise QimgError("secret_keyring objects (the kernel's key ring) are not supported")
    for key in opts:
        if key not in _SECRET_KEYS:
            raise BadOptionError(f"Parameter '{key}' is unexpected")
    fmt = opts.get("format", "raw")
    if fmt not in ("raw", "base64"):
        raise BadOptionError(f"Parameter 'format' does not accept value '{fmt}'")
    return sid, _secret_value(opts, fmt, known)


def _secret_value(opts: dict[str, str], fmt: str, known: Mapping[str, bytes]) -> bytes:
    """QEMU's qcrypto_secret_load_data, then the format's decoding (of
    the ciphertext, for a secret encrypted with `keyid`)."""
    if "data" in opts and "file" in opts:
        raise BadOptionError("'file' and 'data' are mutually exclusive")
    if "data" in opts:
        raw = os.fsencode(opts["data"])
    elif "file" in opts:
        raw = _read_secret_file(opts["file"])
    else:
        raise BadOptionError("Either 'file' or 'data' must be provided")
    keyid = opts.get("keyid")
    if keyid is not None:
        if keyid == opts["id"]:
            # QEMU finds the object being completed, which has no data yet.
            raise BadOptionError(f"Secret with id '{keyid}' has no data")
        if keyid not in known:
            raise BadOptionError(f"No secret with id '{keyid}'")
        return _decrypt(known[keyid], opts.get("iv"), raw, fmt)
    if fmt == "base64":
        return _base64(raw)
    return raw


def _decrypt(key: bytes, iv_text: str | None, raw: bytes, fmt: str) -> bytes:
    """A secret encrypted with the secret `key`: AES-256-CBC, the checks
    and messages in QEMU's order. Only the last padding byte is checked
    (at most 16 and at most the length), as QEMU checks it."""
    if len(key) != 32:
        raise BadOptionError("Key should be 32 bytes in length")
    if iv_text is None:
        raise BadOptionError("IV is required to decrypt secret")
    iv = _base64(os.fsencode(iv_text))
    if len(iv) != 16:
        raise BadOptionError(f"IV should be 16 bytes in length not {len(iv)}")
    ciphertext = _base64(raw) if fmt == "base64" else raw
    if len(ciphertext) % 16:
        raise BadOptionError(f"Length {len(ciphertext)} must be a multiple of block size 16")
    if not ciphertext:
        return b""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    plain = decryptor.update(ciphertext) + decryptor.finalize()
    pad = plain[-1]
    if pad > 16 or pad > len(plain):
        raise BadOptionError(f"Incorrect number of padding bytes ({pad}) found on decrypted data")
    return plain[: len(plain) - pad]


def _read_secret_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise QimgError(f"Unable to read {path}: Failed to open file “{path}”: {reason}") from None


_BASE64_DIGITS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def _base64(raw: bytes) -> bytes:
    """qbase64_decode: only base64 digits, '=' and newlines are allowed
    (a NUL is named as such); then GLib's decoding (module docstring)."""
    if b"\0" in raw:
        raise BadOptionError("Base64 data contains embedded NUL characters")
    digits = raw.replace(b"\n", b"")
    if not _BASE64_DIGITS.issuperset(digits):
        raise BadOptionError("Base64 data contains invalid characters")
    digits = digits[: len(digits) - len(digits) % 4]
    # '=' is a zero digit; a group gives 3 bytes, less one for each of
    # its last two digits that is '=' (the third alone drops the middle byte).
    import base64

    try:
        decoded = base64.b64decode(digits.replace(b"=", b"A"), validate=True)
    except (binascii.Error, ValueError):  # unreachable: digits checked above
        raise BadOptionError("Base64 data contains invalid characters") from None
    if b"=" not in digits:
        return decoded
    out = bytearray()
    for g in range(0, len(digits), 4):
        three = decoded[g // 4 * 3 : g // 4 * 3 + 3]
        out += three[:1]
        if digits[g + 2] != 0x3D:
            out += three[1:2]
        if digits[g + 3] != 0x3D:
            out += three[2:3]
    return bytes(out)


def lookup_secret(secrets: Mapping[str, bytes], secret_id: str | None, option: str) -> bytes:
    """The value of the secret an image option (e.g. `encrypt.key-secret`)
    names, failing in qemu-img's words when the option is missing, names
    no --object secret, or names one that is not UTF-8 (every image secret
    is a passphrase: QEMU's qcrypto_secret_lookup_as_utf8)."""
    from qimg.errors import MissingSecretError

    if secret_id is None:
        raise MissingSecretError(f"Parameter '{option}' is required for cipher")
    try:
        value = secrets[secret_id]
    except KeyError:
        raise MissingSecretError(f"No secret with id '{secret_id}'") from None
    if b"\0" in value or not _is_utf8(value):
        raise BadOptionError(f"Data from secret {secret_id} is not valid UTF-8")
    return value


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
