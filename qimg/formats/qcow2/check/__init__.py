"""Consistency check and repair: QEMU's qcow2 check (block/qcow2-refcount.c,
qcow2_co_check_locked), whole tables at once.

The package, by concern:
- result.py: CheckResult (BdrvCheckResult, exit codes, JSON), CheckFailed,
  the repair modes FIX_LEAKS / FIX_ERRORS.
- checker.py: one pass in QEMU's order (snapshot table, refcounts counted
  and compared, rebuild, OFLAG_COPIED, snapshot table repair).
- tally.py: the in-memory refcounts (qcow2_inc_refcounts_imrt over arrays,
  overflow handling).
- walk.py: the L1/L2 walk (check_refcounts_l1/_l2); repair.py: repairs of
  L1 and L2 entries; messages.py: the walk's messages in QEMU's order.
- refcounts.py: check_refblocks, compare_refcounts and the rebuild.
- copied.py: check_oflag_copied. snapshots.py: the snapshot table under
  check. bitmaps.py: the bitmaps' references.

Counting works on arrays of cluster indices, never a Python loop per
cluster; a Python loop runs only over what is wrong. Memory: one array of
computed counts and one of the stored refcounts, each of the image's
refcount width, over the clusters of the file; L2 tables are read in
bounded batches.

Where QEMU 7.2's repair leaves an image broken (an L2 entry that is
unaligned or points past the end of the file, an L1 entry pointing at
refcount metadata or past the end, a bitmap table entry past the end) qimg
makes the entry unallocated (zero in v3 images) and reports the lost
cluster, so that the repaired image checks clean.
"""

from __future__ import annotations

from qimg.errors import QimgError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.check.checker import check_once
from qimg.formats.qcow2.check.result import (
    FIX_ALL,
    FIX_ERRORS,
    FIX_LEAKS,
    CheckFailed,
    CheckResult,
)

__all__ = [
    "FIX_ALL",
    "FIX_ERRORS",
    "FIX_LEAKS",
    "CheckFailed",
    "CheckResult",
    "check_file",
    "check_image",
    "open_for_check",
    "repair_dirty",
]


def check_image(image, fix: int = 0) -> CheckResult:
    """qemu-img check [-r leaks|all] on an open image; raises CheckFailed.

    As img_check does: when anything was repaired, the image is checked
    again and that second result is returned, with the fixed counts of the
    first pass.
    """
    if getattr(image, "format_name", None) != "qcow2":
        from qimg.errors import NoCheckError

        raise NoCheckError("This image format does not support checks")
    result = check_once(image, fix)
    if result.corruptions_fixed or result.leaks_fixed:
        again = check_once(image, 0)
        again.messages[:0] = result.messages
        again.corruptions_fixed = result.corruptions_fixed
        again.leaks_fixed = result.leaks_fixed
        again.repaired = True
        result = again
    result.filename = image.filename
    return result


def open_for_check(
    path: str,
    fmt: str | None,
    fix: int,
    force_share: bool = False,
    *,
    secrets=None,
    shown: str | None = None,
):
    """Open an image as qemu-img check does (BDRV_O_CHECK): read-write only
    to repair; a dirty image is not repaired on open, an image marked
    corrupt may be opened read-write to be repaired; the data file and the
    backing chain are opened (not read). `secrets` are those the name's
    node options may name; messages call the image `shown` (default
    `path`: e.g. the --image-opts string `path` was made from)."""
    import os

    from qimg.errors import ImageIOError
    from qimg.filenames import parse_filename
    from qimg.opening import probe_format
    from qimg.storage import open_storage

    full = path
    given = shown or path  # as typed: a file:/json: name opens its file (qimg.filenames)
    try:
        name = parse_filename(full)
    except QimgError as exc:
        exc.args = (f"Could not open '{given}': {exc}",)
        raise
    path, fmt = name.path, fmt or name.fmt
    if not os.path.exists(path):
        # qemu-img names the file twice here: bdrv_open's prefix and file-posix's.
        raise ImageIOError(
            f"Could not open '{given}': Could not open '{path}': No such file or directory"
        )
    fmt = fmt or probe_format(path)
    if fmt != "qcow2":
        _refuse_format(given, full, fmt, fix, force_share, secrets)
    storage = open_storage(path, bool(fix), force_share=force_share)
    try:
        return _open_qcow2(storage, path, name, fix, force_share, secrets)
    except QimgError as exc:
        storage.close()
        msg = str(exc)
        if not msg.startswith(f"Could not open '{given}'"):
            exc.args = (f"Could not open '{given}': {msg}",)
        raise
    except BaseException:
        storage.close()
        raise


