"""libvirt's qemu-img command lines for encrypted qcow2 volumes, replayed
with qimg in qemu-img's place (secrets from files, as libvirt passes
them): create (compat=0.10), resize through --image-opts, and a volume
clone by convert -n with --target-image-opts. The one change from
libvirt's lines: encrypt.iter-time=10 on create (libvirt leaves QEMU's
2 s default), so that each unlock costs milliseconds."""

from __future__ import annotations

import json

from test_qcow2_encrypt import _qemu, _qemu_check, _qemu_raw, _qimg

MiB = 1 << 20


def _tool(tool: str, *args, cwd):
    return _qemu("qemu-img", *args, cwd=cwd) if tool == "qemu-img" else _qimg(*args, cwd=cwd)


def _info(path) -> dict:
    info = json.loads(_qemu("qemu-img", "info", "--output=json", path).stdout)
    enc = info["format-specific"]["data"]["encrypt"]
    del enc["uuid"], enc["master-key-iters"]
    for slot in enc["slots"]:
        slot.pop("iters", None)
    return {k: info[k] for k in ("virtual-size", "format-specific", "encrypted")}


def test_libvirt_volume_create_resize_clone_as_with_qemu_img(qemu_img, qemu_io, tmp_path):
    results = {}
    for tool in ("qemu-img", "qimg"):
        d = tmp_path / tool
        d.mkdir()
        (d / "src.key").write_text("corr3ct-horse")
        (d / "dst.key").write_text("batt3ry-staple")
        src_obj = ["--object", f"secret,id=S,file={d / 'src.key'}"]
        dst_obj = ["--object", f"secret,id=D,file={d / 'dst.key'}"]
        _tool(tool, "create", "-f", "qcow2", *src_obj, "-o",
              "encrypt.format=luks,encrypt.key-secret=S,compat=0.10,encrypt.iter-time=10",
              "vol.qcow2", "65536K", cwd=d)  # fmt: skip
        src_opts = f"driver=qcow2,encrypt.key-secret=S,file.filename={d / 'vol.qcow2'}"
        _qemu("qemu-io", *src_obj, "--image-opts", src_opts, "-c", "write -P 0x5e 1M 3M")
        _tool(tool, "resize", *src_obj, "--image-opts", src_opts, "134217728", cwd=d)
        _tool(tool, "create", "-f", "qcow2", *dst_obj, "-o",
              "encrypt.format=luks,encrypt.key-secret=D,compat=0.10,encrypt.iter-time=10",
              "clone.qcow2", "134217728", cwd=d)  # fmt: skip
        _tool(tool, "convert", "--image-opts", "-n", "--target-image-opts", *dst_obj, *src_obj,
              src_opts, f"driver=qcow2,file.filename={d / 'clone.qcow2'},encrypt.key-secret=D",
              cwd=d)  # fmt: skip
        _qemu_check(d / "clone.qcow2", "batt3ry-staple")
        data = _qemu_raw(d / "clone.qcow2", tmp_path, "batt3ry-staple")
        assert data == bytes(MiB) + b"\x5e" * 3 * MiB + bytes(124 * MiB)
        results[tool] = (_info(d / "vol.qcow2"), _info(d / "clone.qcow2"))
    assert results["qimg"] == results["qemu-img"]
