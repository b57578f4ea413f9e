"""`--object secret,...`: QEMU's user_creatable_process_cmdline for the
objects an image can use (secrets), checked as the command line is read.

The secret bytes are kept by id for the images that name them. A secret's
value never appears in a message.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping

from qimg.errors import BadOptionError, QimgError
from qimg.options import split_options

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_SECRET_KEYS = frozenset({"qom-type", "id", "data", "file", "format", "keyid", "iv", "loaded"})


def parse_objects(texts: tuple[str, ...] | list[str]) -> dict[str, bytes]:
    """The secrets of every --object, by id, in command-line order."""
    secrets: dict[str, bytes] = {}
    for text in texts:
        sid, value = _parse_object(text, secrets)
        if sid in secrets:
            raise BadOptionError(
                f"attempt to add duplicate property '{sid}' to object (type 'container')"
            )
        secrets[sid] = value
    return secrets


def _parse_object(text: str, known: dict[str, bytes]) -> tuple[str, bytes]:
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


def _secret_value(opts: dict[str, str], fmt: str, known: dict[str, bytes]) -> bytes:
    """QEMU's qcrypto_secret_load_data, then the format's decoding."""
    if "data" in opts and "file" in opts:
        raise BadOptionError("'file' and 'data' are mutually exclusive")
    if "data" in opts:
        raw = opts["data"].encode()
    elif "file" in opts:
        raw = _read_secret_file(opts["file"])
    else:
        raise BadOptionError("Either 'file' or 'data' must be provided")
    keyid = opts.get("keyid")
    if keyid:
        if keyid not in known:
            raise BadOptionError(f"No secret with id '{keyid}'")
        raise QimgError("secrets encrypted with another secret (keyid) are not supported yet")
    if fmt == "base64":
        return _base64(raw)
    return raw


def _read_secret_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise QimgError(f"Unable to read {path}: Failed to open file “{path}”: {reason}") from None


def _base64(raw: bytes) -> bytes:
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BadOptionError("Base64 data contains invalid characters") from None


def lookup_secret(secrets: Mapping[str, bytes], secret_id: str | None, option: str) -> bytes:
    """The value of the secret an image option (e.g. `encrypt.key-secret`)
    names, failing in qemu-img's words when the option is missing or names
    no --object secret."""
    from qimg.errors import MissingSecretError

    if secret_id is None:
        raise MissingSecretError(f"Parameter '{option}' is required for cipher")
    try:
        return secrets[secret_id]
    except KeyError:
        raise MissingSecretError(f"No secret with id '{secret_id}'") from None
