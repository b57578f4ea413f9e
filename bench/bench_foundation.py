"""Foundation workloads: create, info start-up, info and full read of 1 GiB.

The full read compares like with like: both sides read the whole 1 GiB
qcow2 image and write the guest data to a raw file in the same directory
(`qemu-img convert -O raw` against the library's open_image + readinto in
2 MiB pieces + os.pwrite, started as a fresh `python -c` process so import
time counts). The piece size matters: on this machine a 64 MiB pwrite from
a buffer that no longer fits the CPU cache runs about 8x slower than the
same bytes in 2 MiB pieces (qemu-img uses 2 MiB requests too). A second row reads to nowhere on both sides (qemu-io `read`
against the library read alone) to show the read path without the writes.
"""

from __future__ import annotations

import os
import sys

from common import compare, compare_command

GiB = 1 << 30

_READ_TO_FILE = """
import os, sys, qimg
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
with qimg.open_image(sys.argv[1]) as img:
    buf = memoryview(bytearray(2 << 20))
    for off in range(0, img.size, len(buf)):
        n = min(len(buf), img.size - off)
        img.readinto(off, buf[:n])
        os.pwrite(fd, buf[:n], off)
os.close(fd)
"""

_READ_ONLY = """
import sys, qimg
with qimg.open_image(sys.argv[1]) as img:
    buf = memoryview(bytearray(2 << 20))
    for off in range(0, img.size, len(buf)):
        n = min(len(buf), img.size - off)
        img.readinto(off, buf[:n])
"""


def _run(cmd: list[str]) -> None:
    import subprocess

    subprocess.run(cmd, check=True, capture_output=True)


def _full_image(workdir: str) -> str:
    """A fully allocated 1 GiB qcow2 image of incompressible data (cached)."""
    path = os.path.join(workdir, "full-1g.qcow2")
    if not os.path.exists(path):
        raw = os.path.join(workdir, "full-1g.raw")
        with open(raw, "wb") as f:
            for _ in range(GiB // (16 << 20)):
                f.write(os.urandom(16 << 20))
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path])
        os.unlink(raw)
    return path


def workloads(workdir: str) -> list[dict]:
    rows = []
    big = os.path.join(workdir, "create-1t.qcow2")

    def rm_big() -> None:
        if os.path.exists(big):
            os.unlink(big)

    rows.append(
        compare_command(
            "create qcow2 1 TiB", ["create", "-q", "-f", "qcow2", big, "1T"], repeat=5, setup=rm_big
        )
    )
    small = os.path.join(workdir, "small.qcow2")
    _run(["qemu-img", "create", "-q", "-f", "qcow2", small, "1G"])
    rows.append(
        compare_command(
            "info --output=json small (start-up)", ["info", "--output=json", small], repeat=21
        )
    )
    full = _full_image(workdir)
    rows.append(
        compare_command(
            "info --output=json 1 GiB allocated", ["info", "--output=json", full], repeat=11
        )
    )
    out = os.path.join(workdir, "read-out.raw")

    def rm_out() -> None:
        if os.path.exists(out):
            os.unlink(out)

    rows.append(
        compare(
            "full read 1 GiB -> raw file (convert)",
            [sys.executable, "-c", _READ_TO_FILE, full, out],
            ["qemu-img", "convert", "-O", "raw", full, out],
            repeat=3,
            setup=rm_out,
        )
    )
    rm_out()
    rows.append(
        compare(
            "full read 1 GiB -> nowhere (qemu-io read)",
            [sys.executable, "-c", _READ_ONLY, full],
            ["qemu-io", "-f", "qcow2", "-r", "-c", f"read 0 {GiB}", full],
            repeat=3,
        )
    )
    return rows