def _refuse_format(given: str, path: str, fmt: str, fix: int, force_share: bool, secrets) -> None:
    """Another format opens (its errors are the check's), then is refused."""
    from qimg.errors import NoCheckError
    from qimg.opening import open_image

    try:
        image = open_image(path, fmt, writable=bool(fix), force_share=force_share, secrets=secrets)
    except QimgError as exc:
        exc.args = (f"Could not open '{given}': {exc}",)  # bdrv_open's prefix
        raise
    with image:
        raise NoCheckError("This image format does not support checks")


def _check_mode_header(storage):
    """The header as qcow2_do_open reads it in check mode: the snapshot
    table pointer is discarded (the check reads, and repairs, the table
    itself), and a refcount table of zero clusters is accepted (the check
    finds every cluster's refcount missing)."""
    from qimg.formats.qcow2.header import Header

    size = storage.size()
    head = bytearray(storage.pread(0, min(size, 1 << L.MAX_CLUSTER_BITS)))
    n = L.HEADER_SNAPSHOTS.size
    head[L.HEADER_OFF_NB_SNAPSHOTS : L.HEADER_OFF_NB_SNAPSHOTS + n] = bytes(n)
    return Header.parse(bytes(head), size, check=True)


def _open_qcow2(storage, path: str, name, fix: int, force_share: bool, secrets):
    """The image over `storage`, in check mode; an image marked corrupt
    opens. `name` is the qimg.filenames.ImageName it was opened by."""
    from qimg.formats.qcow2.image import Qcow2Image
    from qimg.opening import (
        check_qcow2_options,
        node_encrypt_options,
        open_backing_chain,
        open_data_file,
    )

    open_backing = name.open_backing
    header = _check_mode_header(storage)
    check_qcow2_options(header, name, open_backing)
    corrupt = header.incompatible_features & L.QCOW2_INCOMPAT_CORRUPT
    header.incompatible_features &= ~L.QCOW2_INCOMPAT_CORRUPT
    # As qemu-img check, the data file and the backing chain are opened
    # too (and their errors are the check's), though neither is read.
    data_storage = open_data_file(header, bool(fix), force_share)
    try:
        backing = None
        if open_backing:
            backing = open_backing_chain(
                path,
                header,
                writable=bool(fix),
                force_share=force_share,
                secrets=secrets,
                options=name.backing_options(),
            )
        encrypt = node_encrypt_options(name.own_options())
        image = Qcow2Image(
            storage,
            header=header,
            backing=backing,
            data_storage=data_storage,
            secrets=secrets or {},
            encrypt=encrypt,
        )
    except BaseException:
        if backing is not None:
            backing.close()
        if data_storage is not None:
            data_storage.close()
        raise
    image.header.incompatible_features |= corrupt
    return image


def check_file(
    path: str,
    fmt: str | None = None,
    fix: int = 0,
    force_share: bool = False,
    *,
    secrets=None,
    shown: str | None = None,
):
    """qemu-img check FILE: open, check (and repair), close (`secrets` and
    `shown` as for open_for_check)."""
    image = open_for_check(path, fmt, fix, force_share, secrets=secrets, shown=shown)
    try:
        result = check_image(image, fix)
        result.filename = shown or path
        return result
    finally:
        image.close()


def repair_dirty(image) -> CheckResult:
    """QEMU's open of a dirty image (lazy refcounts): repair the refcounts,
    then clear the dirty bit. Call on an image opened read-write whose
    header has the dirty bit; raises CheckFailed if it cannot be repaired."""
    result = check_once(image, FIX_ALL)
    if result.check_errors:
        raise CheckFailed("Could not repair dirty image: Input/output error", result)
    return result
