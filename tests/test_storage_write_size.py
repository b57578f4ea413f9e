"""A file's buffered writes go to the kernel in system calls of at most
storage.WRITE_MAX bytes (the page cache takes a write in folios as large
as the write, and large folios are what a VM's reported free memory costs
most to fault in again), and the bytes land where they were asked to."""

from __future__ import annotations

import os

import pytest

from qimg import storage
from qimg.storage import WRITE_MAX, create_storage

MiB = 1 << 20


@pytest.fixture
def calls(monkeypatch):
    """The byte counts of every os.pwrite and os.pwritev issued."""
    seen: list[int] = []
    pwrite, pwritev = os.pwrite, os.pwritev

    def counted_pwrite(fd, data, offset):
        seen.append(len(memoryview(data)))
        return pwrite(fd, data, offset)

    def counted_pwritev(fd, buffers, offset):
        seen.append(sum(len(memoryview(b)) for b in buffers))
        return pwritev(fd, buffers, offset)

    monkeypatch.setattr(storage.os, "pwrite", counted_pwrite)
    monkeypatch.setattr(storage.os, "pwritev", counted_pwritev)
    return seen


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(256)) * (n // 256) + bytes(n % 256)


def test_pwrite_of_several_mib_is_cut_into_write_max_calls(tmp_path, calls):
    data = _pattern(3 * MiB + 12345, 1)
    st = create_storage(str(tmp_path / "f"))
    st.pwrite(4096, data)
    st.close()
    assert calls and max(calls) <= WRITE_MAX
    assert sum(calls) == len(data)
    with open(tmp_path / "f", "rb") as f:
        assert f.read() == bytes(4096) + data


def test_pwritev_of_several_buffers_is_cut_into_write_max_calls(tmp_path, calls):
    buffers = [_pattern(n, seed) for seed, n in enumerate([700_000, 900_000, 5, 2 * MiB, 333])]
    st = create_storage(str(tmp_path / "f"))
    st.pwritev(512, buffers)
    st.close()
    assert calls and max(calls) <= WRITE_MAX
    assert sum(calls) == sum(map(len, buffers))
    with open(tmp_path / "f", "rb") as f:
        assert f.read() == bytes(512) + b"".join(buffers)
