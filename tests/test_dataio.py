"""The data I/O funnel (qcow2/dataio.py): every guest data read and write
passes one place, where a sector cipher applies, and partial writes into
clusters that are written in place read nothing they do not need."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from conftest import qemu_check_clean, qemu_read_raw, run

import qimg
from qimg.driver import DATA
from qimg.formats.qcow2.dataio import SECTOR_SIZE, DataIO
from qimg.storage import FileStorage

KiB, MiB = 1024, 1024 * 1024


class XorCipher:
    """A toy sector cipher: each 8-byte word XORed with a key from its
    sector number and its place in the sector (its own inverse)."""

    parallel = True

    def __init__(self, iv_from_host: bool):
        self.iv_from_host = iv_from_host

    def encrypt(self, sector: int, data, out=None):
        words = np.frombuffer(bytes(data), dtype="<u8").reshape(-1, SECTOR_SIZE // 8)
        sectors = np.arange(len(words), dtype=np.uint64) + np.uint64(sector)
        keys = sectors[:, None] * np.uint64(0x9E3779B97F4A7C15) + np.arange(
            SECTOR_SIZE // 8, dtype=np.uint64
        )
        if out is None:
            return (words ^ keys).tobytes()
        memoryview(out).cast("B")[:] = (words ^ keys).tobytes()
        return out

    decrypt = encrypt


def _create(path, size, *options):
    opts = ",".join(options) if options else "cluster_size=65536"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(path), size])


@pytest.mark.parametrize("iv_from_host", [True, False], ids=["host-sector", "guest-sector"])
def test_cipher_writes_read_back_and_store_ciphertext_at_their_sectors(
    tmp_path, qemu_img, iv_from_host
):
    path = tmp_path / "disk.qcow2"
    _create(path, "4M", "cluster_size=65536")
    cipher = XorCipher(iv_from_host)
    rng = random.Random(7)
    model = bytearray(4 * MiB)
    writes = [(1000, 3000), (3 * 65536 - 100, 70000), (MiB, 65536), (2 * MiB + 5, 1), (0, 700)]
    with qimg.open_image(str(path), writable=True) as img:
        img.dataio.cipher = cipher
        for offset, length in writes:
            data = rng.randbytes(length)
            img.write(offset, data)
            model[offset : offset + length] = data
        img.write_zeroes(MiB + 4096, 512)  # in place: the zeros are encrypted too
        model[MiB + 4096 : MiB + 4608] = bytes(512)
        assert img.read(0, len(model)) == bytes(model)
        extents = [e for e in img.block_status(0, img.size) if e.kind == DATA]
    qemu_check_clean(str(path))
    with qimg.open_image(str(path)) as img:
        img.dataio.cipher = cipher
        assert img.read(0, len(model)) == bytes(model)
    raw = path.read_bytes()
    assert extents
    for e in extents:
        stored = raw[e.host : e.host + e.length]
        plain = bytes(model[e.offset : e.offset + e.length])
        sector = (e.host if iv_from_host else e.offset) // SECTOR_SIZE
        assert stored == cipher.encrypt(sector, plain)
        assert stored != plain


def test_cipher_turns_off_host_holes_reading_as_zeros(tmp_path, qemu_img):
    path = tmp_path / "prealloc.qcow2"
    _create(path, "1M", "cluster_size=65536", "preallocation=metadata")
    with qimg.open_image(str(path)) as img:
        assert img.allocated_extents(0, img.size) == [(0, MiB, False, True)]
        img.dataio.cipher = XorCipher(True)
        assert not img.dataio.host_holes_read_as_zeros
        runs = img.allocated_extents(0, img.size)
        assert sum(n for _o, n, _d, _z in runs) == MiB
        assert all(is_data and not is_zero for _o, _n, is_data, is_zero in runs)


def test_unaligned_encrypted_write_is_refused_by_the_funnel(tmp_path, qemu_img):
    path = tmp_path / "disk.qcow2"
    _create(path, "1M")
    with qimg.open_image(str(path), writable=True) as img:
        img.write(0, b"x" * 65536)
        host = img.block_status(0, 1)[0].host
        img.dataio.cipher = XorCipher(True)
        with pytest.raises(ValueError):
            img.dataio.write(100, host + 100, [b"y" * 10])


class _ReadSpy:
    """Counts the bytes read from any file storage while active."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        pread, preadv = FileStorage.pread, FileStorage.preadv

        def counting_pread(storage, offset, length):
            self.bytes += length
            return pread(storage, offset, length)

        def counting_preadv(storage, offset, buffer):
            self.bytes += len(buffer)
            return preadv(storage, offset, buffer)

        monkeypatch.setattr(FileStorage, "pread", counting_pread)
        monkeypatch.setattr(FileStorage, "preadv", counting_preadv)


