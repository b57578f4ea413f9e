"""Encryption of a qcow2 image's data: the one place where crypt_method
becomes a cipher.

- Legacy AES (crypt_method 1): AES-128-CBC keyed by the secret itself,
  the IV from the guest sector; nothing else on disk.
- LUKS (crypt_method 2): a LUKS1 header and its key material in the
  clusters that the full disk encryption header extension names (offset,
  length); the IV from the host sector (QEMU's crypt_physical_offset).

The open options (`encrypt.*` of the node, without the prefix) are checked
as QEMU's qcow2_update_options_prepare and block_crypto_open_opts_init
check them; the ciphers and the LUKS format are qimg.crypto's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from qimg.errors import BadOptionError, ImageIOError, InvalidImageError
from qimg.formats.qcow2 import layout as L
from qimg.secrets import lookup_secret

# crypt_method -> the name `encrypt.format` gives it.
FORMAT_NAMES = {L.QCOW_CRYPT_AES: "aes", L.QCOW_CRYPT_LUKS: "luks"}
CRYPT_METHODS = {name: method for method, name in FORMAT_NAMES.items()}

# QCryptoBlockOpenOptions of both formats: what an open may name.
_OPEN_KEYS = ("format", "key-secret")
# QCryptoBlockCreateOptionsLUKS beyond the key secret, in QAPI order.
LUKS_CREATE_KEYS = (
    "cipher-alg",
    "cipher-mode",
    "ivgen-alg",
    "ivgen-hash-alg",
    "hash-alg",
    "iter-time",
)
KEY_SECRET = "encrypt.key-secret"


def check_open_options(crypt_method: int, encrypt: Mapping[str, str]) -> None:
    """QEMU's check of the node's `encrypt.*` options against the header:
    a format named must be the header's; an encrypted image takes no keys
    but format and key-secret (a plain image ignores them)."""
    fmt = encrypt.get("format")
    if crypt_method == L.QCOW_CRYPT_NONE:
        if fmt is not None:
            raise BadOptionError(
                f"No encryption in image header, but options specified format '{fmt}'"
            )
        return
    header_fmt = FORMAT_NAMES[crypt_method]
    if fmt is not None and fmt != header_fmt:
        raise BadOptionError(
            f"Header reported '{header_fmt}' encryption format but options specify '{fmt}'"
        )
    for key in encrypt:
        if key not in _OPEN_KEYS:
            raise BadOptionError(f"Parameter '{key}' is unexpected")


def open_cipher(image, secrets: Mapping[str, bytes], encrypt: Mapping[str, str]):
    """The SectorCipher of an encrypted image's data, unlocked with the
    secret `encrypt.key-secret` names (qcrypto_block_open with I/O)."""
    secret = lookup_secret(secrets, encrypt.get("key-secret"), KEY_SECRET)
    require_crypto()
    secret = utf8_secret(secret, encrypt["key-secret"])
    if image.header.crypt_method == L.QCOW_CRYPT_AES:
        from qimg.crypto.sectors import qcow_aes_cipher

        return qcow_aes_cipher(secret)
    from qimg.crypto import luks1

    volume = luks1.unlock(luks_reader(image), secret)
    image.luks_volume = volume  # its master key re-keys slots (amend)
    return volume.cipher(iv_from_host=True)


def require_crypto() -> None:
    """The ciphers live in qimg.crypto; without it, a one-line refusal."""
    import importlib.util

    if importlib.util.find_spec("qimg.crypto") is None:
        from qimg.errors import UnsupportedFeatureError

        raise UnsupportedFeatureError("Encrypted qcow2 images are not supported yet")


def utf8_secret(secret: bytes, secret_id: str) -> bytes:
    """qcrypto_secret_lookup_as_utf8: the key (AES) or passphrase (LUKS)
    is the secret as text, valid UTF-8 without a NUL byte."""
    try:
        secret.decode("utf-8")
    except UnicodeDecodeError:
        raise BadOptionError(f"Data from secret {secret_id} is not valid UTF-8") from None
    if b"\0" in secret:
        raise BadOptionError(f"Data from secret {secret_id} is not valid UTF-8")
    return secret


def luks_reader(image) -> Callable[[int, int], bytes]:
    """Reads of the LUKS header area (offsets within it), bounded by the
    extension's length as qcow2_crypto_hdr_read_func bounds them; past the
    end of the file they read as zeros."""
    offset, length = image.header.crypto_ext

    def read(pos: int, n: int) -> bytes:
        if pos < 0 or n < 0 or pos + n > length:
            raise InvalidImageError("Request for data outside of extension header")
        return image.storage.pread(offset + pos, n).ljust(n, b"\0")

    return read


def luks_writer(image) -> Callable[[int, bytes], None]:
    """Writes into the LUKS header area (qcow2_crypto_hdr_write_func),
    bounded as reads are; the area is metadata no other structure shares."""
    offset, length = image.header.crypto_ext

    def write(pos: int, data: bytes) -> None:
        if pos < 0 or pos + len(data) > length:
            raise InvalidImageError("Request for data outside of extension header")
        image.check_overlap(offset + pos, len(data), "crypto-header")
        image.storage.pwrite(offset + pos, data)

    return write


class EncryptionOptions:
    """The `encrypt.*` create options of a new image (QEMU's
    QCryptoBlockCreateOptions), parsed as qcow2_co_create_opts parses
    them: `encryption=on` is `encrypt.format=aes`, the format decides which
    other keys are allowed."""

    def __init__(self, fmt: str, values: dict[str, object]):
        self.format = fmt  # "aes" or "luks"
        self.values = values  # "encrypt.KEY" -> typed value, format excluded

    @classmethod
    def from_values(cls, values: Mapping[str, object]) -> EncryptionOptions | None:
        """None when the image is not to be encrypted."""
        opts = {k: v for k, v in values.items() if k.startswith("encrypt.")}
        if "encryption" in values:
            if "encrypt.format" in opts:
                raise BadOptionError(
                    "'encrypt.format' and its alias 'encryption' can't be used at the same time"
                )
            if values["encryption"]:
                opts["encrypt.format"] = "aes"
        if not opts:
            return None
        fmt = opts.pop("encrypt.format", None)
        if fmt is None:
            raise BadOptionError("Parameter 'encrypt.format' is missing")
        if fmt not in CRYPT_METHODS:
            raise BadOptionError(f"Parameter 'format' does not accept value '{fmt}'")
        if fmt == "aes":
            for key in opts:
                if key != KEY_SECRET:
                    raise BadOptionError(f"Parameter '{key}' is unexpected")
        return cls(fmt, opts)

    def secret(self, secrets: Mapping[str, bytes]) -> bytes:
        """The value of the key secret (as text for AES, as QEMU reads it)."""
        secret_id = self.values.get(KEY_SECRET)
        secret = lookup_secret(secrets, secret_id, KEY_SECRET)
        require_crypto()
        return utf8_secret(secret, str(secret_id))

    def luks_params(self):
        """The LuksParams of a LUKS image (QEMU's defaults for the rest),
        checked as qcrypto_block_luks_create checks them."""
        from qimg.crypto import luks1

        params = luks1.parse_luks_options(
            {k: str(v) for k, v in self.values.items() if k != KEY_SECRET}, "encrypt."
        )
        luks1.check_params(params)
        return params


def set_up_encryption(image, o: EncryptionOptions, secret: bytes, params=None) -> None:
    """Encrypt the new, still empty image (QEMU's qcow2_set_up_encryption):
    for LUKS, its header in newly allocated clusters; then the header's
    crypt_method (and the extension naming those clusters).

    Ordering: the LUKS clusters are allocated (refcounts flushed), zeroed
    and written, and the file flushed, before the header points at them; a
    crash before the header write leaks them, nothing else. `secret` is
    the key secret's value, `params` the LuksParams of a LUKS image.
    """
    h = image.header
    if o.format == "aes":
        from qimg.crypto.sectors import qcow_aes_cipher

        cipher = qcow_aes_cipher(secret)
    else:
        from qimg.crypto import luks1

        length = luks1.header_length(params)
        raw, master_key = luks1.format_volume(secret, params)
        cs = image.geo.cluster_size
        nbytes = -(-length // cs) * cs
        offset = image.refcounts.alloc(nbytes // cs)
        image.refcounts.blocks.flush()
        image.flush_file()
        # Every byte of the clusters is written: key slots not in use hold zeros.
        image.storage.pwrite(offset, bytes(raw[:length]).ljust(nbytes, b"\0"))
        image.flush_file()
        h.crypto_ext = (offset, length)
        from qimg.crypto.sectors import sector_cipher

        cipher = sector_cipher(
            params.cipher_alg,
            params.cipher_mode,
            params.ivgen_alg,
            params.ivgen_hash_alg,
            master_key,
            iv_from_host=True,
        )
    h.crypt_method = CRYPT_METHODS[o.format]
    image.rewrite_header()
    image.dataio.cipher = cipher


def refuse_compressed(image) -> None:
    """QEMU writes no compressed cluster an encrypted image can read back
    (its compressed write fails with EIO): refuse before writing."""
    if image.dataio.cipher is not None or image.header.crypt_method:
        raise ImageIOError("Input/output error")


def amend_encryption(
    image, values: Mapping[str, object], secrets: Mapping[str, bytes], force: bool
) -> None:
    """QEMU's encryption part of qcow2_amend_options: the LUKS key slots
    re-keyed (encrypt.state, keyslot, new-secret, old-secret, iter-time),
    the secrets looked up by id where QEMU looks them up.

    Ordering: the LUKS code writes new key material before the header that
    activates it, and deactivates a slot before overwriting its material;
    the image file is flushed after."""
    from qimg.crypto import luks1

    opts = luks1.parse_amend_options(
        {k: str(v) for k, v in values.items() if k.startswith("encrypt.")}, "encrypt."
    )
    volume = getattr(image, "luks_volume", None)
    if volume is None:  # opened without I/O: QEMU has no crypto context then
        raise BadOptionError("Can't amend encryption options - encryption not present")

    def secret(secret_id: str | None, option: str):
        if secret_id is None:
            return None
        return lambda: utf8_secret(lookup_secret(secrets, secret_id, option), secret_id)

    luks1.amend_keyslots(
        luks_reader(image),
        luks_writer(image),
        volume.master_key,
        new_secret=secret(opts.new_secret, "encrypt.new-secret"),
        old_secret=secret(opts.old_secret, "encrypt.old-secret"),
        keyslot=opts.keyslot,
        state=opts.state,
        iter_time_ms=opts.iter_time_ms,
        force=force,
    )
    image.flush_file()
