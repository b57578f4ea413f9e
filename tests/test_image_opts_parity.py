"""--image-opts (and json: names) with the options of encrypted nodes, and
convert's --target-image-opts, on every command that has them: the same
exit code, output and messages as qemu-img's, on images that need no key
(a key-secret is accepted on any qcow2 node; the options a driver lacks
are refused in QEMU's words)."""

from __future__ import annotations

import shutil
import sys

import pytest
from conftest import run, run_timing_pbkdf

SECRET = ["--object", "secret,id=s,data=hunter2"]
Q = "driver=qcow2,file.filename=p.qcow2"

CASES = {
    "info-key-secret": ["info", *SECRET, "--image-opts", f"{Q},encrypt.key-secret=s"],
    "info-json-key-secret": ["info", "--output=json", "--image-opts", f"{Q},encrypt.key-secret=s"],
    "info-file-driver": ["info", "--image-opts", f"{Q},file.driver=file,encrypt.key-secret=s"],
    "info-json-name-nested": [
        "info", 'json:{"driver":"qcow2","file":{"filename":"p.qcow2"},"encrypt":{"key-secret":"s"}}',
    ],
    "info-probed-key-secret": ["info", "--image-opts", "file.filename=p.qcow2,encrypt.key-secret=s"],
    "info-probed-luks-option": ["info", "--image-opts", "file.filename=p.qcow2,key-secret=s"],
    "info-raw-key-secret": ["info", "--image-opts", "driver=raw,file.filename=r.raw,key-secret=s"],
    "info-qcow2-bare-key-secret": ["info", "--image-opts", f"{Q},key-secret=s"],
    "info-encrypt-alone": ["info", "--image-opts", f"{Q},encrypt=s"],
    "info-encrypt-cipher-ignored": ["info", "--image-opts", f"{Q},encrypt.cipher-alg=aes-256"],
    "info-encrypted-refuses-cipher": [
        "info", "--image-opts", "driver=qcow2,file.filename=base.qcow2,encrypt.cipher-alg=aes-256",
    ],
    "info-encrypted-format-mismatch": [
        "info", "--image-opts", "driver=qcow2,file.filename=base.qcow2,encrypt.format=aes",
    ],
    "info-encrypted-key-secret": [
        "info", "--image-opts", "driver=qcow2,file.filename=base.qcow2,encrypt.key-secret=s",
    ],
    "info-format-without-encryption": ["info", "--image-opts", f"{Q},encrypt.format=luks"],
    "info-backing-option": ["info", "--image-opts", f"{Q},backing.encrypt.key-secret=s"],
    "info-image-opts-and-format": ["info", "-f", "qcow2", "--image-opts", Q],
    "info-image-opts-plain-name": ["info", "--image-opts", "p.qcow2"],
    "check-key-secret": ["check", *SECRET, "--image-opts", f"{Q},encrypt.key-secret=s"],
    "check-json": ["check", "--output=json", "--image-opts", f"{Q},encrypt.key-secret=s"],
    "check-format-without-encryption": ["check", "--image-opts", f"{Q},encrypt.format=aes"],
    "check-raw": ["check", "--image-opts", "driver=raw,file.filename=r.raw"],
    "check-image-opts-and-format": ["check", "-f", "qcow2", "--image-opts", Q],
    "check-overlay-backing-option": [
        "check", *SECRET, "--image-opts", "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=s",
    ],
    "check-overlay-backing-unknown-secret": [
        "check", *SECRET, "--image-opts", "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=x",
    ],
    "check-overlay-backing-without-secret": [
        "check", *SECRET, "--image-opts", "driver=qcow2,file.filename=top.qcow2",
    ],
    "check-encrypted-wrong-secret": [
        "check", "--object", "secret,id=s,data=wrong", "--image-opts",
        "driver=qcow2,file.filename=base.qcow2,encrypt.key-secret=s",
    ],
    "check-encrypted-json-name": [
        "check", *SECRET, 'json:{"driver":"qcow2","file":{"filename":"base.qcow2"},"encrypt":{"key-secret":"s"}}',
    ],
    "check-encrypted-plain-name": ["check", *SECRET, "base.qcow2"],
    "convert-encrypted-source": [
        "convert", *SECRET, "--image-opts", "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=s",
        "out.raw",
    ],
    "create-over-encrypted-backing": ["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "new.qcow2"],
    "create-over-luks-backing": ["create", "-f", "qcow2", "-b", "vol.luks", "-F", "luks", "new.qcow2"],
    "resize-abbreviated-long-options": [
        "resize", "--obj", "secret,id=s,data=x", "--shr", "--image", f"{Q},encrypt.key-secret=s", "512K",
    ],
    "amend-abbreviated-long-options": [
        "amend", "--obj", "secret,id=s,data=x", "--forc", "-o", "lazy_refcounts=on", "--image", Q,
    ],
    "resize": ["resize", *SECRET, "--image-opts", f"{Q},encrypt.key-secret=s", "2M"],
    "amend": ["amend", *SECRET, "-o", "lazy_refcounts=on", "--image-opts", f"{Q},encrypt.key-secret=s"],
    "snapshot": ["snapshot", *SECRET, "-c", "s1", "--image-opts", f"{Q},encrypt.key-secret=s"],
    "bitmap": ["bitmap", *SECRET, "--add", "--image-opts", f"{Q},encrypt.key-secret=s", "b0"],
    "convert-image-opts": ["convert", *SECRET, "--image-opts", f"{Q},encrypt.key-secret=s", "out.raw"],
    "convert-image-opts-and-format": ["convert", "-f", "qcow2", "--image-opts", Q, "out.raw"],
    "convert-target-opts-without-n": ["convert", "--target-image-opts", "p.qcow2", "x"],
    "convert-target-opts-before-o-check": [
        "convert", "--target-image-opts", "-o", "cluster_size=4k", "p.qcow2", "x",
    ],
    "convert-target-opts-with-target-format": [
        "convert", "-n", "--target-image-opts", "-O", "raw", "p.qcow2", "driver=raw,file.filename=r.raw",
    ],
    "convert-target-opts": [
        "convert", *SECRET, "-n", "--target-image-opts", "p.qcow2",
        "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=s",
    ],
    "convert-target-opts-probed-raw": ["convert", "-n", "--target-image-opts", "p.qcow2", "file.filename=r.raw"],
    "convert-target-opts-wrong-driver": [
        "convert", "-n", "--target-image-opts", "p.qcow2", "driver=qcow2,file.filename=r.raw",
    ],
    "convert-target-opts-unknown-option": [
        "convert", "-n", "--target-image-opts", "p.qcow2", "driver=raw,file.filename=r.raw,key-secret=s",
    ],
    "convert-both-opts": [
        "convert", *SECRET, "-n", "--image-opts", "--target-image-opts",
        f"{Q},encrypt.key-secret=s", "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=s",
    ],
}  # fmt: skip


def _made(qemu_img, args) -> None:
    """A LUKS creation (run_timing_pbkdf)."""
    run_timing_pbkdf([qemu_img, "create", "-q", *args])


def _images(qemu_img, d):
    run([qemu_img, "create", "-q", "-f", "qcow2", str(d / "p.qcow2"), "1M"])
    run([qemu_img, "create", "-q", "-f", "qcow2", str(d / "t.qcow2"), "1M"])
    run([qemu_img, "create", "-q", "-f", "raw", str(d / "r.raw"), "1M"])
    enc = ["--object", "secret,id=s,data=hunter2"]
    opts = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10"
    _made(qemu_img, ["-f", "qcow2", *enc, "-o", opts, str(d / "base.qcow2"), "1M"])
    _made(
        qemu_img, ["-f", "luks", *enc, "-o", "key-secret=s,iter-time=10", str(d / "vol.luks"), "1M"]
    )
    run(
        [
            qemu_img,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            str(d / "top.qcow2"),
        ]
    )
    run(["qemu-io", "-c", "write -P 7 0 64k", str(d / "p.qcow2")])


@pytest.fixture(scope="module")
def originals(tmp_path_factory, qemu_img):
    d = tmp_path_factory.mktemp("image-opts")
    _images(qemu_img, d)
    return d


@pytest.mark.parametrize("case", CASES)
def test_image_opts_behave_as_in_qemu_img(tmp_path, qemu_img, originals, case):
    results = {}
    for tool, cmd in (("qemu-img", [qemu_img]), ("qimg", [sys.executable, "-m", "qimg"])):
        d = tmp_path / tool
        shutil.copytree(originals, d)
        proc = run([*cmd, *CASES[case]], check=False, cwd=d)
        results[tool] = (
            proc.returncode,
            proc.stdout,
            proc.stderr.replace(f"{tool}:", "PROG:"),
        )
        if proc.returncode == 0 and case.startswith("convert"):
            out = d / ("out.raw" if "out.raw" in CASES[case] else "t.qcow2")
            if "r.raw" in CASES[case][-1]:
                out = d / "r.raw"
            results[tool + "-data"] = (
                run([qemu_img, "convert", "-U", "-O", "raw", str(out), str(d / "check.raw")])
                and (d / "check.raw").read_bytes()
            )
    assert results["qimg"] == results["qemu-img"]
    assert results.get("qimg-data") == results.get("qemu-img-data")


LOCKED = {
    "info-image-opts": ["info", "--image-opts", Q],
    "info-json": ["info", 'json:{"driver":"qcow2","file":{"filename":"p.qcow2"}}'],
    "info-file-protocol": ["info", "file:p.qcow2"],
    "check-image-opts": ["check", "--image-opts", Q],
    "check-repair-json": ["check", "-r", "all", 'json:{"driver":"qcow2","file":{"filename":"p.qcow2"}}'],
    "resize-image-opts": ["resize", "--image-opts", Q, "2M"],
    "convert-source": ["convert", "p.qcow2", "out.raw"],
    "convert-source-image-opts": ["convert", "--image-opts", Q, "out.raw"],
    "convert-target-image-opts": ["convert", "-n", "--target-image-opts", "t.qcow2", Q],
}  # fmt: skip


@pytest.mark.parametrize("case", LOCKED)
def test_lock_conflict_names_the_image_as_given(tmp_path, qemu_img, qemu_io, originals, case):
    """qemu-img names a locked image as it was given (option string,
    json: or file: name), once; the hint names the file."""
    import subprocess
    import time

    d = tmp_path / "d"
    shutil.copytree(originals, d)
    holder = subprocess.Popen([qemu_io, str(d / "p.qcow2")], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.5)  # qemu-io has the image open (and locked) once it waits for commands
        results = []
        for tool, cmd in (("qemu-img", [qemu_img]), ("qimg", [sys.executable, "-m", "qimg"])):
            proc = run([*cmd, *LOCKED[case]], check=False, cwd=d)
            results.append((proc.returncode, proc.stderr.replace(f"{tool}:", "PROG:")))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert results[1] == results[0]
    assert results[0][0] == 1 and "lock" in results[0][1]
