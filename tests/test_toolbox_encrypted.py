"""map, measure, compare, dd, rebase and commit on encrypted images (LUKS
qcow2 and raw LUKS), the secret given with --object and named through
--image-opts (encrypt.key-secret, key-secret, backing.encrypt.key-secret),
each compared with qemu-img 7.2 run on the same files: exit codes,
output, messages (program name aside) and the data written.

The images are made once for the module (iter-time=10) and copied where a
command writes."""

from __future__ import annotations

import shutil
import sys

import pytest
from conftest import run, run_timing_pbkdf
from secret_tools import qemu_create_encrypted

SEC = "--object"


@pytest.fixture(scope="module")
def imgs(tmp_path_factory, qemu_img, qemu_io):
    """A directory of images sharing the secret `sec`:
    enc.qcow2 (LUKS qcow2) and enc.luks (raw LUKS) written alike,
    enc.raw and luks.raw (their plain copies), base.qcow2 and base2.qcow2 (plain),
    eov.qcow2 (encrypted overlay over base.qcow2), enc.qcow2 (encrypted)
    and pov.qcow2 (plain overlay over enc.qcow2)."""
    d = tmp_path_factory.mktemp("toolbox-enc")
    pw = d / "pw"
    pw.write_text("passw0rd")
    obj = f"secret,id=sec,file={pw}"

    def io(opts: str, *cmds: str) -> None:
        args = [qemu_io, "--object", obj, "--image-opts", opts]
        for c in cmds:
            args += ["-c", c]
        run(args, cwd=d)

    writes = ("write -P 0x5a 0 64k", "write -P 0x11 1M 4k", "write -z 2M 64k")
    qemu_create_encrypted(qemu_img, d / "enc.qcow2", pw)
    io("driver=qcow2,encrypt.key-secret=sec,file.filename=enc.qcow2", *writes)
    qemu_create_encrypted(qemu_img, d / "enc.luks", pw, fmt="luks")
    io("driver=luks,key-secret=sec,file.filename=enc.luks", *writes)
    # Their plain copies (a raw LUKS container's unwritten sectors read as
    # the decryption of zeros: not zeros).
    for opts, out in (
        ("driver=qcow2,encrypt.key-secret=sec,file.filename=enc.qcow2", "enc.raw"),
        ("driver=luks,key-secret=sec,file.filename=enc.luks", "luks.raw"),
    ):
        run([qemu_img, "convert", "--object", obj, "--image-opts", opts, "-O", "raw", out], cwd=d)
    for name, pattern in (("base", "write -P 1 0 1M"), ("base2", "write -P 2 512k 1M")):
        run([qemu_img, "create", "-q", "-f", "qcow2", f"{name}.qcow2", "4M"], cwd=d)
        io(f"driver=qcow2,file.filename={name}.qcow2", pattern)
    run_timing_pbkdf(
        [
            qemu_img,
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            obj,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec,encrypt.iter-time=10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "eov.qcow2",
        ],
        cwd=d,
    )
    io("driver=qcow2,encrypt.key-secret=sec,file.filename=eov.qcow2", "write -P 9 3M 64k")
    run(
        [
            qemu_img,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "enc.qcow2",
            "-F",
            "qcow2",
            "pov.qcow2",
            "4M",
        ],
        cwd=d,
    )
    io("driver=qcow2,file.filename=pov.qcow2,backing.encrypt.key-secret=sec", "write -P 7 512k 64k")
    return d


def _obj(d) -> list[str]:
    return [SEC, f"secret,id=sec,file={d / 'pw'}"]


def both(d, *args: str):
    """(qemu-img's, qimg's) results of the same command line, run in `d`."""
    ours = run([sys.executable, "-m", "qimg", *args], check=False, cwd=d)
    theirs = run(["qemu-img", *args], check=False, cwd=d)
    return theirs, ours


def assert_same(theirs, ours) -> None:
    assert ours.returncode == theirs.returncode, (theirs.stderr, ours.stderr)
    assert ours.stdout == theirs.stdout
    assert ours.stderr.replace("qimg: ", "") == theirs.stderr.replace("qemu-img: ", "")


QCOW2_OPTS = "driver=qcow2,encrypt.key-secret=sec,file.filename=enc.qcow2"
LUKS_OPTS = "driver=luks,key-secret=sec,file.filename=enc.luks"


