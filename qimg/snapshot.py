"""Internal snapshots of an open image, as `qemu-img snapshot` reports them.

The qcow2 work is in qimg.formats.qcow2.snapshot; this layer refuses other
formats and words every failure as qemu-img does.
"""

from __future__ import annotations

import errno
import os
import time

from qimg.driver import Driver
from qimg.errors import QimgError, UnsupportedFeatureError

__all__ = ["list_snapshots", "create", "apply", "delete", "load_tmp"]


def list_snapshots(image: Driver) -> list[dict]:
    """The snapshots as `info --output=json` lists them (none for formats
    without snapshots, or a qcow2 image with an external data file: QEMU's
    qcow2_snapshot_list refuses those)."""
    return list(image.info().snapshots or [])


def create(image: Driver, name: str) -> None:
    """qemu-img snapshot -c: dated now (microseconds, as g_get_real_time)."""
    from qimg.formats.qcow2.snapshot import SnapshotError, create_snapshot

    try:
        if not image.has_snapshots:
            raise SnapshotError(os.strerror(errno.ENOTSUP), errno.ENOTSUP)
        now = time.time_ns() // 1000
        create_snapshot(image, name, now // 1_000_000, now % 1_000_000 * 1000)
    except SnapshotError as exc:
        raise QimgError(
            f"Could not create snapshot '{name}': -{exc.errno} ({os.strerror(exc.errno)})"
        ) from None


def apply(image: Driver, name: str) -> None:
    """qemu-img snapshot -a: NAME is an id first, then a name."""
    from qimg.formats.qcow2.resize import resize
    from qimg.formats.qcow2.snapshot import apply_snapshot

    if not image.has_snapshots:
        raise UnsupportedFeatureError(
            f"Could not apply snapshot '{name}': Block driver does not support snapshots"
        )
    try:
        apply_snapshot(image, name, resize)
    except QimgError as exc:
        lines = [*getattr(exc, "reported", []), f"Could not apply snapshot '{name}': {exc}"]
        exc.args = ("\nqimg: ".join(lines),)
        raise


def delete(image: Driver, name: str) -> None:
    """qemu-img snapshot -d: NAME is a name first, then an id."""
    from qimg.formats.qcow2.snapshot import delete_snapshot

    if not list_snapshots(image):
        raise QimgError(f"Could not delete snapshot '{name}': snapshot not found")
    try:
        delete_snapshot(image, name)
    except QimgError as exc:
        exc.args = (f"Could not delete snapshot '{name}': {exc}",)
        raise


def load_tmp(image: Driver, snapshot_id: str | None, name: str | None) -> Driver:
    """QEMU's bdrv_snapshot_load_tmp (convert -l/-s, measure -l): a
    read-only view of `image` as its internal snapshot `snapshot_id` /
    `name` holds it (closing it closes nothing of `image`'s)."""
    if not image.has_snapshots:
        raise UnsupportedFeatureError(
            f"Failed to load snapshot: Block format '{image.format_name}' used by device "
            "'' does not support temporarily loading internal snapshots"
        )
    from qimg.formats.qcow2.snapshot import open_snapshot_view

    try:
        return open_snapshot_view(image, snapshot_id, name)
    except QimgError as exc:
        msg = str(exc)
        if not msg.startswith("Failed to load snapshot: "):
            exc.args = ("Failed to load snapshot: " + msg,)
        raise
