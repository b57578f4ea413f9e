"""Secrets encrypted with another secret (`--object secret,...,keyid=K,iv=IV`)
and base64 secrets are read as qemu-img reads them: the same value (the one
that unlocks a LUKS image qemu-img made), and the same refusals in the same
words, before any image is opened."""

from __future__ import annotations

import pytest
from conftest import qimg, run
from secret_tools import b64, encrypt_secret, qemu_create_encrypted

from qimg.secrets import parse_objects

KEY = bytes(range(1, 33))
IV = bytes(range(100, 116))
PASSWORD = b"hunter2"
CT = encrypt_secret(KEY, IV, PASSWORD)
K = f"secret,id=k,data={b64(KEY)},format=base64"

# Each a list of --object definitions; the last one's value is what an image names.
KEYID_OBJECTS = {
    "base64-ciphertext": [K, f"secret,id=s,data={b64(CT)},keyid=k,iv={b64(IV)},format=base64"],
    "key-too-short": [
        f"secret,id=k,data={b64(KEY[:16])},format=base64",
        f"secret,id=s,data={b64(CT)},keyid=k,iv={b64(IV)},format=base64",
    ],
    "no-iv": [K, f"secret,id=s,data={b64(CT)},keyid=k,format=base64"],
    "iv-not-base64": [K, f"secret,id=s,data={b64(CT)},keyid=k,iv=!!,format=base64"],
    "iv-of-8-bytes": [K, f"secret,id=s,data={b64(CT)},keyid=k,iv={b64(IV[:8])},format=base64"],
    "iv-unpadded": [
        K,
        f"secret,id=s,data={b64(CT)},keyid=k,iv={b64(IV).rstrip('=')},format=base64",
    ],
    "keyid-defined-after": [
        f"secret,id=s,data={b64(CT)},keyid=k,iv={b64(IV)},format=base64",
        K,
    ],
    "wrong-key-bad-padding": [
        f"secret,id=k,data={b64(bytes(32))},format=base64",
        f"secret,id=s,data={b64(CT)},keyid=k,iv={b64(IV)},format=base64",
    ],
    "raw-ciphertext-not-whole-blocks": [K, f"secret,id=s,data={b64(CT)},keyid=k,iv={b64(IV)}"],
    "ciphertext-not-base64": [K, f"secret,id=s,data=!!,keyid=k,iv={b64(IV)},format=base64"],
    "empty-keyid": ["secret,id=s,data=x,keyid="],
    "own-keyid": [f"secret,id=s,data={b64(CT)},keyid=s,iv={b64(IV)},format=base64"],
    "key-is-itself-decrypted": [
        K,
        f"secret,id=k2,data={b64(CT)},keyid=k,iv={b64(IV)},format=base64",
        f"secret,id=s,data={b64(CT)},keyid=k2,iv={b64(IV)},format=base64",
    ],
    "iv-without-keyid": [f"secret,id=s,data=x,iv={b64(IV)}"],
}


def _both(qemu_img, args):
    """(exit code, stderr with the program's name stripped) of each tool."""
    a = run([qemu_img, *args], check=False)
    b = qimg(*args, check=False)
    return [
        (p.returncode, p.stderr.replace("qemu-img:", "PROG:").replace("qimg:", "PROG:"))
        for p in (a, b)
    ]


@pytest.mark.parametrize("case", KEYID_OBJECTS)
def test_keyid_secrets_are_checked_as_qemu_img_checks_them(tmp_path, qemu_img, case):
    img = tmp_path / "plain.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(img), "1M"])
    args = ["info"]
    for obj in KEYID_OBJECTS[case]:
        args += ["--object", obj]
    ours, theirs = _both(qemu_img, [*args, str(img)])[::-1]
    assert ours == theirs


@pytest.fixture(scope="module")
def luks_image(tmp_path_factory, qemu_img):
    """A LUKS qcow2 image qemu-img made with the secret PASSWORD."""
    d = tmp_path_factory.mktemp("keyid")
    (d / "password").write_bytes(PASSWORD)
    img = d / "enc.qcow2"
    qemu_create_encrypted(qemu_img, img, d / "password", size="1M")
    return img


def _qemu_unlocks(qemu_img, img, objects, secret_id="s") -> bool:
    args = [qemu_img, "check", "-q"]
    for obj in objects:
        args += ["--object", obj]
    args += ["--image-opts", f"driver=qcow2,encrypt.key-secret={secret_id},file.filename={img}"]
    proc = run(args, check=False)
    assert proc.returncode == 0 or "Invalid password" in proc.stderr or "UTF-8" in proc.stderr, (
        proc.stderr
    )
    return proc.returncode == 0


def test_keyid_secret_has_the_value_that_unlocks_qemu_img_s_image(tmp_path, qemu_img, luks_image):
    (tmp_path / "key").write_bytes(KEY)
    (tmp_path / "ct").write_bytes(CT)
    spellings = [
        KEYID_OBJECTS["base64-ciphertext"],
        [
            f"secret,id=k,file={tmp_path / 'key'}",
            f"secret,id=s,file={tmp_path / 'ct'},keyid=k,iv={b64(IV)}",
        ],
    ]
    for objects in spellings:
        assert _qemu_unlocks(qemu_img, luks_image, objects)
        assert parse_objects(objects)["s"] == PASSWORD


@pytest.mark.parametrize(
    "spelling",
    [b"aHVudGVyMg==", b"aHVudGVyMg", b"aHVudGVyMg=", b"aHVudGVyMg===", b"aHVudGVyMg==\n",
     b"aHVu\ndGVyMg==\n", b"aHVudGVy=g==", b"aHVudGVyMg==aHVudGVyMg=="],
)  # fmt: skip
def test_base64_secret_decodes_as_qemu_img_decodes_it(tmp_path, qemu_img, luks_image, spelling):
    """qemu-img unlocks the image exactly where qimg's value is the password."""
    f = tmp_path / "secret.b64"
    f.write_bytes(spelling)
    objects = [f"secret,id=s,file={f},format=base64"]
    assert _qemu_unlocks(qemu_img, luks_image, objects) == (parse_objects(objects)["s"] == PASSWORD)


@pytest.mark.parametrize(
    "content", [b"aHVu dGVyMg==", b"aHVudGVyMg==\r\n", b"aHVudGVyMg==\0", b"\t"]
)
def test_bad_base64_secret_file_is_refused_as_qemu_img_refuses_it(tmp_path, qemu_img, content):
    f = tmp_path / "secret.b64"
    f.write_bytes(content)
    img = tmp_path / "plain.qcow2"
    run([qemu_img, "create", "-q", "-f", "qcow2", str(img), "1M"])
    theirs, ours = _both(
        qemu_img, ["info", "--object", f"secret,id=s,file={f},format=base64", str(img)]
    )
    assert ours == theirs
    assert ours[0] == 1


def test_secrets_repr_names_the_ids_only():
    secrets = parse_objects(["secret,id=s,data=swordfish-value"])
    assert "swordfish" not in repr(secrets) and "swordfish" not in str(secrets)
    assert "'s'" in repr(secrets)
