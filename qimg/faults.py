"""Fault injection: a Storage wrapper that crashes on cue.

`FaultyStorage` stands between a driver and its real storage, counts every
mutating operation (pwrite, truncate, fallocate, punch_hole, flush) and
records it in `log`. Given `crash_at=n`, operation number n (0-based) does
not happen: instead the storage "crashes" and raises `SimulatedCrash`, and
every later call raises it again. Two crash models:

- "kill" (a process killed by a signal): the file holds exactly operations
  0..n-1, nothing is lost from the page cache. With `tear`, operation n, if
  it is a pwrite, is applied in part (a prefix in whole 512-byte sectors),
  as a write interrupted in the kernel would be.
- "power" (power loss): everything up to the last completed flush() is
  durable; of the operations since, a random subset (seeded) survives and
  the rest is dropped. Each operation survives whole or not at all; with
  `tear`, a surviving pwrite may keep only some of its 512-byte sectors
  (sectors are the unit a disk writes atomically).

The power model is implemented with an undo log rather than a write-behind
buffer: un-flushed operations reach the file at once (so reads, size and
SEEK_DATA see them with no overlay logic) and the bytes they replaced are
kept; at the crash the un-flushed operations are undone newest first,
which restores the file exactly as it was at the last flush, and the
surviving subset is applied again in its original order. The result is the
same as buffering and applying the survivors.

`SimulatedCrash` derives from BaseException so that engine code catching
Exception (or QimgError) cannot swallow it and carry on writing.

    inner = FileStorage(path, writable=True)
    faulty = FaultyStorage(inner, crash_at=17, mode="power", seed=3)
    img = open_image(path, writable=True, storage_wrapper=lambda s: faulty)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from qimg.storage import Storage

SECTOR = 512
MODES = ("kill", "power")


class SimulatedCrash(BaseException):
    """The storage crashed at an injected fault point; nothing more is written."""


@dataclass
class Op:
    """One mutating operation, as issued (data kept for pwrite)."""

    index: int
    kind: str  # "pwrite" | "truncate" | "fallocate" | "punch_hole" | "flush"
    offset: int = 0
    length: int = 0
    data: bytes | None = None


@dataclass
class _Undo:
    """What one un-flushed operation replaced: the file size and the bytes
    of its range that existed before it (the power model's undo record)."""

    op: Op
    old_size: int
    old_bytes: bytes = field(default=b"")


class FaultyStorage(Storage):
    """Wraps `inner`; crashes before mutating operation `crash_at` (if given).

    `mode` is "kill" or "power" (see the module docstring); `seed` drives the
    choice of surviving writes in the power model, `keep` is the chance that
    each un-flushed operation survives. `sync=False` makes flush() a pure
    barrier in the model without fsync on the real file (faster in tests;
    the simulated crash does not need the real file to be durable).
    """

    def __init__(
        self,
        inner: Storage,
        *,
        crash_at: int | None = None,
        mode: str = "kill",
        seed: int = 0,
        keep: float = 0.5,
        tear: bool = False,
        sync: bool = True,
        record_data: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.inner = inner
        self.path = inner.path
        self.writable = inner.writable
        self.crash_at = crash_at
        self.mode = mode
        self.rng = random.Random(seed)
        self.keep = keep
        self.tear = tear
        self.sync = sync
        self.record_data = record_data
        self.log: list[Op] = []
        self.crashed = False
        self._unflushed: list[_Undo] = []

    # --- bookkeeping -------------------------------------------------------------

    @property
    def op_count(self) -> int:
        """Mutating operations issued so far (= possible crash points)."""
        return len(self.log)

    @property
    def flush_points(self) -> list[int]:
        """Indices of the flush operations in the log."""
        return [op.index for op in self.log if op.kind == "flush"]

    def _alive(self) -> None:
        if self.crashed:
            raise SimulatedCrash("storage already crashed")

    def _begin(self, kind: str, offset: int = 0, length: int = 0, data=None) -> Op:
        """Count one mutating operation; crash instead where it is the chosen one."""
        self._alive()
        op = Op(len(self.log), kind, offset, length, data)
        if self.crash_at is not None and op.index >= self.crash_at:
            self._crash(op)
            raise SimulatedCrash(f"simulated {self.mode} crash at operation {op.index}")
        if not self.record_data and kind == "pwrite":
            self.log.append(Op(op.index, kind, offset, length))
        else:
            self.log.append(op)
        return op

    def _remember(self, op: Op, offset: int, length: int) -> None:
        """Power model: keep what [offset, offset+length) and the size were."""
        if self.mode != "power":
            return
        size = self.inner.size()
        old = self.inner.pread(offset, max(0, min(length, size - offset))) if length else b""
        self._unflushed.append(_Undo(op, size, old))

    # --- crashing ----------------------------------------------------------------

    def crash(self) -> None:
        """Crash now (between operations) and raise SimulatedCrash."""
        self._alive()
        self._crash(None)
        raise SimulatedCrash(f"simulated {self.mode} crash after operation {len(self.log) - 1}")

    def _crash(self, pending: Op | None) -> None:
        self.crashed = True
        if self.mode == "kill":
            if self.tear and pending is not None and pending.kind == "pwrite":
                self._apply_torn_prefix(pending)
            return
        survivors = [u for u in self._unflushed if self.rng.random() < self.keep]
        for undo in reversed(self._unflushed):
            self._undo(undo)
        for undo in survivors:
            self._redo(undo.op)
        self._unflushed.clear()

    def _apply_torn_prefix(self, op: Op) -> None:
        data = bytes(op.data)
        first_boundary = -op.offset % SECTOR
        cuts = list(range(first_boundary, len(data), SECTOR))
        cut = self.rng.choice(cuts) if cuts else 0
        if cut:
            self.inner.pwrite(op.offset, data[:cut])

    def _undo(self, undo: _Undo) -> None:
        op = undo.op
        if undo.old_bytes:
            self.inner.pwrite(op.offset, undo.old_bytes)
        if self.inner.size() != undo.old_size:
            self.inner.truncate(undo.old_size)

    def _redo(self, op: Op) -> None:
        if op.kind == "pwrite":
            if self.tear and self.rng.random() < 0.5:
                self._redo_torn(op)
            else:
                self.inner.pwrite(op.offset, op.data)
        elif op.kind == "truncate":
            self.inner.truncate(op.offset)
        elif op.kind == "fallocate":
            self.inner.fallocate(op.offset, op.length)
        elif op.kind == "punch_hole":
            self.inner.punch_hole(op.offset, op.length)

    def _redo_torn(self, op: Op) -> None:
        """Apply some of the 512-byte sectors (aligned on the file) of a write."""
        data = memoryview(op.data)
        pos = 0
        while pos < len(data):
            end = min(len(data), pos + SECTOR - (op.offset + pos) % SECTOR)
            if self.rng.random() < 0.5:
                self.inner.pwrite(op.offset + pos, data[pos:end])
            pos = end

    # --- the Storage interface: mutations ---------------------------------------

    def pwrite(self, offset: int, data) -> None:
        data = bytes(data)
        op = self._begin("pwrite", offset, len(data), data)
        self._remember(op, offset, len(data))
        self.inner.pwrite(offset, data)

    def truncate(self, size: int) -> None:
        op = self._begin("truncate", size)
        self._remember(op, size, max(0, self.inner.size() - size))
        self.inner.truncate(size)

    def fallocate(self, offset: int, length: int) -> None:
        op = self._begin("fallocate", offset, length)
        self._remember(op, 0, 0)
        self.inner.fallocate(offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        op = self._begin("punch_hole", offset, length)
        self._remember(op, offset, length)
        self.inner.punch_hole(offset, length)

    def flush(self) -> None:
        self._begin("flush")
        if self.sync:
            self.inner.flush()
        self._unflushed.clear()

    # --- the Storage interface: reads and the rest -------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        self._alive()
        return self.inner.pread(offset, length)

    def preadv(self, offset: int, buffer: memoryview) -> int:
        self._alive()
        return self.inner.preadv(offset, buffer)

    def size(self) -> int:
        self._alive()
        return self.inner.size()

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._alive()
        return self.inner.data_extents(offset, length)

    def allocated_size(self) -> int:
        return self.inner.allocated_size()

    def close(self) -> None:
        """Close the real file (allowed after a crash: it writes nothing)."""
        self.inner.close()


def run_until_crash(
    path: str, action, *, backing: bool = True, **faults
) -> tuple[FaultyStorage, bool]:
    """Open the qcow2 image `path` read-write over a FaultyStorage made with
    `faults` (no fsync unless `sync=True`), run `action(image)` and close it: the storage (its log of
    operations), and whether all of it ran. After a crash the image is
    closed again, which writes nothing more."""
    from qimg.api import open_image

    holder = {}

    def wrap(storage: Storage) -> FaultyStorage:
        holder["faulty"] = FaultyStorage(storage, **{"sync": False, **faults})
        return holder["faulty"]

    image = open_image(path, "qcow2", writable=True, backing=backing, storage_wrapper=wrap)
    try:
        action(image)
        image.close()
        return holder["faulty"], True
    except SimulatedCrash:
        try:
            image.close()
        except SimulatedCrash:
            pass
        return holder["faulty"], False
