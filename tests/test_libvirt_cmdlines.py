"""libvirt's storage driver runs qemu-img (found on PATH) with these command
lines for encrypted volumes (issue 13, "A real client: libvirt"); each is
replayed here with qimg in qemu-img's place, secrets as files (`file=` in
--object) as libvirt passes them, and the result judged by qemu-img: info,
check, and the data read back with the same secret. The inputs are made by
qimg and by qemu-img in turn. (libvirtd itself is not driven: the command
lines are replayed.)

libvirt's create lines leave encrypt.iter-time at QEMU's default of 2 s of
PBKDF2; they are replayed as they are once per format, and the volumes the
other lines start from add `iter-time=10`, so that each open of them does
not cost 2 s.
"""

from __future__ import annotations

import json
import sys

import pytest
from conftest import run, run_timing_pbkdf

SIZE = 65536 * 1024  # libvirt's "65536K"
NEW_SIZE = 134217728


def _qimg(*args, cwd=None):
    return run([sys.executable, "-m", "qimg", *map(str, args)], cwd=cwd)


def _tool(producer: str, qemu_img: str) -> list[str]:
    return [qemu_img] if producer == "qemu-img" else [sys.executable, "-m", "qimg"]


def _secret(tmp_path, name: str, value: bytes) -> str:
    f = tmp_path / name
    f.write_bytes(value)
    return str(f)


def _opts(fmt: str, path, sid: str) -> str:
    if fmt == "luks":
        return f"driver=luks,key-secret={sid},file.filename={path}"
    return f"driver=qcow2,encrypt.key-secret={sid},file.filename={path}"


def _create_line(fmt: str, sid: str, secret_file: str, path, fast: bool) -> list[str]:
    """libvirt's create command line (with iter-time=10 added if `fast`)."""
    if fmt == "luks":
        opts = f"key-secret={sid}" + (",iter-time=10" if fast else "")
        return ["create", "-f", "luks", "--object", f"secret,id={sid},file={secret_file}", "-o", opts,
                str(path), "65536K"]  # fmt: skip
    opts = f"encrypt.format=luks,encrypt.key-secret={sid},compat=0.10"
    opts += ",encrypt.iter-time=10" if fast else ""
    return ["create", "-f", "qcow2", "--object", f"secret,id={sid},file={secret_file}", "-o", opts,
            str(path), "65536K"]  # fmt: skip


def _make(tool: list[str], args: list[str]) -> None:
    """Run a create (run_timing_pbkdf: qemu-img's timing of PBKDF2 fails now and then)."""
    run_timing_pbkdf([*tool, *args])


def _read(qemu_img, fmt, path, sid, secret_file, tmp_path) -> bytes:
    """The volume's guest data as qemu-img reads it with the secret."""
    out = tmp_path / f"read-{path.name}.raw"
    run([qemu_img, "convert", "--object", f"secret,id={sid},file={secret_file}",
         "--image-opts", _opts(fmt, path, sid), "-O", "raw", str(out)])  # fmt: skip
    data = out.read_bytes()
    out.unlink()
    return data


def _qemu_check(qemu_img, fmt, path, sid, secret_file) -> None:
    proc = run([qemu_img, "check", "--object", f"secret,id={sid},file={secret_file}",
                "--image-opts", _opts(fmt, path, sid)], check=False)  # fmt: skip
    # a raw LUKS volume has no metadata to check: qemu-img says so (63)
    assert proc.returncode == (63 if fmt == "luks" else 0), proc.stderr


def _info(qemu_img, path) -> dict:
    return json.loads(run([qemu_img, "info", "--output=json", str(path)]).stdout)


def _fill(producer, qemu_img, fmt, path, sid, secret_file, data: bytes, tmp_path) -> None:
    """Write `data` at offset 0: with qemu-io, or with qimg convert -n."""
    obj = f"secret,id={sid},file={secret_file}"
    if producer == "qemu-img":
        src = tmp_path / "fill.raw"
        src.write_bytes(data)
        run(["qemu-io", "--object", obj, "--image-opts", _opts(fmt, path, sid),
             "-c", f"write -P 0x5a 0 {len(data)}"])  # fmt: skip
        return
    src = tmp_path / "fill.raw"
    src.write_bytes(data + bytes(SIZE - len(data)))
    _qimg("convert", "-n", "-f", "raw", "--object", obj, "--target-image-opts", src,
          _opts(fmt, path, sid))  # fmt: skip


