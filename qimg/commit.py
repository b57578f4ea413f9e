"""Writing an overlay's data down its backing chain (qemu-img commit).

What the images above the base hold (data and zeros, and zeros past the end
of a shorter image between them) is written into the base, grown first to
the top's size where it is smaller, as QEMU's commit job does; then, unless
dropped (-d, and always with -b), the top image is emptied: every cluster
unallocated, as qcow2_make_empty leaves it.

Written against the driver interface; the base is reopened read-write the
way QEMU reopens it for the job (the chain is opened read-only below a
writable top).
"""

from __future__ import annotations

from collections.abc import Callable

from qimg.convert.scan import DATA
from qimg.driver import Driver
from qimg.errors import QimgError
from qimg.storage import Storage

# Guest bytes read and written per step.
CHUNK = 8 << 20
# The smallest unit QEMU's commit (mirror) job copies (its default
# granularity is the base's cluster size, at least 4 KiB).
MIN_GRANULARITY = 4096

Progress = Callable[[int, int], None]


def commit_image(
    image: Driver,
    filename: str,
    base: str | None = None,
    *,
    drop: bool = False,
    rate_limit: int = 0,
    progress: Progress | None = None,
    cache_unsafe: bool = False,
    base_storage_wrapper: Callable[[Storage], Storage] | None = None,
) -> None:
    """Commit `image` (opened writable with its backing chain; `filename`
    is its name in messages) into its backing file, or into the image of
    its chain that `base` names (qimg.chain.find_backing_image). `drop`
    keeps the top's clusters (-d); a `base` implies it, as in qemu-img.
    `rate_limit` is bytes a second (0: none). `base_storage_wrapper` wraps
    the base's storage when it is reopened read-write (crash tests)."""
    from qimg.chain import find_backing_image

    if base is not None:
        target = find_backing_image(image, base)
        if target is None:
            raise QimgError(f"Did not find '{base}' in the backing chain of '{filename}'")
        drop = True
    else:
        target = image.backing
        if target is None:
            raise QimgError("Image does not have a backing file")
    target = _reopen_writable(image, target, cache_unsafe, base_storage_wrapper)
    copy_down(image, target, rate_limit, progress)
    # Ordering: the base holds the data durably before the top lets go of it.
    target.flush()
    if not drop:
        make_empty(image)


def _reopen_writable(
    image: Driver,
    target: Driver,
    cache_unsafe: bool,
    wrapper: Callable[[Storage], Storage] | None,
) -> Driver:
    """The image `target` of `image`'s chain, closed and opened again
    read-write with the chain below it, in its place in the chain."""
    from qimg.api import open_image

    parent = image
    while parent.backing is not target:
        parent = parent.backing
    path, fmt = target.filename, target.format_name
    parent.backing = None
    target.close()
    reopened = open_image(
        path, fmt, writable=True, cache_unsafe=cache_unsafe, storage_wrapper=wrapper
    )
    parent.backing = reopened
    return reopened


def copy_down(
    image: Driver, base: Driver, rate_limit: int = 0, progress: Progress | None = None
) -> int:
    """Write into `base` (writable, in `image`'s chain) what `image` reads
    wherever an image above `base` decides the bytes; returns the bytes
    copied. Zeros are written as zeros (unmapping where the base can);
    copies are whole units of the base's granularity, as QEMU's job makes
    them."""
    from qimg.chain import allocated_above, merge_ranges

    if base.size < image.size:
        from qimg.resize import resize_image

        resize_image(base, image.size)
    unit = max(MIN_GRANULARITY, base.cluster_bytes)
    size = image.size
    runs = merge_ranges(
        [
            (lo // unit * unit, min(size, -(-hi // unit) * unit))
            for lo, hi in allocated_above(image, base, 0, size)
        ]
    )
    limit = _rate_limiter(rate_limit)
    total = sum(hi - lo for lo, hi in runs)
    done = 0
    for lo, hi in runs:
        pos = lo
        while pos < hi:
            n = min(CHUNK, hi - pos)
            _copy_chunk(image, base, pos, n, limit)
            pos += n
            done += n
            if progress is not None:
                progress(done, total)
    return total


def _copy_chunk(image: Driver, base: Driver, pos: int, n: int, limit) -> None:
    """Guest [pos, pos+n) of `image`, read through the chain (once), into
    `base`: data runs written, zero runs made zero."""
    from qimg.convert.scan import allocation_runs

    runs = allocation_runs(image.allocated_extents(pos, n))
    buf = None
    if any(kind == DATA for _s, _e, kind in runs):
        buf = bytearray(n)
        image.readinto(pos, buf)
    for start, end, kind in runs:
        if kind == DATA:
            base.write(start, memoryview(buf)[start - pos : end - pos])
            if limit is not None:
                limit.account(end - start)
        else:
            _write_zeroes(base, start, end - start)


def _write_zeroes(base: Driver, start: int, length: int) -> None:
    """Zeros as QEMU's job writes them (unmapping): a qcow2 version 2 image
    with nothing below it, which has no zero clusters, has its whole
    clusters discarded (they read as zeros) and zeros written around them."""
    cs = base.cluster_bytes
    v2_alone = base.format_name == "qcow2" and base.header.version < 3 and base.backing is None
    lo, hi = -(-start // cs) * cs, (start + length) // cs * cs
    if not v2_alone or hi <= lo:
        base.write_zeroes(start, length, unmap=True)
        return
    if lo > start:
        base.write_zeroes(start, lo - start)
    base.discard(lo, hi - lo)
    if start + length > hi:
        base.write_zeroes(hi, start + length - hi)


def _rate_limiter(rate: int):
    if not rate:
        return None
    from qimg.convert.writer import RateLimit

    return RateLimit(rate)


def make_empty(image: Driver) -> None:
    """QEMU's bdrv_make_empty of the top after a commit: every cluster
    reads from the backing file again (qcow2: unallocated)."""
    if image.format_name != "qcow2":
        return  # QEMU's -ENOTSUP, which qemu-img commit ignores
    from qimg.formats.qcow2.empty import make_empty as qcow2_make_empty

    qcow2_make_empty(image)