def _read_raw(d, opts: str, out: str) -> bytes:
    run(["qemu-img", "convert", *_obj(d), "--image-opts", opts, "-O", "raw", out], cwd=d)
    data = (d / out).read_bytes()
    (d / out).unlink()
    return data


# --- compare -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts, copy", [(QCOW2_OPTS, "enc.raw"), (LUKS_OPTS, "luks.raw")], ids=["qcow2", "luks"]
)
@pytest.mark.parametrize("strict", [False, True], ids=["plain", "strict"])
def test_compare_encrypted_with_its_decrypted_copy_as_qemu_img(imgs, opts, copy, strict):
    flags = ["-s"] if strict else []
    raw = f"driver=raw,file.filename={copy}"
    theirs, ours = both(imgs, "compare", *_obj(imgs), *flags, "--image-opts", opts, raw)
    assert_same(theirs, ours)
    if not strict:
        assert ours.returncode == 0


def test_compare_encrypted_qcow2_with_luks_strict_as_qemu_img(imgs):
    assert_same(*both(imgs, "compare", *_obj(imgs), "-s", "--image-opts", QCOW2_OPTS, LUKS_OPTS))


@pytest.mark.parametrize(
    "args",
    [
        ["enc.qcow2", "enc.raw"],
        ["-f", "luks", "enc.luks", "enc.raw"],
        ["--image-opts", QCOW2_OPTS.replace("=sec", "=nosuch"), "driver=raw,file.filename=enc.raw"],
    ],
    ids=["qcow2-no-secret", "luks-no-secret", "unknown-id"],
)
def test_compare_without_the_secret_fails_as_qemu_img(imgs, args):
    theirs, ours = both(imgs, "compare", *_obj(imgs), *args)
    assert_same(theirs, ours)
    assert ours.returncode == 2


# --- dd ----------------------------------------------------------------------------


@pytest.mark.parametrize("opts", [QCOW2_OPTS, LUKS_OPTS], ids=["qcow2", "luks"])
def test_dd_out_of_encrypted_image_writes_what_qemu_img_writes(imgs, opts):
    ops = ["bs=64k", "skip=1", "count=40"]
    theirs, ours = (
        run(
            [*tool, "dd", *_obj(imgs), "--image-opts", f"if={opts}", f"of={out}", *ops],
            check=False,
            cwd=imgs,
        )
        for tool, out in ((["qemu-img"], "dd-q.raw"), ([sys.executable, "-m", "qimg"], "dd-o.raw"))
    )
    assert_same(theirs, ours)
    assert (imgs / "dd-o.raw").read_bytes() == (imgs / "dd-q.raw").read_bytes()


def test_dd_without_the_secret_fails_as_qemu_img_and_writes_nothing(imgs):
    theirs, ours = both(imgs, "dd", *_obj(imgs), "-f", "qcow2", "if=enc.qcow2", "of=dd-none.raw")
    assert_same(theirs, ours)
    assert ours.returncode == 1 and not (imgs / "dd-none.raw").exists()


def test_dd_to_luks_output_needs_a_key_secret_as_qemu_img_says(imgs):
    theirs, ours = both(
        imgs, "dd", *_obj(imgs), "--image-opts", f"if={LUKS_OPTS}", "of=dd-out.luks", "-O", "luks"
    )
    assert_same(theirs, ours)
    assert ours.returncode == 1 and not (imgs / "dd-out.luks").exists()


# --- map and measure ---------------------------------------------------------------


@pytest.mark.parametrize("opts", [QCOW2_OPTS, LUKS_OPTS], ids=["qcow2", "luks"])
@pytest.mark.parametrize("output", ["json", "human"])
def test_map_of_encrypted_image_as_qemu_img(imgs, opts, output):
    assert_same(*both(imgs, "map", *_obj(imgs), f"--output={output}", "--image-opts", opts))


@pytest.mark.parametrize("args", [["enc.qcow2"], ["-f", "luks", "enc.luks"]], ids=["qcow2", "luks"])
def test_map_without_the_secret_fails_as_qemu_img(imgs, args):
    assert_same(*both(imgs, "map", *_obj(imgs), *args))


@pytest.mark.parametrize(
    "opts, target",
    [
        (QCOW2_OPTS, ["-O", "qcow2"]),
        (QCOW2_OPTS, ["-O", "raw"]),
        (LUKS_OPTS, ["-O", "raw"]),
        (LUKS_OPTS, ["-O", "qcow2"]),
    ],
    ids=["qcow2-to-qcow2", "qcow2-to-raw", "luks-to-raw", "luks-to-qcow2"],
)
def test_measure_of_encrypted_source_as_qemu_img(imgs, target, opts):
    assert_same(*both(imgs, "measure", *_obj(imgs), "--output=json", *target, "--image-opts", opts))


