"""convert's read buffers: the pool hands a buffer out again only after its
owner released it, and a copy releases every buffer it took, written data
intact (judged by `qemu-img compare` with tiny chunks and few buffers, so
that every buffer is reused many times)."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

import qimg.convert.pipeline as pipeline
from qimg.convert import convert
from qimg.convert.pipeline import BufferPool
from tests.conftest import qemu_check_clean, run

KiB = 1 << 10
MiB = 1 << 20


def _base(buf):
    return buf if buf.base is None else buf.base


def test_pool_hands_a_buffer_out_again_only_after_it_is_released():
    pool = BufferPool(4096, keep=2)
    a = pool.acquire(4096)
    b = pool.acquire(1000)
    assert len(b) == 1000 and pool.owned() == 2
    c = pool.acquire(4096)  # both kept buffers are owned: a fresh one
    assert _base(c) is not _base(a) and _base(c) is not _base(b)
    pool.release(b)
    assert pool.owned() == 1
    d = pool.acquire(512)
    assert _base(d) is _base(b)  # b's buffer, free again
    pool.release(c)  # a fresh one: dropped, never handed out again
    e = pool.acquire(4096)
    assert _base(e) is not _base(c) and pool.owned() == 2


def test_pool_refuses_a_buffer_released_twice():
    pool = BufferPool(4096, keep=2)
    a = pool.acquire(4096)
    pool.release(a)
    with pytest.raises(RuntimeError):
        pool.release(a)


class _CountingPool(BufferPool):
    """A pool that remembers which of its kept buffers are owned."""

    instances: list[_CountingPool] = []

    def __init__(self, size, keep):
        super().__init__(size, keep)
        self.acquired = 0
        self.released = 0
        _CountingPool.instances.append(self)

    def acquire(self, length):
        self.acquired += 1
        return super().acquire(length)

    def release(self, buf):
        self.released += 1
        super().release(buf)


def _source(path) -> None:
    """1.5 MiB of 4 KiB blocks: zeros, text, random bytes."""
    with open(path, "wb") as f:
        for i in range(384):
            if i % 5 == 0:
                f.write(bytes(4 * KiB))
            elif i % 5 in (1, 2):
                f.write((b"block %05d\n" % i * 342)[: 4 * KiB])
            else:
                f.write(os.urandom(4 * KiB))


@pytest.mark.parametrize(
    "how",
    [
        {"target_format": "raw"},
        {"target_format": "qcow2"},
        {"target_format": "qcow2", "compress": True},
        {"target_format": "qcow2", "backing": True},
    ],
    ids=["raw", "qcow2", "compressed", "backing"],
)
def test_copy_releases_every_buffer_and_reused_buffers_never_change_written_data(
    tmp_path, qemu_img, monkeypatch, how
):
    monkeypatch.setattr(pipeline, "CHUNK", 64 * KiB)
    monkeypatch.setattr(pipeline, "READ_BUFFERS", 2)
    monkeypatch.setattr(pipeline, "BufferPool", _CountingPool)
    _CountingPool.instances.clear()
    src = tmp_path / "src.raw"
    _source(src)
    out = tmp_path / "out"
    kw = dict(how)
    if kw.pop("backing", False):
        base = tmp_path / "base.raw"
        with open(src, "rb") as f:
            data = bytearray(f.read())
        data[100 * KiB : 300 * KiB] = os.urandom(200 * KiB)  # differs there only
        base.write_bytes(bytes(data))
        kw.update(backing_file=str(base), backing_format="raw")
    convert([str(src)], str(out), source_format="raw", compression_level="fast", **kw)
    fmt = kw["target_format"]
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(src), str(out)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if fmt == "qcow2":
        qemu_check_clean(out)
    (pool,) = _CountingPool.instances
    assert pool.acquired > 4 * pipeline.READ_BUFFERS  # every buffer reused
    assert pool.released == pool.acquired
    assert pool.owned() == 0


def test_readers_keep_read_ahead_chunks_whatever_zeros_lie_between(tmp_path, qemu_img, monkeypatch):
    """A compressed source whose data runs alternate with zero runs: when
    the producer first waits for a reader, READ_AHEAD + 1 chunks have gone
    to the readers (the zero pieces between them are not counted)."""
    monkeypatch.setattr(pipeline, "CHUNK", 64 * KiB)
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        for i in range(32):  # 64 KiB of text (compressible), then 192 KiB of zeros
            f.write((b"run %05d\n" % i * 6554)[: 64 * KiB] + bytes(192 * KiB))
    src = tmp_path / "src.qcow2"
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(src)])
    submitted: list[int] = []  # offsets of the chunks handed to the readers
    waited: list[int] = []  # chunks with the readers at each wait for one
    real_submit, real_resolved = ThreadPoolExecutor.submit, pipeline._resolved

    def submit(executor, fn, *args):
        if getattr(fn, "__name__", "") == "_read_chunk":
            submitted.append(args[0])
        return real_submit(executor, fn, *args)

    def resolved(step):
        if isinstance(step, Future):
            waited.append(len(submitted) - len(waited))
        return real_resolved(step)

    monkeypatch.setattr(ThreadPoolExecutor, "submit", submit)
    monkeypatch.setattr(pipeline, "_resolved", resolved)
    out = tmp_path / "out.raw"
    convert([str(src)], str(out), source_format="qcow2", target_format="raw")
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), str(out)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(submitted) > 2 * pipeline.READ_AHEAD  # the readers took the chunks
    assert waited[0] == pipeline.READ_AHEAD + 1
