"""The luks format (a raw LUKS1 container) as qemu-img 7.2 has it: images
made by either tool read by the other to the same bytes, for the ciphers
both support; info, resize and key slot amends; errors in qemu-img's words
with nothing written."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from conftest import qimg, require_tool, run, run_timing_pbkdf

SECRET = "pw-Kx81"
SID = "s"
OBJ = ["--object", f"secret,id={SID},data={SECRET}"]


def _opts(path, sid: str = SID) -> str:
    return f"driver=luks,key-secret={sid},file.filename={path}"


def _qemu_create(path, extra: str = "", size: str = "1M") -> None:
    """qemu-img create -f luks (run_timing_pbkdf)."""
    run_timing_pbkdf(
        ["qemu-img", "create", "-q", "-f", "luks", *OBJ, "-o",
         f"key-secret={SID},iter-time=10{extra}", str(path), size]
    )  # fmt: skip


def _qemu_raw(path, tmp_path, sid: str = SID, obj=OBJ) -> bytes:
    out = tmp_path / "qemu-out.raw"
    run(["qemu-img", "convert", *obj, "--image-opts", _opts(path, sid), "-O", "raw", str(out)])
    data = out.read_bytes()
    out.unlink()
    return data


def _qimg_raw(path, tmp_path, sid: str = SID, obj=OBJ) -> bytes:
    out = tmp_path / "qimg-out.raw"
    qimg("convert", *obj, "--image-opts", _opts(path, sid), "-O", "raw", out)
    data = out.read_bytes()
    out.unlink()
    return data


def _source(tmp_path, size: int = 1 << 20):
    """Data with a hole and a zero run in it (convert must still encrypt
    the zeros: a LUKS payload has no zero-init)."""
    rng = bytearray(os.urandom(size))
    rng[size // 4 : size // 2] = bytes(size // 4)
    path = tmp_path / "src.raw"
    path.write_bytes(rng)
    return path, bytes(rng)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _qemu_error(proc) -> str:
    return proc.stderr.strip().replace("qemu-img: ", "").replace("qemu-io: ", "")


def _qimg_error(proc) -> str:
    return proc.stderr.strip().replace("qimg: ", "")


# (cipher-alg, cipher-mode, ivgen-alg, ivgen-hash-alg): each AES key size,
# mode and IV generator in some pairing, and CAST5 (cryptography has it).
QIMG_MADE = [
    ("aes-256", "xts", "plain64", None),
    ("aes-128", "xts", "plain", None),
    ("aes-192", "xts", "essiv", "sha256"),
    ("aes-128", "xts", "essiv", "sha256"),
    ("aes-256", "cbc", "essiv", "sha256"),
    ("aes-128", "cbc", "plain64", None),
    ("aes-256", "cbc", "plain", None),
    ("aes-192", "xts", "plain64", None),
    ("cast5-128", "cbc", "plain64", None),
    ("aes-256", "ecb", "plain", None),
    ("aes-128", "ctr", "plain64", None),
]


def _cipher_opts(alg, mode, ivgen, ivhash) -> str:
    opts = f",cipher-alg={alg},cipher-mode={mode},ivgen-alg={ivgen}"
    return opts + (f",ivgen-hash-alg={ivhash}" if ivhash else "")


@pytest.mark.parametrize("case", QIMG_MADE, ids=lambda c: "-".join(filter(None, c)))
def test_luks_made_and_filled_by_qimg_reads_the_same_in_qemu(qemu_img, tmp_path, case):
    src, data = _source(tmp_path)
    dst = tmp_path / "dst.luks"
    qimg("convert", *OBJ, "-O", "luks", "-o",
         f"key-secret={SID},iter-time=10,hash-alg=sha1{_cipher_opts(*case)}", src, dst)  # fmt: skip
    assert _qemu_raw(dst, tmp_path) == data
    info = json.loads(run(["qemu-img", "info", "--output=json", str(dst)]).stdout)
    spec = info["format-specific"]["data"]
    assert (spec["cipher-alg"], spec["cipher-mode"], spec["ivgen-alg"]) == case[:3]
    assert spec.get("ivgen-hash-alg") == case[3] and spec["hash-alg"] == "sha1"


QEMU_MADE = [
    ("aes-256", "xts", "plain64", None),
    ("aes-128", "cbc", "essiv", "sha256"),
    ("aes-192", "xts", "plain", None),
    ("cast5-128", "cbc", "essiv", "md5"),
]


@pytest.mark.parametrize("case", QEMU_MADE, ids=lambda c: "-".join(filter(None, c)))
def test_luks_made_and_filled_by_qemu_reads_the_same_in_qimg(qemu_img, qemu_io, tmp_path, case):
    path = tmp_path / "q.luks"
    _qemu_create(path, _cipher_opts(*case))
    run(["qemu-io", *OBJ, "--image-opts", _opts(path), "-c", "write -P 0x5a 0 300k",
         "-c", "write -P 0xa5 301k 700k"])  # fmt: skip
    got = _qimg_raw(path, tmp_path)
    assert got[: 300 << 10] == b"\x5a" * (300 << 10)
    assert got[301 << 10 : 1001 << 10] == b"\xa5" * (700 << 10)
    assert got == _qemu_raw(path, tmp_path)  # unwritten sectors: the same noise


def test_info_of_qimg_made_luks_is_qemus_in_json_and_human(qemu_img, tmp_path):
    path = tmp_path / "i.luks"
    proc = qimg("create", "-f", "luks", *OBJ, "-o", f"key-secret={SID},iter-time=10", path, "3M")
    assert proc.stdout == (
        f"Formatting '{path}', fmt=luks size=3145728 key-secret={SID} iter-time=10\n"
    )
    for args in ([str(path)], [*OBJ, "--image-opts", _opts(path)]):
        for output in ("--output=json", "--output=human"):
            want = run(["qemu-img", "info", output, *args]).stdout
            assert qimg("info", output, *args).stdout == want
    assert qimg("info", "-f", "luks", path).stdout == run(["qemu-img", "info", str(path)]).stdout


def test_unaligned_writes_merge_with_the_sectors_around_them(qemu_luks, qemu_io, tmp_path):
    from qimg.api import open_image

    path = tmp_path / "u.luks"
    path.write_bytes(qemu_luks.read_bytes())
    run(["qemu-io", *OBJ, "--image-opts", _opts(path), "-c", "write -P 0x11 0 64k"])
    secrets = {SID: SECRET.encode()}
    with open_image(f"json:{json.dumps({'driver': 'luks', 'key-secret': SID, 'file': {'filename': str(path)}})}",
                    writable=True, secrets=secrets) as img:  # fmt: skip
        img.write(1000, b"\x22" * 3000)
        img.write(5000, b"\x33" * 7)
        assert img.read(990, 20) == b"\x11" * 10 + b"\x22" * 10
    want = bytearray(b"\x11" * 65536)
    want[1000:4000] = b"\x22" * 3000
    want[5000:5007] = b"\x33" * 7
    assert _qemu_raw(path, tmp_path)[:65536] == want


def test_resize_keeps_data_and_matches_qemu(qemu_img, tmp_path):
    src, data = _source(tmp_path)
    ours, theirs = tmp_path / "a.luks", tmp_path / "b.luks"
    qimg("convert", *OBJ, "-O", "luks", "-o", f"key-secret={SID},iter-time=10", src, ours)
    theirs.write_bytes(ours.read_bytes())
    for size in ("3M", "+512k"):
        qimg("resize", *OBJ, "--image-opts", _opts(ours), size)
        run(["qemu-img", "resize", *OBJ, "--image-opts", _opts(theirs), size])
        assert ours.stat().st_size == theirs.stat().st_size
    assert _qemu_raw(ours, tmp_path)[: len(data)] == data
    refused = qimg("resize", *OBJ, "--image-opts", _opts(ours), "1M", check=False)
    expected = run(["qemu-img", "resize", *OBJ, "--image-opts", _opts(theirs), "1M"], check=False)
    assert (refused.returncode, _qimg_error(refused)) == (1, _qemu_error(expected))
    qimg("resize", "--shrink", *OBJ, "--image-opts", _opts(ours), "1M")
    assert _qemu_raw(ours, tmp_path) == data


@pytest.fixture(scope="module")
def qemu_luks(tmp_path_factory):
    """One qemu-made luks image (QEMU's PBKDF benchmark costs a second of
    CPU per creation): tests take copies."""
    require_tool("qemu-img")
    path = tmp_path_factory.mktemp("luks") / "base.luks"
    _qemu_create(path)
    return path


def _pair(tmp_path, base):
    """Two copies of a qemu-made image: the same volume for both tools."""
    ours, theirs = tmp_path / "ours.luks", tmp_path / "theirs.luks"
    ours.write_bytes(base.read_bytes())
    theirs.write_bytes(base.read_bytes())
    return ours, theirs


SECRETS = [*OBJ, "--object", "secret,id=n,data=new-one", "--object", "secret,id=x,data=other"]
AMEND_STEPS = [
    "state=active",
    "state=active,new-secret=n,old-secret=x",
    "state=active,new-secret=n,iter-time=10",
    "state=active,new-secret=n,keyslot=1,iter-time=10",
    "state=active,new-secret=n,keyslot=-1",
    "state=active,new-secret=zz,iter-time=10",
    "state=inactive,iter-time=10,keyslot=1",
    "state=inactive",
    "state=inactive,keyslot=5",
    "state=inactive,old-secret=x",
    "state=inactive,keyslot=1,old-secret=s",
    "state=inactive,old-secret=n",
    "state=inactive,keyslot=0",
    "state=foo",
    "new-secret=n",
    "cipher-alg=aes-128",
]


def _slots(path) -> list[bool]:
    info = json.loads(run(["qemu-img", "info", "--output=json", str(path)]).stdout)
    return [s["active"] for s in info["format-specific"]["data"]["slots"]]


def test_amend_steps_refuse_and_change_slots_as_qemu_img(qemu_luks, tmp_path):
    ours, theirs = _pair(tmp_path, qemu_luks)
    for step in AMEND_STEPS:
        mine = qimg("amend", *SECRETS, "--image-opts", _opts(ours), "-o", step, check=False)
        want = run(
            ["qemu-img", "amend", *SECRETS, "--image-opts", _opts(theirs), "-o", step],
            check=False,
        )
        assert (mine.returncode, _qimg_error(mine)) == (want.returncode, _qemu_error(want)), step
        if not want.returncode:
            assert _slots(ours) == _slots(theirs), step
    assert _slots(ours) == _slots(theirs)


def test_key_slots_added_by_one_tool_open_in_the_other(qemu_luks, qemu_io, tmp_path):
    path = tmp_path / "k.luks"
    path.write_bytes(qemu_luks.read_bytes())
    qimg("amend", *SECRETS, "--image-opts", _opts(path), "-o", "state=active,new-secret=n,iter-time=10")  # fmt: skip
    run(["qemu-io", *SECRETS, "--image-opts", _opts(path, "n"), "-c", "write -P 7 0 4k"])
    run(["qemu-img", "amend", *SECRETS, "--image-opts", _opts(path, "n"),
         "-o", "state=active,new-secret=x,iter-time=10"])  # fmt: skip
    assert _qimg_raw(path, tmp_path, "x", SECRETS)[:4096] == b"\x07" * 4096
    qimg("amend", *SECRETS, "--image-opts", _opts(path, "x"), "-o", "state=inactive,old-secret=n")  # fmt: skip
    refused = run(["qemu-io", *SECRETS, "--image-opts", _opts(path, "n"), "-c", "read 0 4k"], check=False)  # fmt: skip
    assert "Invalid password, cannot unlock any keyslot" in refused.stderr + refused.stdout
    failed = qimg("info", *SECRETS, "--image-opts", _opts(path, "n"), check=False)
    # info opens without unlocking, as qemu-img's does; a read needs the key.
    assert failed.returncode == 0
    failed = qimg("convert", *SECRETS, "--image-opts", _opts(path, "n"), "-O", "raw", tmp_path / "o", check=False)  # fmt: skip
    assert failed.stderr.endswith("Invalid password, cannot unlock any keyslot\n")


ERROR_CASES = {
    "wrong_secret": (["--object", f"secret,id={SID},data=nope"], _opts),
    "missing_key_secret": (OBJ, lambda p: f"driver=luks,file.filename={p}"),
    "unknown_secret_id": (OBJ, lambda p: _opts(p, "zz")),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_secret_errors_are_qemus_one_line_and_write_nothing(qemu_luks, tmp_path, case):
    obj, name = ERROR_CASES[case]
    ours, theirs = _pair(tmp_path, qemu_luks)
    before = _digest(ours)
    mine = qimg("convert", *obj, "--image-opts", name(ours), "-O", "raw", tmp_path / "o1", check=False)  # fmt: skip
    want = run(["qemu-img", "convert", *obj, "--image-opts", name(theirs), "-O", "raw",
                str(tmp_path / "o2")], check=False)  # fmt: skip
    assert mine.returncode == want.returncode == 1
    assert _qimg_error(mine).replace("ours", "theirs") == _qemu_error(want)
    assert len(mine.stderr.strip().splitlines()) == 1 and "Traceback" not in mine.stderr
    assert not (tmp_path / "o1").exists()
    resized = qimg("resize", *obj, "--image-opts", name(ours), "2M", check=False)
    assert resized.returncode == 1 and _digest(ours) == before
    assert SECRET not in mine.stdout + mine.stderr + resized.stdout + resized.stderr


def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


CORRUPT_CASES = {
    "bad_magic": lambda p: _patch(p, 0, b"LUKX"),
    "bad_version": lambda p: _patch(p, 6, b"\0\2"),
    "bad_cipher_mode": lambda p: _patch(p, 40, b"xts-foo\0"),
    "stripes": lambda p: _patch(p, 208 + 44, b"\0\0\0\1"),
    "slot_state": lambda p: _patch(p, 208, b"\0\0\0\7"),
    "truncated_key_material": lambda p: os.truncate(p, 100000),
    "shorter_than_payload": lambda p: os.truncate(p, 1 << 20),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_corrupt_header_or_key_material_is_one_line_as_qemu_and_nothing_written(
    qemu_luks, tmp_path, case
):
    ours, theirs = _pair(tmp_path, qemu_luks)
    for path in (ours, theirs):
        CORRUPT_CASES[case](path)
    before = _digest(ours)
    for args in (["info", "-f", "luks"], ["convert", *OBJ, "-O", "raw", "--image-opts"]):
        target = [] if args[0] == "info" else [str(tmp_path / "o")]
        ours_arg = str(ours) if args[0] == "info" else _opts(ours)
        theirs_arg = str(theirs) if args[0] == "info" else _opts(theirs)
        mine = qimg(*args, ours_arg, *target, check=False)
        want = run(["qemu-img", *args, theirs_arg, *target], check=False)
        assert mine.returncode == want.returncode, (case, args)
        if want.returncode:
            assert _qimg_error(mine).replace("ours", "theirs") == _qemu_error(want)
            assert len(mine.stderr.strip().splitlines()) == 1
    qimg("resize", *OBJ, "--image-opts", _opts(ours), "4M", check=False)
    qimg("amend", *SECRETS, "--image-opts", _opts(ours), "-o", "state=active,new-secret=n", check=False)  # fmt: skip
    assert _digest(ours) == before


@pytest.mark.parametrize(
    "extra",
    [",cipher-alg=des", ",cipher-alg=cast5-128,cipher-mode=xts", ",ivgen-alg=essiv,ivgen-hash-alg=sha1",
     ",cipher-alg=foo", ",preallocation=foo", ",iter-time=abc", ",cipher-alg=cast5-128,ivgen-alg=essiv"],
)  # fmt: skip
def test_create_refusals_are_qemus_and_leave_no_file(qemu_img, tmp_path, extra):
    for tool, path in (("qimg", tmp_path / "a.luks"), ("qemu-img", tmp_path / "b.luks")):
        args = ["create", "-q", "-f", "luks", *OBJ, "-o", f"key-secret={SID},iter-time=10{extra}", str(path), "1M"]  # fmt: skip
        proc = qimg(*args, check=False) if tool == "qimg" else run([tool, *args], check=False)
        assert proc.returncode == 1 and not path.exists()
        if tool == "qimg":
            mine = _qimg_error(proc).replace("a.luks", "b.luks")
        else:
            assert mine == _qemu_error(proc)


def test_ciphers_cryptography_lacks_are_refused_with_nothing_created(tmp_path):
    path = tmp_path / "t.luks"
    proc = qimg("create", "-q", "-f", "luks", *OBJ, "-o",
                f"key-secret={SID},cipher-alg=twofish-256", path, "1M", check=False)  # fmt: skip
    assert proc.returncode == 1 and not path.exists()
    assert proc.stderr == f"qimg: {path}: Unsupported cipher algorithm twofish-256\n"


def test_amend_help_and_create_help_list_qemus_options(qemu_img):
    for args in (["amend", "-f", "luks", "-o", "help"], ["create", "-f", "luks", "-o", "help"]):
        assert qimg(*args).stdout == run(["qemu-img", *args]).stdout
