"""A secret never leaves qimg except into a LUKS header: the encrypted runs
the suite makes (create, info, check, convert, resize, snapshot, bitmap,
amend re-key, wrong, missing and unknown secrets, keyid secrets, an internal
error with QIMG_DEBUG's traceback) are made with distinctive secrets, and
no stdout, stderr or exception text holds them (raw, base64 or hex); no
temporary file is left; no image file holds a passphrase or the master key
(the LUKS header keeps it split and encrypted)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from secret_tools import b64, encrypt_secret

S1 = b"Swordfish-3b9e1c-leakcheck"
S2 = b"Marlin-77d0a4-leakcheck"
WRONG = b"Barracuda-0c0c5e-leakcheck"
KEY = b"Kraken-32-byte-key-for-leakcheck"  # 32 bytes: a keyid key
IV = b"Octopus-iv-16-b!"
assert len(KEY) == 32 and len(IV) == 16
KEYID_CT = encrypt_secret(KEY, IV, S1)  # S1, as a keyid secret holds it


def _spellings(value: bytes) -> list[bytes]:
    """The ways a value could show: as it is, base64 (also of its halves'
    alignment shifts), hex, and a Python bytes repr's insides."""
    forms = [value, value.hex().encode(), repr(value)[2:-1].encode()]
    for shift in range(3):  # base64 of the value at any alignment
        enc = base64.b64encode(b"\0" * shift + value)
        forms.append(enc[4:-4] if shift else enc.rstrip(b"="))
    return forms


SECRET_FORMS = {name: _spellings(v) for name, v in
                {"S1": S1, "S2": S2, "WRONG": WRONG, "KEY": KEY}.items()}  # fmt: skip


def _leaks(text: bytes, extra: dict[str, bytes] | None = None) -> list[str]:
    found = [name for name, forms in SECRET_FORMS.items() if any(f in text for f in forms)]
    for name, value in (extra or {}).items():
        if any(f in text for f in _spellings(value)):
            found.append(name)
    return found


def _obj(sid: str, path) -> list[str]:
    return ["--object", f"secret,id={sid},file={path}"]


def _enc(path, sid: str = "s1") -> str:
    return f"driver=qcow2,encrypt.key-secret={sid},file.filename={path}"


def _luks(path, sid: str = "s1") -> str:
    return f"driver=luks,key-secret={sid},file.filename={path}"


