"""Any sequence of writes and snapshot create/apply/delete leaves an image
that `qemu-img check` finds clean after every step, and in which qemu-img
reads, for the active layer and for each snapshot, what a model of the data
says it holds."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from conftest import qemu_check_clean, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qimg.api import open_image
from qimg.formats.qcow2.snapshot import apply_snapshot, create_snapshot, delete_snapshot

CLUSTER = 512
SIZE = 48 * 1024  # two L2 tables of 512-byte clusters
NAMES = ("a", "b", "c")

_write = st.tuples(
    st.just("write"),
    st.integers(0, SIZE - 1),
    st.integers(1, 6 * CLUSTER),
    st.integers(1, 255),
)
_zero = st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 8 * CLUSTER))
_snap = st.tuples(st.sampled_from(("create", "apply", "delete")), st.sampled_from(NAMES))
STEPS = st.lists(st.one_of(_write, _zero, _snap, _snap), min_size=1, max_size=9)


class Model:
    """The active layer's bytes and each snapshot's (id, name, bytes)."""

    def __init__(self) -> None:
        self.active = bytearray(SIZE)
        self.snaps: list[tuple[str, str, bytes]] = []
        self.next_id = 1

    def find(self, name: str) -> int:
        return next((i for i, s in enumerate(self.snaps) if s[1] == name), -1)


def apply_step(path: Path, model: Model, step: tuple) -> None:
    with open_image(str(path), writable=True) as img:
        kind = step[0]
        if kind in ("write", "zero"):
            offset = step[1]
            length = min(step[2], SIZE - offset)
            if kind == "write":
                data = bytes([step[3]]) * length
                img.write(offset, data)
            else:
                data = bytes(length)
                img.write_zeroes(offset, length)
            model.active[offset : offset + length] = data
            return
        name = step[1]
        i = model.find(name)
        if kind == "create":
            create_snapshot(img, name, 0, 0)
            model.snaps.append((str(model.next_id), name, bytes(model.active)))
            model.next_id += 1
        elif i >= 0 and kind == "apply":
            apply_snapshot(img, name)
            model.active[:] = model.snaps[i][2]
        elif i >= 0:
            delete_snapshot(img, name)
            del model.snaps[i]
            model.next_id = 1 + max((int(s[0]) for s in model.snaps), default=0)


def qemu_raw(path: Path, tmp: Path, snapshot_id: str | None = None) -> bytes:
    out = tmp / "read.raw"
    args = ["qemu-img", "convert", "-U"]
    if snapshot_id is not None:
        args += ["-l", f"snapshot.id={snapshot_id}"]
    run(args + ["-O", "raw", str(path), str(out)])
    return out.read_bytes()


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=STEPS)
def test_snapshot_sequences_keep_every_layer_as_the_model_says(steps):
    tmp = Path(tempfile.mkdtemp(prefix="qimg-snapshot-prop-"))
    try:
        path = tmp / "disk.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
             str(path), str(SIZE)])  # fmt: skip
        model = Model()
        for step in steps:
            apply_step(path, model, step)
            qemu_check_clean(path)
        assert qemu_raw(path, tmp) == model.active
        for sid, _name, data in model.snaps:
            assert qemu_raw(path, tmp, sid) == data
    finally:
        shutil.rmtree(tmp)
