"""Benchmark: encryption, qimg against qemu-img in the same run.

Workloads (issue 13):
- raw -> LUKS: `convert -O luks` of 1 GiB of random data (iter-time 10, so
  PBKDF2 weighs the same in both tools: QEMU's benchmark of it included);
- LUKS -> raw: `convert` of that volume (made once by qemu-img) back to raw;
- the sector ciphers alone (in this process, no qemu-img row): MB/s of
  qimg.crypto.sectors for AES-256-XTS and AES-256-CBC-ESSIV, both ways,
  printed before the table.

Issue targets (ratio qimg/qemu-img): raw -> LUKS <= 0.5, LUKS -> raw <= 0.8,
peak memory <= 256 MiB. Usage:

    python bench/bench_crypto.py [--dir DIR] [--size-mib N] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QIMG, compare, print_table  # noqa: E402

MiB = 1 << 20
SECRET = ["--object", "secret,id=s,data=bench-secret"]
CREATE = ["-o", "key-secret=s,iter-time=10"]


def _make_random(path: str, size: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    with open(path, "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
        f.write(os.urandom(size % (16 * MiB)))


def _remove(path: str):
    def setup() -> None:
        if os.path.exists(path):
            os.unlink(path)

    return setup


def cipher_throughput(size: int = 256 * MiB, chunk: int = 2 * MiB) -> list[str]:
    """MB/s of the sector ciphers over `size` bytes in `chunk` calls."""
    from qimg.crypto.sectors import sector_cipher

    data = os.urandom(chunk)
    lines = []
    for name, args in (
        ("aes-256-xts-plain64", ("aes-256", "xts", "plain64", None, os.urandom(64))),
        ("aes-256-cbc-essiv", ("aes-256", "cbc", "essiv", "sha256", os.urandom(32))),
    ):
        cipher = sector_cipher(*args)
        for way in ("encrypt", "decrypt"):
            fn = getattr(cipher, way)
            start = time.perf_counter()
            for sector in range(0, size // 512, chunk // 512):
                fn(sector, data)
            rate = size / (time.perf_counter() - start) / 1e6
            lines.append(f"sector cipher {name} {way}: {rate:.0f} MB/s")
    return lines


def workloads(workdir: str, size: int = 1024 * MiB, repeat: int = 3) -> list[dict]:
    import subprocess

    for line in cipher_throughput():
        print(line)
    src = os.path.join(workdir, f"src-{size}.raw")
    _make_random(src, size)
    volume = os.path.join(workdir, f"volume-{size}.luks")  # cached per size
    if not os.path.exists(volume):
        subprocess.run(
            ["qemu-img", "convert", *SECRET, "-O", "luks", *CREATE, src, volume], check=True
        )
    dst = os.path.join(workdir, "dst.luks")
    out = os.path.join(workdir, "out.raw")
    label = f"{size // MiB} MiB"
    to_luks = ["convert", *SECRET, "-O", "luks", *CREATE, src, dst]
    from_luks = [
        "convert", *SECRET, "--image-opts",
        f"driver=luks,key-secret=s,file.filename={volume}", "-O", "raw", out,
    ]  # fmt: skip
    rows = [
        compare(
            f"convert raw -> luks {label}",
            QIMG + to_luks,
            ["qemu-img", *to_luks],
            repeat=repeat,
            setup=_remove(dst),
        ),  # fmt: skip
        compare(
            f"convert luks -> raw {label}",
            QIMG + from_luks,
            ["qemu-img", *from_luks],
            repeat=repeat,
            setup=_remove(out),
        ),  # fmt: skip
    ]
    for path in (dst, out):
        _remove(path)()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="scratch directory (the input is kept there)")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qimg-bench-crypto-", dir=args.dir) as tmp:
        workdir = args.dir or tmp
        print_table(workloads(workdir, args.size_mib * MiB, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