def _runs(w) -> list[list[str]]:
    """qimg command lines over the files in `w`, in order."""
    f1, f2, fw = w / "s1.txt", w / "s2.txt", w / "wrong.txt"
    keyid = [
        "--object",
        f"secret,id=k,data={b64(KEY)},format=base64",
        "--object",
        f"secret,id=s1,data={b64(KEYID_CT)},keyid=k,iv={b64(IV)},format=base64",
    ]
    luks = "encrypt.format=luks,encrypt.key-secret=s1,encrypt.iter-time=10"
    return [
        ["create", "-f", "qcow2", *_obj("s1", f1), "-o", luks, "enc.qcow2", "4M"],
        ["create", "-f", "qcow2", "--object", f"secret,id=s1,data={S1.decode()}",
         "-o", "encrypt.format=aes,encrypt.key-secret=s1", "aes.qcow2", "4M"],
        ["create", "-f", "qcow2", *_obj("s1", f1), "-o", "encrypt.format=luks,encrypt.key-secret=nosuch",
         "bad.qcow2", "4M"],
        ["info", "enc.qcow2"],
        ["info", "--output=json", *_obj("s1", f1), "--image-opts", _enc("enc.qcow2")],
        ["check", *_obj("s1", f1), "--image-opts", _enc("enc.qcow2")],
        ["check", "--output=json", *_obj("s1", f1), "--image-opts", _enc("aes.qcow2")],
        ["check", *_obj("s1", fw), "--image-opts", _enc("enc.qcow2")],  # wrong secret
        ["check", "enc.qcow2"],  # missing secret
        ["check", *_obj("s1", f1), "--image-opts", _enc("enc.qcow2", "nosuch")],  # unknown id
        ["check", *keyid, "--image-opts", _enc("enc.qcow2")],  # keyid secret
        ["check", "--object", f"secret,id=k,data={b64(WRONG[:16] * 2)},format=base64",  # bad key
         "--object", f"secret,id=s1,data={b64(KEYID_CT)},keyid=k,iv={b64(IV)},format=base64",
         "--image-opts", _enc("enc.qcow2")],
        ["convert", *_obj("s1", f1), "-f", "raw", "-O", "qcow2", "-o", luks, "data.raw", "conv.qcow2"],
        ["convert", *_obj("s1", f1), "--image-opts", _enc("conv.qcow2"), "-O", "raw", "back.raw"],
        ["convert", *_obj("s1", f1), *_obj("s2", f2), "--image-opts", _enc("conv.qcow2"), "-O", "qcow2",
         "-o", "encrypt.format=luks,encrypt.key-secret=s2,encrypt.iter-time=10", "conv2.qcow2"],
        ["convert", *_obj("s1", fw), "--image-opts", _enc("conv.qcow2"), "-O", "raw", "fail.raw"],
        ["resize", *_obj("s1", f1), "--image-opts", _enc("enc.qcow2"), "8M"],
        ["snapshot", *_obj("s1", f1), "-c", "snap", "--image-opts", _enc("enc.qcow2")],
        ["bitmap", *_obj("s1", f1), "--add", "--image-opts", _enc("enc.qcow2"), "b0"],
        ["amend", *_obj("s1", f1), *_obj("s2", f2), "-o",
         "encrypt.state=active,encrypt.new-secret=s2,encrypt.iter-time=10", "--image-opts", _enc("enc.qcow2")],
        ["amend", *_obj("s1", fw), *_obj("s2", f2), "-o",
         "encrypt.state=active,encrypt.new-secret=s2,encrypt.iter-time=10", "--image-opts", _enc("enc.qcow2")],
        ["amend", *_obj("s2", f2), "-o", "encrypt.state=inactive,encrypt.old-secret=s2",
         "--image-opts", _enc("conv2.qcow2", "s2")],  # the last slot: refused without --force
        ["create", "-f", "luks", *_obj("s1", f1), "-o", "key-secret=s1,iter-time=10", "vol.luks", "1M"],
        ["convert", *_obj("s1", f1), "-f", "raw", "-O", "luks", "-o", "key-secret=s1,iter-time=10",
         "data.raw", "conv.luks"],
        ["info", *_obj("s1", f1), "--image-opts", _luks("conv.luks")],
        ["check", *_obj("s1", fw), "--image-opts", _luks("conv.luks")],  # wrong secret
        ["convert", *_obj("s1", f1), "--image-opts", _luks("conv.luks"), "-O", "raw", "back-luks.raw"],
        ["resize", *_obj("s1", f1), "--image-opts", _luks("vol.luks"), "2M"],
        ["amend", *_obj("s1", f1), *_obj("s2", f2), "-o", "state=active,new-secret=s2,iter-time=10",
         "--image-opts", _luks("vol.luks")],
    ]  # fmt: skip


# Raised in the middle of a convert that has unlocked both images.
_FORCED = """
import sys
import qimg.convert.writer as w
def boom(*a, **k):
    raise RuntimeError("forced failure")
w.Writer.write_all = boom
from qimg.cli import main
sys.argv = ["qimg", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """(work dir, TMPDIR, [(argv, stdout + stderr)]) of every run; a
    failed one is made again with QIMG_DEBUG (tracebacks on)."""
    base = tmp_path_factory.mktemp("leaks")
    w, tmp = base / "work", base / "tmp"
    w.mkdir()
    tmp.mkdir()
    (w / "s1.txt").write_bytes(S1)
    (w / "s2.txt").write_bytes(S2)
    (w / "wrong.txt").write_bytes(WRONG)
    (w / "data.raw").write_bytes(os.urandom(1 << 20) + bytes(1 << 20))
    env = dict(os.environ, TMPDIR=str(tmp))
    results = []
    for args in _runs(w):
        for e in (env, dict(env, QIMG_DEBUG="1")):
            proc = subprocess.run([sys.executable, "-m", "qimg", *args], cwd=w, env=e,
                                  capture_output=True, timeout=120)  # fmt: skip
            results.append((args, proc.stdout + proc.stderr))
            if proc.returncode == 0:
                break  # QIMG_DEBUG changes nothing but a failure's report
    conv = ["convert", *_obj("s1", w / "s1.txt"), *_obj("s2", w / "s2.txt"), "--image-opts",
            _enc("conv.qcow2"), "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s2,"
            "encrypt.iter-time=10", "forced.qcow2"]  # fmt: skip
    for debug in (False, True):
        e = dict(env, QIMG_DEBUG="1") if debug else env
        proc = subprocess.run([sys.executable, "-c", _FORCED, *conv], cwd=w, env=e,
                              capture_output=True, timeout=120)  # fmt: skip
        results.append((["forced", *conv], proc.stdout + proc.stderr))
    return w, tmp, results


def test_the_runs_did_what_the_suite_does(outputs):
    """The runs are the real thing: the image was made and read, the wrong
    secret refused, the forced failure's traceback printed."""
    w, _tmp, results = outputs
    text = b"\n".join(out for _args, out in results)
    data = (w / "data.raw").read_bytes()
    assert (w / "back.raw").read_bytes() == data and (w / "back-luks.raw").read_bytes() == data
    assert b"Invalid password" in text
    assert b"Traceback" in text and b"forced failure" in text


