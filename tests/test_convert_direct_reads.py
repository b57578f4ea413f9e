"""convert reads plain data chunks straight from the storage that holds
them (pipeline.HostMap) instead of through the driver's readinto: what it
copies must be what qemu-img copies, through backing chains, compressed
clusters beside plain ones, and data clusters cut short by the end of
their file (which read as zeros)."""

from __future__ import annotations

import os
import random

import pytest

from qimg.api import open_image
from qimg.chain import read_host
from qimg.convert.pipeline import HostMap
from qimg.convert.scan import Blocks
from qimg.convert.source import Concat
from tests.conftest import qemu_check_clean, qimg, run

KiB = 1 << 10
MiB = 1 << 20


def _io(path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run([*args, str(path)])


@pytest.fixture
def chain(tmp_path, qemu_img):
    """raw base <- qcow2 mid <- qcow2 top, data in each layer, a compressed
    cluster and zero clusters in the top one."""
    base = tmp_path / "base.raw"
    with open(base, "wb") as f:
        f.truncate(8 * MiB)
        rng = random.Random(3)
        for off in (0, 3 * MiB, 7 * MiB):
            f.seek(off)
            f.write(rng.randbytes(MiB))
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(mid)])
    _io(mid, "write -P 0x11 512k 1536k", "write -P 0x22 5M 64k")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top)])
    _io(top, "write -P 0x33 1M 1M", "write -c -P 0x44 4M 64k", "write -z 3M 128k")
    return top


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_of_a_chain_copies_what_qemu_img_copies(chain, tmp_path, fmt):
    ours, theirs = tmp_path / f"ours.{fmt}", tmp_path / f"theirs.{fmt}"
    qimg("convert", "-O", fmt, chain, ours)
    run(["qemu-img", "convert", "-O", fmt, str(chain), str(theirs)])
    run(["qemu-img", "compare", "-f", fmt, "-F", fmt, str(ours), str(theirs)])
    if fmt == "raw":
        assert ours.read_bytes() == theirs.read_bytes()
    else:
        qemu_check_clean(ours)


def test_convert_reads_data_clusters_past_the_end_of_the_file_as_zeros(tmp_path, qemu_img):
    image = tmp_path / "cut.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"])
    _io(image, "write -P 0x5a 0 3M")
    # The last data cluster is the file's last: cut it in half.
    os.truncate(image, os.path.getsize(image) - 32 * KiB)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    qimg("convert", "-O", "raw", image, ours)
    run(["qemu-img", "convert", "-O", "raw", str(image), str(theirs)])
    assert ours.read_bytes() == theirs.read_bytes()


def test_host_map_finds_the_storage_of_whole_runs_only(chain):
    with open_image(str(chain), None) as top:
        src = Concat([top])
        hosts = HostMap(src)
        assert hosts.enabled
        # Guest [1M, 2M) is one run of the top image's data clusters.
        storage, host = hosts.lookup(1 * MiB, MiB)
        assert storage is top.storage
        got = bytearray(MiB)
        read_host((storage, host), memoryview(got))
        assert got == b"\x33" * MiB
        # A chunk over the top's data and the mid image's does not lie in one run.
        assert hosts.lookup(1 * MiB - 4 * KiB, 8 * KiB) is None
        # Nor does one over the compressed cluster, or the zero clusters.
        assert hosts.lookup(4 * MiB, 64 * KiB) is None
        assert hosts.lookup(3 * MiB, 64 * KiB) is None
        # Through the chain: the raw base's data at 7M (the mid image leaves it there).
        storage, host = hosts.lookup(7 * MiB, 64 * KiB)
        want = bytearray(64 * KiB)
        top.readinto(7 * MiB, want)
        got = bytearray(64 * KiB)
        read_host((storage, host), memoryview(got))
        assert got == want


def test_host_map_is_off_for_sources_that_map_nothing_per_read(tmp_path):
    raw = tmp_path / "plain.raw"
    raw.write_bytes(os.urandom(64 * KiB))
    with open_image(str(raw), "raw") as image:
        assert HostMap(Concat([image])).lookup(0, 64 * KiB) is None


def test_block_bounds_are_the_guest_multiples_of_the_block_size():
    rng = random.Random(11)
    for _ in range(200):
        size = 1 << rng.randrange(9, 17)
        offset, length = rng.randrange(0, 1 << 20), rng.randrange(1, 1 << 18)
        blocks = Blocks.cut(offset, length, size)
        bounds = blocks.bounds
        assert bounds[0] == 0 and bounds[-1] == length and len(bounds) == blocks.count + 1
        assert all(a < b for a, b in zip(bounds, bounds[1:]))
        # Every inner bound is a multiple of the block size in the guest.
        assert all((offset + b) % size == 0 for b in bounds[1:-1])
