"""Encrypted qcow2 images (LUKS and legacy AES, versions 2 and 3) and
legacy AES qcow (version 1) images: made and filled by qimg, read by
qemu-img with the same secret to the same bytes, checked clean by it; made
and filled by qemu-img/qemu-io, read by qimg to the same bytes; info,
option errors and wrong secrets as qemu-img has them.

Every qimg run here is checked for the secrets' values in its output."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from conftest import run, run_timing_pbkdf

import qimg

SECRET = "corr3ct-horse"
OTHER = "batt3ry-staple"
SECRETS = (SECRET, OTHER)
MiB = 1 << 20

# -o of each kind of encrypted image, iter-time kept short.
CASES = {
    "luks-v3": "encrypt.format=luks,encrypt.iter-time=10",
    "luks-v2": "encrypt.format=luks,encrypt.iter-time=10,compat=0.10",
    "luks-cbc-essiv": (
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,"
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,"
        "encrypt.hash-alg=sha1"
    ),
    "luks-cbc-plain64-extended-l2": (
        "encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-mode=cbc,"
        "encrypt.cipher-alg=aes-256,cluster_size=16384,extended_l2=on"
    ),
    "aes-v3": "encrypt.format=aes",
    "aes-v2": "encryption=on,compat=0.10",
}


def _obj(secret: str = SECRET, sid: str = "sec") -> list[str]:
    return ["--object", f"secret,id={sid},data={secret}"]


def _opts(path, sid: str = "sec") -> str:
    return f"driver=qcow2,encrypt.key-secret={sid},file.filename={path}"


def _qimg(*args, check: bool = True, cwd=None):
    """qimg's command line; no secret's value in what it prints."""
    proc = run([sys.executable, "-m", "qimg", *map(str, args)], check=check, cwd=cwd)
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr
    return proc


def _qemu(tool: str, *args, check: bool = True, cwd=None):
    return run_timing_pbkdf([tool, *map(str, args)], check=check, cwd=cwd)


def _qemu_create(path, opts: str, size: str = "4M", secret: str = SECRET):
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", *_obj(secret), "-o",
          f"{opts},encrypt.key-secret=sec", path, size)  # fmt: skip


def _qemu_raw(path, tmp_path, secret: str = SECRET) -> bytes:
    out = tmp_path / "qemu-read.raw"
    _qemu("qemu-img", "convert", *_obj(secret), "--image-opts", _opts(path), "-O", "raw", out)
    data = out.read_bytes()
    out.unlink()
    return data


def _qemu_check(path, secret: str = SECRET):
    proc = _qemu("qemu-img", "check", *_obj(secret), "--image-opts", _opts(path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _qimg_raw(path, tmp_path, secret: str = SECRET) -> bytes:
    out = tmp_path / "qimg-read.raw"
    _qimg("convert", *_obj(secret), "--image-opts", _opts(path), "-O", "raw", out)
    data = out.read_bytes()
    out.unlink()
    return data


def _fill(img, size: int, seed: int) -> bytearray:
    """Writes of every shape (unaligned heads and tails, partial clusters
    written twice, zeroes in place and over whole clusters); the model."""
    rng = random.Random(seed)
    model = bytearray(size)
    writes = [(1000, 3000), (3 * 65536 - 100, 70000), (MiB, 65536), (2 * MiB + 5, 1), (0, 700)]
    writes += [(rng.randrange(size - 9000), rng.randrange(1, 9000)) for _ in range(12)]
    for offset, length in writes:
        data = rng.randbytes(length)
        img.write(offset, data)
        model[offset : offset + length] = data
    for offset, length in ((MiB + 4096, 512), (2 * MiB, 3 * 65536 + 77), (100, 10)):
        img.write_zeroes(offset, length)
        model[offset : offset + length] = bytes(length)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_qimg_made_and_filled_image_reads_the_same_in_qemu_and_checks_clean(
    qemu_img, tmp_path, case
):
    path = tmp_path / "enc.qcow2"
    _qimg("create", "-q", "-f", "qcow2", *_obj(), "-o",
          f"{CASES[case]},encrypt.key-secret=sec", path, "4M")  # fmt: skip
    with _open(path, writable=True) as img:
        model = _fill(img, 4 * MiB, seed=len(case))
        assert img.read(0, img.size) == bytes(model)
    _qemu_check(path)
    assert _qemu_raw(path, tmp_path) == bytes(model)
    # Ciphertext on disk: no 4 KiB of the model's data is stored in clear.
    raw = path.read_bytes()
    assert bytes(model[1000:1512]) not in raw
    assert _qimg("info", path).stdout == _qemu("qemu-img", "info", path).stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_qemu_made_and_filled_image_reads_the_same_in_qimg(qemu_img, qemu_io, tmp_path, case):
    path = tmp_path / "enc.qcow2"
    _qemu_create(path, CASES[case])
    cmds = ["write -P 0x5a 1000 70000", "write -P 0xa5 1M 64k", "write -z 1032k 4k",
            "write -P 0x11 3M 511", "write -P 0x22 3000k 100k"]  # fmt: skip
    _qemu("qemu-io", *_obj(), "--image-opts", _opts(path), *(a for c in cmds for a in ("-c", c)))
    want = _qemu_raw(path, tmp_path)
    assert _qimg_raw(path, tmp_path) == want
    # And qimg writes into qemu's image, then qemu reads both.
    with _open(path, writable=True) as img:
        img.write(65536 - 300, b"\x77" * 600)
    expect = bytearray(want)
    expect[65536 - 300 : 65536 + 300] = b"\x77" * 600
    assert _qemu_raw(path, tmp_path) == bytes(expect)
    _qemu_check(path)


def _open(path, writable=False, secret: str = SECRET):
    name = f'json:{{"driver": "qcow2", "file.filename": "{path}", "encrypt.key-secret": "sec"}}'
    return qimg.open_image(name, writable=writable, secrets={"sec": secret.encode()})


def test_wrong_secret_is_one_line_as_qemu_img_and_nothing_is_written(qemu_img, tmp_path):
    path = tmp_path / "enc.qcow2"
    _qemu_create(path, CASES["luks-v3"])
    before = path.read_bytes()
    for args in (
        ["convert", *_obj(OTHER), "--image-opts", _opts(path), "-O", "raw", "out.raw"],
        ["check", *_obj(OTHER), "--image-opts", _opts(path)],
        ["resize", *_obj(OTHER), "--image-opts", _opts(path), "8M"],
        ["convert", *_obj(), "--image-opts", _opts(path, "nope"), "-O", "raw", "out.raw"],
        ["check", "enc.qcow2"],
        ["snapshot", "-c", "s1", "enc.qcow2"],
    ):
        q = _qemu("qemu-img", *args, check=False, cwd=tmp_path)
        m = _qimg(*args, check=False, cwd=tmp_path)
        assert m.returncode == q.returncode != 0, args
        assert m.stderr.replace("qimg:", "qemu-img:") == q.stderr, args
        assert len(m.stderr.splitlines()) == 1
        assert not (tmp_path / "out.raw").exists()
    assert path.read_bytes() == before


def test_info_of_encrypted_image_needs_no_secret(qemu_img, tmp_path):
    path = tmp_path / "enc.qcow2"
    _qimg("create", "-q", "-f", "qcow2", *_obj(), "-o",
          f"{CASES['luks-cbc-essiv']},encrypt.key-secret=sec", path, "1M")  # fmt: skip
    for args in (["info", path], ["info", "--output=json", path]):
        assert _qimg(*args).stdout == _qemu("qemu-img", *args).stdout


# qemu-img create -o ... of encrypted images that fail or succeed: the same
# output (Formatting line, message), exit code and file left behind.
CREATE_OPTIONS = [
    "encrypt.format=foo,encrypt.key-secret=sec",
    "encrypt.key-secret=sec",
    "encryption=off,encrypt.key-secret=sec",
    "encrypt.format=aes,encrypt.key-secret=sec,encrypt.cipher-alg=aes-128",
    "encrypt.format=aes",
    "encrypt.format=luks,encrypt.key-secret=nope",
    "encrypt.format=luks,encrypt.key-secret=sec,encrypt.cipher-alg=foo",
    "encrypt.format=luks,encrypt.key-secret=sec,encrypt.iter-time=abc",
    "encrypt.format=luks,encrypt.key-secret=sec,encrypt.cipher-alg=cast5-128",
    "encryption=on,encrypt.key-secret=sec,compat=0.10",
    "encrypt.format=luks,encrypt.key-secret=sec,encrypt.iter-time=10,preallocation=metadata",
    "encrypt.format=aes,encrypt.key-secret=sec,preallocation=full",
]


@pytest.mark.parametrize("options", CREATE_OPTIONS)
def test_create_encrypted_options_as_qemu_img(qemu_img, tmp_path, options):
    done = []
    for tool, d in (("qemu", tmp_path / "q"), ("qimg", tmp_path / "m")):
        d.mkdir()
        args = ["create", "-f", "qcow2", *_obj(), "-o", options, "t.qcow2", "1M"]
        proc = _qemu("qemu-img", *args, check=False, cwd=d) if tool == "qemu" else (
            _qimg(*args, check=False, cwd=d))  # fmt: skip
        done.append((proc.returncode, proc.stdout, proc.stderr.replace("qimg:", "qemu-img:"),
                     (d / "t.qcow2").exists()))  # fmt: skip
    assert done[1] == done[0]
    if done[0][0] == 0:
        q, m = tmp_path / "q" / "t.qcow2", tmp_path / "m" / "t.qcow2"
        _qemu_check(m)
        assert m.stat().st_size == q.stat().st_size  # QEMU's layout
        info = [_qemu("qemu-img", "info", p).stdout for p in (q, m)]
        strip = ("uuid", "iters", "disk size", "image:")
        assert [[ln for ln in i.splitlines() if not any(s in ln for s in strip)] for i in info][
            1
        ] == [[ln for ln in i.splitlines() if not any(s in ln for s in strip)] for i in info][0]


def test_convert_compressed_into_encrypted_target_refused_as_qemu_img(qemu_img, tmp_path):
    (tmp_path / "src.raw").write_bytes(b"hello world " * 10000)
    for opts in ("encrypt.format=luks,encrypt.key-secret=sec", "encryption=on"):
        args = ["convert", "-c", *_obj(), "-O", "qcow2", "-o", opts, "src.raw", "t.qcow2"]
        q = _qemu("qemu-img", *args, check=False, cwd=tmp_path)
        m = _qimg(*args, check=False, cwd=tmp_path)
        assert (m.returncode, m.stderr.replace("qimg:", "qemu-img:")) == (q.returncode, q.stderr)
        assert not (tmp_path / "t.qcow2").exists()


def test_compressed_write_into_encrypted_image_fails_writing_nothing(qemu_img, tmp_path):
    """qemu-img convert -c -n into an encrypted image fails while writing
    (EIO or EINVAL, at the first or a later cluster, after storing a
    compressed cluster it cannot read back); qimg fails at the first,
    writing nothing."""
    path = tmp_path / "enc.qcow2"
    _qemu_create(path, CASES["luks-v3"])
    (tmp_path / "src.raw").write_bytes(b"hello world " * 10000)
    args = ["convert", "-c", "-n", *_obj(), "--target-image-opts", "src.raw", _opts(path)]
    before = path.read_bytes()
    m = _qimg(*args, check=False, cwd=tmp_path)
    assert path.read_bytes() == before
    q = _qemu("qemu-img", *args, check=False, cwd=tmp_path)
    assert m.returncode == q.returncode == 1
    assert m.stderr == "qimg: error while writing at byte 0: Input/output error\n"
    assert q.stderr.startswith("qemu-img: error while writing at byte ")


@pytest.mark.parametrize("target", ["aes-v2", "luks-cbc-essiv"])
def test_convert_encrypted_to_encrypted_with_another_secret(qemu_img, qemu_io, tmp_path, target):
    src = tmp_path / "src.qcow2"
    _qemu_create(src, CASES["luks-v3"])
    _qemu("qemu-io", *_obj(), "--image-opts", _opts(src), "-c", "write -P 0x3c 12345 200000")
    dst = tmp_path / "dst.qcow2"
    _qimg("convert", *_obj(), *_obj(OTHER, "new"), "--image-opts", _opts(src), "-O", "qcow2",
          "-o", f"{CASES[target]},encrypt.key-secret=new", dst)  # fmt: skip
    assert _qemu_raw(dst, tmp_path, OTHER).replace(b"\0", b"") == b"\x3c" * 200000
    _qemu_check(dst, OTHER)
    # Back to plain raw through qimg, and the same bytes qemu reads.
    assert _qimg_raw(dst, tmp_path, OTHER) == _qemu_raw(src, tmp_path)


def test_snapshot_resize_bitmap_check_on_encrypted_image(qemu_img, tmp_path):
    path = tmp_path / "enc.qcow2"
    _qimg("create", "-q", "-f", "qcow2", *_obj(), "-o",
          f"{CASES['luks-v3']},encrypt.key-secret=sec", path, "2M")  # fmt: skip
    with _open(path, writable=True) as img:
        img.write(4096, b"\x01" * 70000)
    opts = _opts(path)
    _qimg("snapshot", *_obj(), "--image-opts", "-c", "snap", opts)
    with _open(path, writable=True) as img:
        img.write(4096, b"\x02" * 100)  # copy on write of a shared cluster
    _qimg("resize", *_obj(), "--image-opts", opts, "3M")
    _qimg("bitmap", *_obj(), "--image-opts", "--add", opts, "b0")
    _qemu_check(path)
    _qimg("check", *_obj(), "--image-opts", opts)
    data = _qemu_raw(path, tmp_path)
    assert len(data) == 3 * MiB
    assert data[4096:4196] == b"\x02" * 100 and data[4196 : 4096 + 70000] == b"\x01" * 69900
    info = _qemu("qemu-img", "info", "--output=json", path).stdout
    assert '"name": "b0"' in info and '"name": "snap"' in info
    _qimg("bitmap", *_obj(), "--image-opts", "--remove", opts, "b0")  # or -a is refused
    _qimg("snapshot", *_obj(), "--image-opts", "-a", "snap", opts)
    assert _qemu_raw(path, tmp_path)[4096 : 4096 + 70000] == b"\x01" * 70000


def test_qcow_v1_aes_image_made_by_qemu_reads_the_same_in_qimg(qemu_img, qemu_io, tmp_path):
    path = tmp_path / "enc.qcow"
    _qemu("qemu-img", "create", "-q", "-f", "qcow", *_obj(), "-o",
          "encrypt.format=aes,encrypt.key-secret=sec", path, "1M")  # fmt: skip
    opts = f"driver=qcow,encrypt.key-secret=sec,file.filename={path}"
    _qemu("qemu-io", *_obj(), "--image-opts", opts, "-c", "write -P 0x6b 1000 5000",
          "-c", "write -P 0x6c 600k 1")  # fmt: skip
    out_q, out_m = tmp_path / "q.raw", tmp_path / "m.raw"
    _qemu("qemu-img", "convert", *_obj(), "--image-opts", opts, "-O", "raw", out_q)
    _qimg("convert", *_obj(), "--image-opts", opts, "-O", "raw", out_m)
    assert out_m.read_bytes() == out_q.read_bytes()
    assert out_q.read_bytes()[1000:6000] == b"\x6b" * 5000


def test_preallocated_encrypted_image_has_qemus_layout(qemu_img, tmp_path):
    """The LUKS header follows the preallocated clusters, as qemu-img
    places it (QEMU sets up encryption after preallocating)."""
    files = []
    for tool in ("qemu-img", "qimg"):
        path = tmp_path / f"{tool}.qcow2"
        args = ["create", "-q", "-f", "qcow2", *_obj(), "-o",
                f"{CASES['luks-v3']},encrypt.key-secret=sec,preallocation=metadata", path, "1M"]  # fmt: skip
        _qemu(tool, *args) if tool == "qemu-img" else _qimg(*args)
        files.append(path)
    q, m = (Path(f).read_bytes() for f in files)
    assert len(q) == len(m)
    assert q[72:104] == m[72:104]  # the header extension: LUKS header offset, length
    _qemu_check(files[1])


def _damage(data: bytes, how: str) -> bytes:
    """A LUKS qcow2 image (made by qemu-img) damaged in its LUKS area."""
    import struct

    b = bytearray(data)
    ext = b.index(bytes.fromhex("0537be77"))  # the crypto header extension
    luks, _length = struct.unpack_from(">QQ", b, ext + 8)
    if how == "key-material-truncated":
        return bytes(b[: luks + 4096 + 1000])
    if how == "bad-magic":
        b[luks : luks + 6] = b"XXXXXX"
    elif how == "extension-shorter-than-key-material":
        struct.pack_into(">Q", b, ext + 16, 8192)
    return bytes(b)


@pytest.mark.parametrize(
    "how",
    ["key-material-truncated", "bad-magic", "extension-shorter-than-key-material"],
)
def test_damaged_luks_area_is_one_line_as_qemu_img_and_nothing_is_written(qemu_img, tmp_path, how):
    path = tmp_path / "enc.qcow2"
    _qemu_create(path, CASES["luks-v3"], size="1M")
    path.write_bytes(_damage(path.read_bytes(), how))
    before = path.read_bytes()
    for args in (
        ["convert", *_obj(), "--image-opts", _opts(path), "-O", "raw", "out.raw"],
        ["check", *_obj(), "--image-opts", _opts(path)],
        ["info", "enc.qcow2"],
    ):
        q = _qemu("qemu-img", *args, check=False, cwd=tmp_path)
        m = _qimg(*args, check=False, cwd=tmp_path)
        assert m.returncode == q.returncode, args
        assert m.stderr.replace("qimg:", "qemu-img:") == q.stderr, args
        assert m.returncode == 0 or len(m.stderr.splitlines()) == 1
        assert not (tmp_path / "out.raw").exists()
    assert path.read_bytes() == before
