"""LUKS1 headers as QEMU's crypto/block-luks.c reads them without a key:
the checks of qcrypto_block_luks_open (check_header, then parse_header),
in its order and words, and the QCryptoBlockInfoLUKS that info reports."""

from __future__ import annotations

from qimg.formats.qcow2 import layout as L

# QEMU 7.2's names (crypto/block-luks.c): cipher name -> usable key sizes.
_LUKS_CIPHERS = {"aes": (16, 24, 32), "cast5": (16,), "serpent": (16, 24, 32)}
_LUKS_CIPHERS.update({"twofish": (16, 24, 32), "sm4": (16,)})
_LUKS_MODES = ("ecb", "cbc", "xts", "ctr")
_LUKS_IVGENS = ("plain", "plain64", "essiv")
_LUKS_HASHES = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48}
_LUKS_HASHES.update({"sha512": 64, "ripemd160": 20})
_LUKS_FAMILY = {"aes": "AES", "cast5": "CAST5", "serpent": "Serpent", "twofish": "Twofish"}
_LUKS_FAMILY["sm4"] = "SM4"
_LUKS_KEY_SLOT_SECTORS = 8  # QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET / 512
_LUKS_STRIPES = 4000


def luks_info(raw: bytes) -> dict:
    """The LUKS1 header checked as QEMU's qcrypto_block_luks_open checks it
    without a key (check_header, then parse_header), in its order and words."""
    from qimg.errors import InvalidImageError as Bad

    fields = L.LUKS_HEADER.unpack_from(raw)
    (magic, version, cipher_raw, mode_raw, hash_raw, payload, key_bytes) = fields[:7]
    mk_iters, uuid_raw = fields[9], fields[10]
    if magic != L.LUKS_MAGIC:
        raise Bad("Volume is not in LUKS format")
    if version != 1:
        raise Bad(f"LUKS version {version} is not supported")
    for value, what in ((cipher_raw, "cipher name"), (mode_raw, "cipher mode")):
        if b"\0" not in value:
            raise Bad(f"LUKS header {what} is not NUL terminated")
    if b"\0" not in hash_raw:
        raise Bad("LUKS header hash spec is not NUL terminated")
    if payload < _LUKS_KEY_SLOT_SECTORS:
        raise Bad("LUKS payload is overlapping with the header")
    if mk_iters == 0:
        raise Bad("LUKS key iteration count is zero")
    slots = [
        L.LUKS_KEYSLOT.unpack_from(raw, L.LUKS_HEADER.size + i * L.LUKS_KEYSLOT.size)
        for i in range(L.LUKS_NUM_KEY_SLOTS)
    ]
    _luks_check_slots(slots, key_bytes, payload)
    cipher, mode_spec, hash_spec = (_c_str(v) for v in (cipher_raw, mode_raw, hash_raw))
    mode, dash, ivgen = mode_spec.partition("-")
    if not dash:
        raise Bad(f"Unexpected cipher mode string format '{mode_spec}'")
    ivgen, colon, ivgen_hash = ivgen.partition(":")
    if colon and ivgen_hash not in _LUKS_HASHES:
        raise Bad(f"Hash algorithm '{ivgen_hash}' not supported")
    if mode not in _LUKS_MODES:
        raise Bad(f"Cipher mode '{mode}' not supported")
    # XTS keys hold two cipher keys (qcrypto_block_luks_cipher_name_lookup).
    cipher_key = key_bytes // 2 if mode == "xts" else key_bytes
    if cipher_key not in _LUKS_CIPHERS.get(cipher, ()):
        raise Bad(f"Algorithm '{cipher}' with key size {cipher_key} bytes not supported")
    if hash_spec not in _LUKS_HASHES:
        raise Bad(f"Hash algorithm '{hash_spec}' not supported")
    if ivgen not in _LUKS_IVGENS:
        raise Bad(f"IV generator '{ivgen}' not supported")
    if ivgen == "essiv":
        if not colon:
            raise Bad("Missing IV generator hash specification")
        digest = _LUKS_HASHES[ivgen_hash]
        if digest not in _LUKS_CIPHERS[cipher]:
            raise Bad(f"No {_LUKS_FAMILY[cipher]} cipher with key size {digest} available")
    out: dict = {"ivgen-alg": ivgen, "hash-alg": hash_spec}
    out["cipher-alg"] = f"{cipher}-{cipher_key * 8}"
    out["uuid"] = _c_str(uuid_raw)
    if ivgen == "essiv":  # the hash is ignored by the other generators
        out["ivgen-hash-alg"] = ivgen_hash
    out.update({"format": "luks", "cipher-mode": mode})
    out["slots"] = [_luks_slot(slot) for slot in slots]
    out["payload-offset"] = payload * L.BDRV_SECTOR_SIZE
    out["master-key-iters"] = mk_iters
    return out


def _luks_check_slots(slots: list[tuple], key_bytes: int, payload: int) -> None:
    """qcrypto_block_luks_check_header's key slot checks."""
    from qimg.errors import InvalidImageError as Bad

    def extent(slot) -> tuple[int, int]:
        sectors = -(-key_bytes * slot[4] // L.BDRV_SECTOR_SIZE)
        return slot[3], -(-sectors // _LUKS_KEY_SLOT_SECTORS) * _LUKS_KEY_SLOT_SECTORS

    for i, slot in enumerate(slots):
        active, iters, _salt, _key_offset, stripes = slot
        if stripes != _LUKS_STRIPES:
            raise Bad(f"Keyslot {i} is corrupted (stripes {stripes} != {_LUKS_STRIPES})")
        if active not in (L.LUKS_KEY_SLOT_ENABLED, L.LUKS_KEY_SLOT_DISABLED):
            raise Bad(f"Keyslot {i} state (active/disable) is corrupted")
        if active == L.LUKS_KEY_SLOT_ENABLED and iters == 0:
            raise Bad(f"Keyslot {i} iteration count is zero")
        start, length = extent(slot)
        if start < _LUKS_KEY_SLOT_SECTORS:
            raise Bad(f"Keyslot {i} is overlapping with the LUKS header")
        if start + length > payload:
            raise Bad(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, len(slots)):
            start2, length2 = extent(slots[j])
            if start < start2 + length2 and start2 < start + length:
                raise Bad(f"Keyslots {i} and {j} are overlapping in the header")


def _luks_slot(slot: tuple) -> dict:
    active, iters, _salt, key_offset, stripes = slot
    out: dict = {"active": active == L.LUKS_KEY_SLOT_ENABLED}
    if out["active"]:
        out["iters"] = iters
    out["key-offset"] = key_offset * L.BDRV_SECTOR_SIZE
    if out["active"]:
        out["stripes"] = stripes
    return out


def _c_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")