@pytest.mark.parametrize(
    "options",
    [("cluster_size=2M",), ("cluster_size=2M", "extended_l2=on")],
    ids=["standard-l2", "extended-l2"],
)
def test_small_write_into_allocated_cluster_reads_nothing_from_storage(
    tmp_path, qemu_img, monkeypatch, options
):
    path = tmp_path / "disk.qcow2"
    _create(path, "8M", *options)
    first = os.urandom(2 * MiB)
    with qimg.open_image(str(path), writable=True) as img:
        img.write(0, first)
        img.write(2 * MiB, b"z" * 2 * MiB)
        img.write_zeroes(2 * MiB, 2 * MiB)  # kept allocated, zero-flagged
        img.flush()
        spy = _ReadSpy(monkeypatch)
        img.write(64 * KiB + 100, b"w" * 4096)  # allocated
        img.write(3 * MiB + 7, b"v" * 4096)  # allocated, reads as zeros
        assert spy.bytes == 0
        monkeypatch.undo()
    expect = bytearray(first) + bytes(6 * MiB)
    expect[64 * KiB + 100 : 64 * KiB + 4196] = b"w" * 4096
    expect[3 * MiB + 7 : 3 * MiB + 4103] = b"v" * 4096
    qemu_check_clean(str(path))
    assert qemu_read_raw(str(path), tmp_path, "qcow2") == bytes(expect)


def test_small_write_into_unallocated_subcluster_reads_nothing_from_storage(
    tmp_path, qemu_img, monkeypatch
):
    path = tmp_path / "disk.qcow2"
    _create(path, "4M", "cluster_size=2M", "extended_l2=on")
    with qimg.open_image(str(path), writable=True) as img:
        img.write(0, b"a" * 64 * KiB)  # one subcluster of an allocated cluster
        img.flush()
        spy = _ReadSpy(monkeypatch)
        img.write(MiB + 10, b"b" * 4096)  # an unallocated subcluster of it
        assert spy.bytes == 0
        monkeypatch.undo()
    expect = bytearray(4 * MiB)
    expect[: 64 * KiB] = b"a" * 64 * KiB
    expect[MiB + 10 : MiB + 4106] = b"b" * 4096
    qemu_check_clean(str(path))
    assert qemu_read_raw(str(path), tmp_path, "qcow2") == bytes(expect)


@pytest.mark.parametrize(
    "options, copied",
    [(("cluster_size=2M",), 2 * MiB - 4096), (("cluster_size=2M", "extended_l2=on"), 60 * KiB)],
    ids=["standard-l2", "extended-l2"],
)
def test_copy_on_write_reads_only_the_part_not_written(
    tmp_path, qemu_img, monkeypatch, options, copied
):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    _create(base, "4M", "cluster_size=2M")
    backing = os.urandom(4 * MiB)
    with qimg.open_image(str(base), writable=True) as img:
        img.write(0, backing)
    opts = ",".join(options)
    run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base)]
        + ["-o", opts, str(top)]
    )
    read = []
    funnel_read = DataIO.read

    def spy(dataio, guest, host, view):
        read.append(len(view))
        funnel_read(dataio, guest, host, view)

    with qimg.open_image(str(top), writable=True) as img:
        monkeypatch.setattr(DataIO, "read", spy)
        img.write(MiB, b"w" * 4096)
        monkeypatch.undo()
    assert sum(read) == copied
    expect = bytearray(backing)
    expect[MiB : MiB + 4096] = b"w" * 4096
    qemu_check_clean(str(top))
    assert qemu_read_raw(str(top), tmp_path, "qcow2") == bytes(expect)