def test_measure_without_the_secret_fails_as_qemu_img(imgs):
    assert_same(*both(imgs, "measure", *_obj(imgs), "-O", "qcow2", "enc.qcow2"))


# --- rebase ------------------------------------------------------------------------


def _copies(d, name: str) -> tuple[str, str]:
    """Two copies of image `name` (one for each tool)."""
    out = (f"q-{name}", f"o-{name}")
    for copy in out:
        shutil.copyfile(d / name, d / copy)
    return out


def _run_each(d, copies, make_args):
    """qemu-img on copies[0], qimg on copies[1]: (theirs, ours)."""
    theirs = run(["qemu-img", *make_args(copies[0])], check=False, cwd=d)
    ours = run([sys.executable, "-m", "qimg", *make_args(copies[1])], check=False, cwd=d)
    return theirs, ours


def _same_result(d, copies, opts_of) -> None:
    """Both copies read the same through qemu-img, pass its check, and
    name the same backing file."""
    q, o = copies
    assert _read_raw(d, opts_of(o), "o.raw") == _read_raw(d, opts_of(q), "q.raw")
    for name in copies:
        run(["qemu-img", "check", *_obj(d), "--image-opts", opts_of(name)], cwd=d)
    info = [
        run(["qemu-img", "info", "-U", "--output=json", name], cwd=d).stdout.replace(name, "X")
        for name in copies
    ]
    backing = [[line for line in text.splitlines() if "backing-filename" in line] for text in info]
    assert backing[0] == backing[1]


def test_rebase_encrypted_overlay_as_qemu_img(imgs):
    copies = _copies(imgs, "eov.qcow2")
    base2 = str(imgs / "base2.qcow2")

    def opts(name):
        return f"driver=qcow2,encrypt.key-secret=sec,file.filename={name}"

    theirs, ours = _run_each(
        imgs,
        copies,
        lambda n: ["rebase", *_obj(imgs), "-b", base2, "-F", "qcow2", "--image-opts", opts(n)],
    )
    assert_same(theirs, ours)
    assert ours.returncode == 0
    _same_result(imgs, copies, opts)


def test_rebase_over_encrypted_backing_with_backing_secret_as_qemu_img(imgs):
    copies = _copies(imgs, "pov.qcow2")
    base2 = str(imgs / "base2.qcow2")

    def opts(name):
        return f"driver=qcow2,file.filename={name},backing.encrypt.key-secret=sec"

    theirs, ours = _run_each(
        imgs,
        copies,
        lambda n: ["rebase", *_obj(imgs), "-b", base2, "-F", "qcow2", "--image-opts", opts(n)],
    )
    assert_same(theirs, ours)
    assert ours.returncode == 0
    _same_result(imgs, copies, lambda n: f"driver=qcow2,file.filename={n}")


@pytest.mark.parametrize(
    "args",
    [
        # no secret for the overlay
        ["-b", "base2.qcow2", "-F", "qcow2", "eov.qcow2"],
        # no secret for its backing file
        ["-b", "base2.qcow2", "-F", "qcow2", "pov.qcow2"],
        # a relative new name beside a json: image name (the key-secret)
        [
            "-b",
            "base2.qcow2",
            "-F",
            "qcow2",
            "--image-opts",
            "driver=qcow2,encrypt.key-secret=sec,file.filename=eov.qcow2",
        ],
        # ... or its backing file's (backing.encrypt.key-secret)
        [
            "-b",
            "base2.qcow2",
            "-F",
            "qcow2",
            "--image-opts",
            "driver=qcow2,file.filename=pov.qcow2,backing.encrypt.key-secret=sec",
        ],
        # an encrypted new backing file named without its secret
        [
            "-b",
            "enc.qcow2",
            "-F",
            "qcow2",
            "--image-opts",
            "driver=qcow2,encrypt.key-secret=sec,file.filename=eov.qcow2",
        ],
    ],
    ids=[
        "overlay",
        "backing",
        "relative-beside-json",
        "relative-beside-backing-json",
        "new-backing",
    ],
)
def test_rebase_refusals_on_encrypted_images_as_qemu_img(imgs, args):
    if args[1] == "enc.qcow2":
        args = ["-b", str(imgs / "enc.qcow2"), *args[2:]]
    before = (imgs / "eov.qcow2").read_bytes(), (imgs / "pov.qcow2").read_bytes()
    theirs, ours = both(imgs, "rebase", *_obj(imgs), *args)
    assert_same(theirs, ours)
    assert ours.returncode == 1
    assert ((imgs / "eov.qcow2").read_bytes(), (imgs / "pov.qcow2").read_bytes()) == before


