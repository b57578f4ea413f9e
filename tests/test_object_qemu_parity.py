"""`--object secret,...` is checked as the command line is read, as
qemu-img's user_creatable_process_cmdline checks it: same message, same exit
code, and the image untouched, on every command that takes --object."""

from __future__ import annotations

import pytest
from conftest import qimg, run

OBJECTS = {
    "no-type": "foo=bar",
    "unknown-type": "bogus",
    "no-id": "secret",
    "bad-identifier": "secret,id=1s,data=x",
    "unexpected-key": "secret,id=s,data=x,bogus=1",
    "no-value": "secret,id=s",
    "file-and-data": "secret,id=s,data=x,file=/etc/hostname",
    "missing-file": "secret,id=s,file=/nonexistent/secret",
    "bad-format": "secret,id=s,data=x,format=hex",
    "bad-base64": "secret,id=s,data=!!,format=base64",
    "unknown-keyid": "secret,id=s,keyid=k,data=x",
    "keyring-without-serial": "secret_keyring,id=s",
    "good-raw": "secret,id=s,data=x",
    "good-base64": "qom-type=secret,id=s,data=eA==,format=base64",
}

COMMANDS = {
    "snapshot": ["snapshot", "-l", "{img}"],
    "resize": ["resize", "{img}", "2M"],
    "amend": ["amend", "-o", "lazy_refcounts=on", "{img}"],
    "bitmap": ["bitmap", "--add", "{img}", "b0"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("obj", OBJECTS)
def test_object_is_checked_as_qemu_img_checks_it(tmp_path, qemu_img, command, obj):
    results = []
    for tool in ("qemu-img", "qimg"):
        img = tmp_path / f"{tool}.qcow2"
        run([qemu_img, "create", "-q", "-f", "qcow2", str(img), "1M"])
        before = img.read_bytes()
        word, *rest = COMMANDS[command]
        args = [word, "--object", OBJECTS[obj], *(a.format(img=img) for a in rest)]
        proc = (
            run([qemu_img, *args], check=False) if tool == "qemu-img" else qimg(*args, check=False)
        )
        message = proc.stderr.replace(f"{tool}:", "PROG:").replace(str(img), "IMG")
        results.append(
            (proc.returncode, message, proc.returncode != 0 and img.read_bytes() != before)
        )
    assert results[1] == results[0]
    assert not results[1][2]  # a refusal writes nothing
