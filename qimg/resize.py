"""Resizing an image (qemu-img resize): the rules every format shares,
then the format's own truncate (qcow2: qimg.formats.qcow2.resize)."""

from __future__ import annotations

from qimg.errors import QimgError

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
SHRINK_HINT = (
    "Shrinking an image will delete all data beyond the shrunken image's end. Before "
    "performing such an operation, make sure there is no important data there."
)


class ShrinkRefused(QimgError):
    """A shrink without --shrink: qemu-img's error, then SHRINK_HINT as a warning."""


def _int64(value: int) -> int:
    """qemu-img keeps sizes in int64_t: larger values wrap negative."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def new_size(current: int, size: int, relative: int) -> int:
    """The size asked for: `size`, or current +/- size (`relative` +1/-1)."""
    total = _int64(current + relative * _int64(size)) if relative else _int64(size)
    if total <= 0:
        raise QimgError("New image size must be positive")
    return total


def resize_image(
    image, size: int, relative: int = 0, prealloc: str | None = None, shrink: bool = False
) -> int:
    """Resize the open, writable `image` (a driver from qimg.open_image) to
    `size` bytes, or by +/- `size` with `relative` +1/-1; returns the new
    size. qemu-img's img_resize checks come first, then the format's."""
    total = new_size(image.size, size, relative)
    if total <= image.size and prealloc not in (None, "off"):
        raise QimgError("Preallocation can only be used for growing images")
    if total < image.size and not shrink:
        raise ShrinkRefused("Use the --shrink option to perform a shrink operation.")
    mode = prealloc or "off"
    if image.format_name == "qcow2":
        from qimg.formats.qcow2.resize import resize

        resize(image, total, mode)
    elif image.format_name == "raw":
        _resize_raw(image, total, mode)
    elif image.format_name == "luks":
        _resize_raw(image, total, mode, image.payload_offset)
    else:
        raise QimgError("Image format driver does not support resize")
    return total


def _resize_raw(image, size: int, mode: str, base: int = 0) -> None:
    """file-posix's raw_co_truncate: off, falloc and full for the new area
    (of a file whose guest data starts at `base`: luks's payload; the
    preallocated area is the file's zeros, not encrypted ones, as QEMU's)."""
    if mode not in ("off", "falloc", "full"):
        raise QimgError(f"Unsupported preallocation mode: {mode}")
    old = image.size
    storage = image.storage
    if mode == "falloc" and size > old:
        storage.fallocate(base + old, size - old)
    elif mode == "full" and size > old:
        from qimg.formats.qcow2.create import write_zeros

        storage.truncate(base + old)
        write_zeros(storage, base + old, size - old)
    image.truncate(size)
