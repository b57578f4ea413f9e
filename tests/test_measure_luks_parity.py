"""qimg measure of LUKS-encrypted targets (qcow2 with encrypt.format=luks,
and the luks format) and of encrypted sources, against qemu-img 7.2: the
header's size for every cipher, mode and IV generator QEMU accepts, and
its refusals. qemu-img derives real keys to find that size, so its PBKDF
time is kept short (encrypt.iter-time=10)."""

from __future__ import annotations

import pytest
from conftest import PBKDF_FLAKE, PBKDF_TRIES, run, run_timing_pbkdf
from mapcorpus import both, create, settle

SECRET = ("--object", "secret,id=s,data=x")


def _both_retried(d, *args):
    """both(), made again while qemu-img's timing of PBKDF2 fails
    (conftest.run_timing_pbkdf)."""
    for _ in range(PBKDF_TRIES):
        theirs, mine = both(d, *args)
        if PBKDF_FLAKE not in theirs[2]:
            break
    return theirs, mine


@pytest.mark.parametrize(
    "options",
    [
        "",
        "encrypt.cipher-alg=aes-128",
        "encrypt.cipher-alg=aes-192",
        "encrypt.cipher-mode=cbc",
        "encrypt.cipher-mode=ecb,cluster_size=4k",
        "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc",
        "encrypt.cipher-alg=cast5-128",
        "encrypt.cipher-alg=serpent-128,encrypt.cipher-mode=cbc",
        "encrypt.cipher-alg=twofish-256",
        "encrypt.cipher-alg=serpent-192,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1",
        "encrypt.cipher-alg=aes-128,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1",
        "encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha512",
        "encrypt.hash-alg=md5,cluster_size=2M,preallocation=full",
        "encrypt.cipher-alg=des",
        "encrypt.cipher-alg=foo",
        "encrypt.cipher-mode=foo",
        "encrypt.iter-time=x",
        "encrypt.key-secret=nosuch",
    ],
)
def test_measure_of_a_luks_qcow2_target_is_qemu_imgs(tmp_path, qemu_img, options):
    opts = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10"
    opts += f",{options}" if options else ""
    theirs, mine = _both_retried(
        tmp_path, *SECRET, "measure", "--size", "1G", "-O", "qcow2", "-o", opts
    )
    assert mine == theirs


@pytest.mark.parametrize(
    "args",
    [
        ("--size", "1001", "-o", "key-secret=s,iter-time=10"),
        ("--size", "1G", "-o", "key-secret=s,iter-time=10,cipher-alg=cast5-128,cipher-mode=cbc"),
        ("--size", "1G", "-o", "key-secret=s,iter-time=10,preallocation=foo"),
        (
            "--size",
            "1G",
        ),
        ("--size", "1G", "-o", "key-secret=s,cipher-alg=foo"),
        ("--output=json", "-o", "key-secret=s,iter-time=10", "image.qcow2"),
    ],
    ids=lambda a: " ".join(a),
)
def test_measure_of_a_luks_target_is_qemu_imgs(tmp_path, qemu_img, args):
    create(tmp_path, "image.qcow2", "3M")
    theirs, mine = _both_retried(tmp_path, *SECRET, "measure", "-O", "luks", *args)
    assert mine == theirs


def test_map_and_measure_of_an_encrypted_source_are_qemu_imgs(tmp_path, qemu_img, qemu_io):
    """No host offsets (the human table refuses the data), sizes as for
    any source."""
    opts = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10"
    run_timing_pbkdf(
        ["qemu-img", "create", "-q", *SECRET, "-f", "qcow2", "-o", opts, "enc.qcow2", "4M"],
        cwd=tmp_path,
    )
    name = "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s"
    run(["qemu-io", *SECRET, "--image-opts", "-c", "write -P 1 64k 128k", name], cwd=tmp_path)
    settle(tmp_path)
    for args in (
        ("map", "--output=json"),
        ("map",),
        ("map", "--output=json", "--start-offset", "1000"),
        ("measure", "-O", "qcow2"),
    ):
        theirs, mine = both(tmp_path, *SECRET, *args, "--image-opts", name)
        assert mine == theirs, args


def test_map_and_measure_of_a_luks_image_are_qemu_imgs(tmp_path, qemu_img):
    """The luks format has no block status in QEMU: data throughout,
    without host offsets."""
    run_timing_pbkdf(
        ["qemu-img", "create", "-q", *SECRET, "-f", "luks", "-o", "key-secret=s,iter-time=10"]
        + ["x.luks", "4M"],
        cwd=tmp_path,
    )
    name = "driver=luks,file.filename=x.luks,key-secret=s"
    for args in (
        ("map", "--output=json"),
        ("map",),
        ("map", "--output=json", "--start-offset", "1000", "--max-length", "5000"),
        ("measure", "-O", "qcow2"),
    ):
        theirs, mine = both(tmp_path, *SECRET, *args, "--image-opts", name)
        assert mine == theirs, args
