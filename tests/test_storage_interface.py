"""The Storage interface: everything the engine calls on its bytes is
declared there, so a storage without a file descriptor (a network block
device later) can sit under the same engine; the driver interface tells
`info` what it needs, whatever the format.
"""

from __future__ import annotations

import ctypes.util
import json

import pytest
from conftest import qemu_check_clean, qemu_read_raw, run
from infotools import message, qemu_in, qimg_here, without_actual_size

from qimg import libc
from qimg.api import open_image
from qimg.faults import FaultyStorage
from qimg.info import image_info
from qimg.storage import FileStorage, Storage, check_request

MiB = 1 << 20

ENGINE_CALLS = {
    "pread",
    "preadv",
    "pwrite",
    "size",
    "allocated_size",
    "truncate",
    "fallocate",
    "punch_hole",
    "data_extents",
    "flush",
    "close",
}


class MemoryStorage(Storage):
    """An image's bytes in memory, copied from the file storage it wraps:
    no file descriptor, no path operation; writes stay in memory."""

    def __init__(self, inner: Storage):
        self.inner = inner
        self.path = inner.path
        self.writable = inner.writable
        self.buf = bytearray(inner.pread(0, inner.size()))

    def pread(self, offset: int, length: int) -> bytes:
        check_request(offset, length)
        return bytes(self.buf[offset : offset + length]).ljust(length, b"\0")

    def preadv(self, offset: int, buffer: memoryview) -> int:
        check_request(offset, len(buffer))
        part = self.buf[offset : offset + len(buffer)]
        buffer[: len(part)] = part
        return len(part)

    def pwrite(self, offset: int, data) -> None:
        data = bytes(data)
        end = offset + len(data)
        if end > len(self.buf):
            self.buf.extend(bytes(end - len(self.buf)))
        self.buf[offset:end] = data

    def size(self) -> int:
        return len(self.buf)

    def allocated_size(self) -> int:
        return len(self.buf)

    def truncate(self, size: int) -> None:
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(bytes(size - len(self.buf)))

    def fallocate(self, offset: int, length: int) -> None:
        if offset + length > len(self.buf):
            self.truncate(offset + length)

    def punch_hole(self, offset: int, length: int) -> None:
        end = min(offset + length, len(self.buf))
        if end > offset:
            self.buf[offset:end] = bytes(end - offset)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return [(offset, length, True)]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.inner.close()


def test_storage_interface_declares_every_call_the_engine_makes():
    assert ENGINE_CALLS <= Storage.__abstractmethods__
    assert not FileStorage.__abstractmethods__
    assert not FaultyStorage.__abstractmethods__
    with pytest.raises(TypeError):
        Storage()


def test_qcow2_engine_reads_and_writes_over_a_storage_without_a_file(tmp_path, qemu_io):
    src = tmp_path / "src.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(src), "4M"])
    run([qemu_io, "-c", "write -P 0x5a 8k 64k", "-c", "write -z 1M 64k", str(src)])
    holder: list[MemoryStorage] = []

    def in_memory(inner: Storage) -> Storage:
        holder.append(MemoryStorage(inner))
        return holder[0]

    with open_image(str(src), "qcow2", writable=True, storage_wrapper=in_memory) as img:
        img.write(2 * MiB, b"\xa5" * 12288)
        img.write_zeroes(8192, 4096)
        img.discard(3 * MiB, 64 * 1024)
        img.flush()
        seen = without_actual_size(image_info(img))
    out = tmp_path / "out.qcow2"
    out.write_bytes(bytes(holder[0].buf))
    qemu_check_clean(out)
    expected = bytearray(4 * MiB)
    expected[8192 + 4096 : 8192 + 65536] = b"\x5a" * (65536 - 4096)
    expected[2 * MiB : 2 * MiB + 12288] = b"\xa5" * 12288
    assert qemu_read_raw(out, tmp_path) == bytes(expected)
    q = json.loads(qemu_in(tmp_path, "qemu-img", "info", "--output=json", "out.qcow2").stdout)
    assert seen == dict(without_actual_size(q), filename=str(src))


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_info_comes_from_the_driver_interface_whatever_the_format(tmp_path, fmt):
    """image_info asks the driver (Driver.info), not the format's name."""
    run(["qemu-img", "create", "-q", "-f", fmt, str(tmp_path / "a.img"), "1000"])
    with open_image(str(tmp_path / "a.img"), fmt) as img:
        mine = without_actual_size(image_info(img))
    q = json.loads(qemu_in(tmp_path, "qemu-img", "info", "--output=json", "a.img").stdout)
    assert mine == without_actual_size(dict(q, filename=str(tmp_path / "a.img")))


def test_punching_holes_looks_up_the_c_library_once(tmp_path, monkeypatch):
    calls = []
    real = ctypes.util.find_library

    def counting(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(ctypes.util, "find_library", counting)
    libc.function.cache_clear()
    path = tmp_path / "f.raw"
    path.write_bytes(b"\x11" * (1 << 16))
    s = FileStorage(str(path), writable=True)
    try:
        for k in range(4):
            s.punch_hole(k * 8192, 4096)
    finally:
        s.close()
    assert len(calls) <= 1
    data = path.read_bytes()
    for k in range(4):
        assert data[k * 8192 : k * 8192 + 4096] == bytes(4096)
        assert data[k * 8192 + 4096 : k * 8192 + 8192] == b"\x11" * 4096


@pytest.mark.parametrize(
    "args",
    [
        ["info", "d"],
        ["info", "-f", "raw", "d"],
        ["info", "-f", "qcow2", "d"],
        ["create", "-f", "raw", "d", "1M"],
        ["create", "-f", "qcow2", "d", "1M"],
        ["convert", "-O", "raw", "d", "out.raw"],
    ],
)
def test_a_directory_is_refused_in_qemu_img_words(tmp_path, args):
    (tmp_path / "d").mkdir()
    q = qemu_in(tmp_path, "qemu-img", *args)
    m = qimg_here(tmp_path, *args)
    assert (m.returncode, m.stdout) == (q.returncode, q.stdout)
    assert message(m.stderr, "qimg") == message(q.stderr, "qemu-img")
    assert not (tmp_path / "out.raw").exists()


def test_preallocation_past_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    """The free-space test asks the storage (no path operation outside it);
    the create fails at once and removes what it made."""
    from qimg.api import create_image
    from qimg.errors import ImageIOError

    monkeypatch.setattr(FileStorage, "available_space", lambda self: 4096)
    target = tmp_path / "big.qcow2"
    with pytest.raises(ImageIOError) as err:
        create_image(str(target), "qcow2", 64 * MiB, {"preallocation": "falloc"})
    assert str(err.value).endswith("Could not preallocate new data: No space left on device")
    assert not target.exists()