# --- commit ------------------------------------------------------------------------


def test_commit_encrypted_overlay_into_plain_base_as_qemu_img(imgs):
    """Each tool commits its own copy of the chain; the bases then read
    the same, and each overlay is emptied."""
    results = []
    for tool, tag in ((["qemu-img"], "q"), ([sys.executable, "-m", "qimg"], "o")):
        base, top = f"{tag}-cb.qcow2", f"{tag}-ct.qcow2"
        shutil.copyfile(imgs / "base.qcow2", imgs / base)
        shutil.copyfile(imgs / "eov.qcow2", imgs / top)
        run(
            [
                "qemu-img",
                "rebase",
                "-u",
                "-b",
                base,
                "-F",
                "qcow2",
                "--object",
                f"secret,id=sec,file={imgs / 'pw'}",
                "--image-opts",
                f"driver=qcow2,encrypt.key-secret=sec,file.filename={top}",
            ],
            cwd=imgs,
        )
        opts = f"driver=qcow2,encrypt.key-secret=sec,file.filename={top}"
        proc = run([*tool, "commit", *_obj(imgs), "--image-opts", opts], check=False, cwd=imgs)
        results.append(proc)
    assert_same(*results)
    assert results[1].returncode == 0
    assert _read_raw(imgs, "driver=qcow2,file.filename=o-cb.qcow2", "o.raw") == _read_raw(
        imgs, "driver=qcow2,file.filename=q-cb.qcow2", "q.raw"
    )
    top = "driver=qcow2,encrypt.key-secret=sec,file.filename={}-ct.qcow2"
    assert _read_raw(imgs, top.format("o"), "o.raw") == _read_raw(imgs, top.format("q"), "q.raw")
    run(["qemu-img", "check", "o-cb.qcow2"], cwd=imgs)


def test_commit_into_encrypted_backing_with_backing_secret_as_qemu_img(imgs):
    results = []
    for tool, tag in ((["qemu-img"], "q"), ([sys.executable, "-m", "qimg"], "o")):
        base, top = f"{tag}-eb.qcow2", f"{tag}-pt.qcow2"
        shutil.copyfile(imgs / "enc.qcow2", imgs / base)
        shutil.copyfile(imgs / "pov.qcow2", imgs / top)
        run(["qemu-img", "rebase", "-u", "-b", base, "-F", "qcow2", top], cwd=imgs)
        opts = f"driver=qcow2,file.filename={top},backing.encrypt.key-secret=sec"
        proc = run([*tool, "commit", *_obj(imgs), "--image-opts", opts], check=False, cwd=imgs)
        results.append(proc)
    assert_same(*results)
    assert results[1].returncode == 0
    base = "driver=qcow2,encrypt.key-secret=sec,file.filename={}-eb.qcow2"
    assert _read_raw(imgs, base.format("o"), "o.raw") == _read_raw(imgs, base.format("q"), "q.raw")
    run(["qemu-img", "check", *_obj(imgs), "--image-opts", base.format("o")], cwd=imgs)


@pytest.mark.parametrize(
    "args",
    [
        ["eov.qcow2"],
        ["pov.qcow2"],
        [
            "-b",
            "enc.qcow2",
            "--image-opts",
            "driver=qcow2,file.filename=pov.qcow2,backing.encrypt.key-secret=sec",
        ],
    ],
    ids=["overlay", "backing", "base-beside-json"],
)
def test_commit_refusals_on_encrypted_images_as_qemu_img(imgs, args):
    before = (imgs / "enc.qcow2").read_bytes(), (imgs / "pov.qcow2").read_bytes()
    theirs, ours = both(imgs, "commit", *_obj(imgs), *args)
    assert_same(theirs, ours)
    assert ours.returncode == 1
    assert ((imgs / "enc.qcow2").read_bytes(), (imgs / "pov.qcow2").read_bytes()) == before