FORMATS = ["qcow2", "luks"]
PRODUCERS = ["qemu-img", "qimg"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_libvirt_create_line_makes_a_volume_qemu_img_opens(tmp_path, qemu_img, fmt):
    pw = _secret(tmp_path, "vol.secret", b"libvirt-volume-passphrase")
    vol = tmp_path / f"vol.{fmt}"
    _make([sys.executable, "-m", "qimg"], _create_line(fmt, "S", pw, vol, fast=False))
    ref = tmp_path / f"ref.{fmt}"
    _make([qemu_img], _create_line(fmt, "S", pw, ref, fast=True))
    ours, theirs = _info(qemu_img, vol), _info(qemu_img, ref)
    for key in ("format", "virtual-size", "encrypted"):
        assert ours.get(key) == theirs.get(key)
    # One open with the secret each (each costs QEMU 2 s of PBKDF2 here):
    # check for the qcow2 volume (its metadata), reading back for luks.
    # (A new LUKS volume's payload was never written: it reads as the
    # decryption of zeros, in qemu-img as in qimg.)
    if fmt == "qcow2":
        assert ours["format-specific"]["data"]["compat"] == "0.10"
        _qemu_check(qemu_img, fmt, vol, "S", pw)
    else:
        assert len(_read(qemu_img, fmt, vol, "S", pw, tmp_path)) == SIZE


@pytest.mark.parametrize("producer", PRODUCERS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_libvirt_resize_line_grows_the_volume(tmp_path, qemu_img, fmt, producer):
    pw = _secret(tmp_path, "vol.secret", b"resize-passphrase")
    vol = tmp_path / f"vol.{fmt}"
    _make(_tool(producer, qemu_img), _create_line(fmt, "S", pw, vol, fast=True))
    data = b"\x5a" * (1 << 20)
    _fill(producer, qemu_img, fmt, vol, "S", pw, data, tmp_path)
    ref = tmp_path / f"ref.{fmt}"
    ref.write_bytes(vol.read_bytes())
    line = ["resize", "--object", f"secret,id=S,file={pw}", "--image-opts"]
    _qimg(*line, _opts(fmt, vol, "S"), str(NEW_SIZE))
    run([qemu_img, *line, _opts(fmt, ref, "S"), str(NEW_SIZE)])
    assert _info(qemu_img, vol)["virtual-size"] == NEW_SIZE
    if fmt == "qcow2":  # (a raw LUKS volume has no metadata to check)
        _qemu_check(qemu_img, fmt, vol, "S", pw)
    ours = _read(qemu_img, fmt, vol, "S", pw, tmp_path)
    # What the new area reads as is qemu-img's: zeros in qcow2; in a raw
    # LUKS volume the decryption of the zeros the file grew by.
    assert ours == _read(qemu_img, fmt, ref, "S", pw, tmp_path)
    assert ours[: len(data)] == data
    if fmt == "qcow2":
        assert ours == data + bytes(NEW_SIZE - len(data))


@pytest.mark.parametrize("producer", PRODUCERS)
def test_libvirt_clone_line_copies_into_a_volume_with_another_secret(tmp_path, qemu_img, producer):
    src_pw = _secret(tmp_path, "src.secret", b"source-passphrase")
    dst_pw = _secret(tmp_path, "dst.secret", b"clone-passphrase")
    src, dst = tmp_path / "src.qcow2", tmp_path / "dst.qcow2"
    tool = _tool(producer, qemu_img)
    _make(tool, _create_line("qcow2", "S", src_pw, src, fast=True))
    _make(tool, _create_line("qcow2", "D", dst_pw, dst, fast=True))
    data = b"\x5a" * (1 << 20)
    _fill(producer, qemu_img, "qcow2", src, "S", src_pw, data, tmp_path)
    _qimg("convert", "--image-opts", "-n", "--target-image-opts",
          "--object", f"secret,id=D,file={dst_pw}", "--object", f"secret,id=S,file={src_pw}",
          f"driver=qcow2,file.filename={src},encrypt.key-secret=S",
          f"driver=qcow2,file.filename={dst},encrypt.key-secret=D")  # fmt: skip
    _qemu_check(qemu_img, "qcow2", dst, "D", dst_pw)
    expected = _read(qemu_img, "qcow2", src, "S", src_pw, tmp_path)
    assert expected[: len(data)] == data
    assert _read(qemu_img, "qcow2", dst, "D", dst_pw, tmp_path) == expected
    # the clone keeps its own secret: the source's does not open it
    proc = run([qemu_img, "check", "--object", f"secret,id=D,file={src_pw}",
                "--image-opts", _opts("qcow2", dst, "D")], check=False)  # fmt: skip
    assert proc.returncode == 1 and "Invalid password" in proc.stderr