def test_the_re_keyed_images_open_with_the_new_secret(outputs):
    w, _tmp, _results = outputs
    assert _master_key(w / "enc.qcow2", "s2", S2) == _master_key(w / "enc.qcow2", "s1", S1)
    assert _master_key(w / "vol.luks", "s2", S2) == _master_key(w / "vol.luks", "s1", S1)


def test_no_output_error_or_traceback_holds_a_secret(outputs):
    _w, _tmp, results = outputs
    leaked = [(args, _leaks(out)) for args, out in results if _leaks(out)]
    assert not leaked


def test_no_temporary_file_is_left(outputs):
    w, tmp, _results = outputs
    assert list(tmp.iterdir()) == []
    made = {p.name for p in w.iterdir()}
    assert made <= {"s1.txt", "s2.txt", "wrong.txt", "data.raw", "enc.qcow2", "aes.qcow2", "conv.qcow2",
                    "back.raw", "conv2.qcow2", "vol.luks", "conv.luks", "back-luks.raw"}  # fmt: skip


def _master_key(path, sid: str, value: bytes) -> bytes:
    """The master key of a LUKS qcow2 image or raw LUKS volume."""
    from qimg.crypto import luks1

    if str(path).endswith(".luks"):
        data = path.read_bytes()
        return luks1.unlock(lambda pos, n: data[pos : pos + n], value).master_key
    from qimg.api import open_image
    from qimg.formats.qcow2.encryption import luks_reader
    from qimg.secrets import Secrets

    name = f'json:{{"driver": "qcow2", "file": {{"filename": "{path}"}}, "encrypt.key-secret": "{sid}"}}'
    with open_image(name, secrets=Secrets({sid: value})) as image:
        return luks1.unlock(luks_reader(image), value).master_key


def test_images_hold_no_passphrase_and_no_master_key(outputs):
    w, _tmp, results = outputs
    keys = {"enc": _master_key(w / "enc.qcow2", "s1", S1), "conv": _master_key(w / "conv.qcow2", "s1", S1),
            "conv2": _master_key(w / "conv2.qcow2", "s2", S2),
            "vol": _master_key(w / "vol.luks", "s1", S1), "conv-luks": _master_key(w / "conv.luks", "s1", S1),
            "aes-key": S1[:16]}  # legacy AES: the secret's first 16 bytes are the key  # fmt: skip
    for image in ("enc.qcow2", "aes.qcow2", "conv.qcow2", "conv2.qcow2", "vol.luks", "conv.luks"):
        assert not _leaks((w / image).read_bytes(), keys), image
    # ... nor does any output
    for _args, out in results:
        assert not _leaks(out, keys)


@pytest.mark.parametrize("prefix", [b"", b"x", b"xy"])
def test_the_detector_finds_every_spelling(prefix):
    for text in (S1, S1.hex().encode(), base64.b64encode(prefix + S1), repr(KEY).encode()):
        assert _leaks(b"qimg: " + text + b"\n")


@pytest.mark.parametrize("image", ["enc.qcow2", "vol.luks"])
def test_a_traceback_with_local_variables_holds_no_secret(outputs, image):
    """Even a traceback that prints every frame's local variables (pytest
    -l, error reporters) shows no passphrase: secret values repr as
    <secret>."""
    import traceback

    from qimg.api import open_image
    from qimg.errors import QimgError
    from qimg.secrets import parse_objects

    w, _tmp, _results = outputs
    option = "key-secret" if image.endswith(".luks") else "encrypt.key-secret"
    driver = "luks" if image.endswith(".luks") else "qcow2"
    name = f'json:{{"driver": "{driver}", "file": {{"filename": "{w / image}"}}, "{option}": "s"}}'
    secrets = parse_objects([f"secret,id=s,file={w / 'wrong.txt'}"])
    with pytest.raises(QimgError) as info:
        open_image(name, secrets=secrets)
    # qimg's frames (this test's own locals hold the command lines above)
    frames = traceback.walk_tb(info.value.__traceback__.tb_next)
    text = "".join(traceback.StackSummary.extract(frames, capture_locals=True).format())
    assert "secret = <secret>" in text  # the frames were there, their secrets hidden
    assert not _leaks(text.encode())
