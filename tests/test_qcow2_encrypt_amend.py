"""Re-keying LUKS qcow2 images with amend (encrypt.state, keyslot,
new-secret, old-secret, iter-time, --force), judged by qemu-img: slots
added by one tool open the image in the other, erased slots open it in
neither, and a sequence of amends (refusals included) leaves the same
slots with the same messages as qemu-img's."""

from __future__ import annotations

import json
import shutil

import pytest
from test_qcow2_encrypt import CASES, _qemu, _qemu_create, _qemu_raw, _qimg

SECRETS = {"s": "corr3ct-horse", "n": "batt3ry-staple", "m": "third-0ne"}
OBJECTS = [a for sid, v in SECRETS.items() for a in ("--object", f"secret,id={sid},data={v}")]


def _opts(path, sid: str) -> str:
    return f"driver=qcow2,file.filename={path},encrypt.key-secret={sid}"


def _slots(path) -> list[bool]:
    info = json.loads(_qemu("qemu-img", "info", "--output=json", path).stdout)
    return [s["active"] for s in info["format-specific"]["data"]["encrypt"]["slots"]]


def _amend(tool: str, path, opts: str, key: str, *extra: str):
    args = ["amend", *OBJECTS, *extra, "-o", opts, "--image-opts", _opts(path, key)]
    return _qemu("qemu-img", *args, check=False) if tool == "qemu-img" else (
        _qimg(*args, check=False))  # fmt: skip


def _reads(tool: str, path, key: str, tmp_path) -> bool:
    """Whether `tool` opens the image with secret `key` (and reads data)."""
    args = ["check", *OBJECTS, "--image-opts", _opts(path, key)]
    proc = _qemu("qemu-img", *args, check=False) if tool == "qemu-img" else (
        _qimg(*args, check=False))  # fmt: skip
    return proc.returncode == 0


@pytest.fixture
def luks(qemu_img, qemu_io, tmp_path):
    path = tmp_path / "enc.qcow2"
    _qemu_create(path, CASES["luks-v3"], secret=SECRETS["s"])
    obj = ["--object", f"secret,id=s,data={SECRETS['s']}"]
    _qemu("qemu-io", *obj, "--image-opts", _opts(path, "s"), "-c", "write -P 0x42 4096 9000")
    return path


@pytest.mark.parametrize("adder,other", [("qimg", "qemu-img"), ("qemu-img", "qimg")])
def test_slot_added_by_one_tool_opens_in_the_other_and_erased_opens_in_neither(
    luks, tmp_path, adder, other
):
    want = _qemu_raw(luks, tmp_path, SECRETS["s"])
    proc = _amend(
        adder, luks, "encrypt.state=active,encrypt.new-secret=n,encrypt.iter-time=10", "s"
    )
    assert proc.returncode == 0, proc.stderr
    assert _slots(luks)[:2] == [True, True]
    assert _reads(other, luks, "n", tmp_path) and _reads(adder, luks, "n", tmp_path)
    assert _qemu_raw(luks, tmp_path, SECRETS["n"]) == want
    # The other tool erases the original slot by its password.
    proc = _amend(other, luks, "encrypt.state=inactive,encrypt.old-secret=s", "n")
    assert proc.returncode == 0, proc.stderr
    assert _slots(luks)[:2] == [False, True]
    for tool in ("qimg", "qemu-img"):
        assert not _reads(tool, luks, "s", tmp_path)
        assert _reads(tool, luks, "n", tmp_path)
    assert _qemu_raw(luks, tmp_path, SECRETS["n"]) == want


# Each step: amend options, the secret the image is opened with, extra args.
SEQUENCE = [
    ("encrypt.state=active,encrypt.new-secret=n,encrypt.iter-time=10", "s"),
    ("encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=1,encrypt.iter-time=10", "s"),
    (
        "encrypt.state=active,encrypt.new-secret=m,encrypt.keyslot=1,encrypt.iter-time=10",
        "s",
        "--force",
    ),  # fmt: skip
    ("encrypt.state=active,encrypt.new-secret=n,encrypt.keyslot=9", "s"),
    ("encrypt.state=active", "s"),
    ("encrypt.new-secret=n", "s"),
    ("encrypt.state=active,encrypt.new-secret=nope", "s"),
    ("encrypt.state=inactive,encrypt.new-secret=n", "s"),
    ("encrypt.state=inactive", "s"),
    ("encrypt.state=inactive,encrypt.old-secret=n", "s"),
    ("encrypt.state=inactive,encrypt.keyslot=0", "m"),
    ("encrypt.state=inactive,encrypt.keyslot=0", "m"),
    ("encrypt.state=inactive,encrypt.old-secret=m", "m"),
    ("encrypt.state=inactive,encrypt.keyslot=1,encrypt.iter-time=10", "m"),
    ("encrypt.state=inactive,encrypt.keyslot=1", "m", "--force"),
    ("encrypt.state=active,encrypt.new-secret=n,encrypt.iter-time=10", "m"),
]


def test_amend_sequence_leaves_the_slots_and_messages_qemu_img_does(luks, tmp_path):
    copies = {}
    for tool in ("qemu-img", "qimg"):
        copies[tool] = tmp_path / f"{tool}.qcow2"
        shutil.copy(luks, copies[tool])
    for step in SEQUENCE:
        opts, key, *extra = step
        got = {}
        for tool, path in copies.items():
            proc = _amend(tool, path, opts, key, *extra)
            text = proc.stderr.replace("qimg:", "qemu-img:").replace(str(path), "IMG")
            got[tool] = (proc.returncode, text, _slots(path))
        assert got["qimg"] == got["qemu-img"], step


def test_amend_of_aes_or_plain_image_refused_as_qemu_img(qemu_img, tmp_path):
    aes = tmp_path / "aes.qcow2"
    _qemu_create(aes, CASES["aes-v3"], secret=SECRETS["s"])
    plain = tmp_path / "plain.qcow2"
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", plain, "1M")
    for path in (aes, plain):
        opts = "encrypt.state=active,encrypt.new-secret=n"
        q, m = (_amend(t, path, opts, "s") for t in ("qemu-img", "qimg"))
        assert (m.returncode, m.stderr.replace("qimg:", "qemu-img:")) == (q.returncode, q.stderr)
