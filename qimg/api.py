"""The public library: open_image() and create_image().

    import qimg
    with qimg.open_image("disk.qcow2", writable=True) as img:
        img.write(0, b"hello")
        print(img.read(0, 5))

Everything the command line does goes through these functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from qimg.driver import Driver
from qimg.errors import BackingChainError, BadOptionError, ImageIOError, QimgError
from qimg.formats.qcow2 import layout as L
from qimg.storage import FileStorage, Storage

FORMATS = ("qcow2", "raw")
MAX_BACKING_DEPTH = 1000


def probe_format(path: str) -> str:
    """'qcow2' where the file starts with the qcow2 magic, else 'raw'."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except IsADirectoryError:
        raise ImageIOError(f"Could not open '{path}': Is a directory") from None
    except OSError as exc:
        raise ImageIOError(f"Could not open '{path}': {exc.strerror}") from None
    if len(magic) == 4 and int.from_bytes(magic, "big") == L.QCOW_MAGIC:
        return "qcow2"
    return "raw"


def resolve_backing_path(image_path: str, backing: str) -> str:
    """QEMU's bdrv_get_full_backing_filename: a relative backing file name
    is relative to the directory of the image that names it."""
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(image_path), backing)


def open_image(
    path: str,
    fmt: str | None = None,
    *,
    writable: bool = False,
    force_share: bool = False,
    backing: bool = True,
    backing_fmt: str | None = None,
    cache_unsafe: bool = False,
    lock: bool = True,
    data_file: bool = True,
    storage_wrapper: Callable[[Storage], Storage] | None = None,
    _chain: tuple[str, ...] = (),
) -> Driver:
    """Open an image; with `backing`, its whole backing chain too.

    Raises a QimgError subclass with qemu-img's wording on failure.
    `data_file=False` opens for metadata only (QEMU's BDRV_O_NO_IO, as
    `info` does): an external data file is not opened.
    `storage_wrapper`, when given, wraps this image's own storage (not its
    backing files or data file) before the driver sees it: the place to
    inject crashes (qimg.faults.FaultyStorage) or observe I/O.
    """
    if fmt is not None and fmt not in FORMATS:
        raise BadOptionError(f"Unknown driver '{fmt}'")
    if not os.path.exists(path):
        raise ImageIOError(f"Could not open '{path}': No such file or directory")
    real = os.path.realpath(path)
    if real in _chain:
        raise BackingChainError(f"Backing file '{path}' creates a loop in the backing chain")
    if len(_chain) > MAX_BACKING_DEPTH:
        raise BackingChainError("Backing chain is too deep")
    fmt = fmt or probe_format(path)
    storage = FileStorage(
        path,
        writable,
        force_share=force_share,
        lock=lock,
        **_raw_masks(fmt, writable, force_share),
    )
    if storage_wrapper is not None:
        storage = storage_wrapper(storage)
    try:
        if fmt == "raw":
            from qimg.formats.raw import RawImage

            return RawImage(storage)
        return _open_qcow2(
            storage,
            path,
            writable,
            force_share,
            backing,
            cache_unsafe,
            lock,
            _chain + (real,),
            data_file,
        )
    except BaseException:
        storage.close()
        raise


def _raw_masks(fmt: str, writable: bool, force_share: bool) -> dict:
    if fmt != "raw":
        return {}
    from qimg.locking import image_perms

    perm, shared = image_perms(writable, force_share, metadata=False)
    return {"perm": perm, "shared": shared}


def _open_qcow2(
    storage, path, writable, force_share, backing, cache_unsafe, lock, chain, open_data_file=True
):
    from qimg.formats.qcow2.header import Header
    from qimg.formats.qcow2.image import Qcow2Image

    size = storage.size()
    first = storage.pread(0, min(size, 1 << L.MAX_CLUSTER_BITS))
    header = Header.parse(first, size)
    data_storage = None
    backing_image = None
    try:
        if header.has_data_file and open_data_file:
            if header.data_file is None:
                raise QimgError("Could not open image: data-file is required for this image")
            # QEMU opens the data file by the name as written (relative to
            # the working directory, not to the image).
            data_path = header.data_file
            data_storage = FileStorage(data_path, writable, force_share=force_share, lock=lock)
        if backing and header.backing_file:
            backing_path = resolve_backing_path(path, header.backing_file)
            try:
                backing_image = open_image(
                    backing_path,
                    header.backing_format,
                    force_share=True if not writable else force_share,
                    cache_unsafe=cache_unsafe,
                    lock=lock,
                    data_file=open_data_file,
                    _chain=chain,
                )
            except BackingChainError:
                raise
            except QimgError as exc:
                raise BackingChainError(f"Could not open backing file: {exc}") from None
        image = Qcow2Image(
            storage,
            backing=backing_image,
            data_storage=data_storage,
            header=header,
            cache_unsafe=cache_unsafe,
            metadata_only=not open_data_file,
        )
        if writable and header.dirty:
            # QEMU's qcow2_do_open: a dirty image (lazy refcounts) has its
            # refcounts repaired, then the dirty bit cleared.
            from qimg.formats.qcow2.check import repair_dirty

            repair_dirty(image)
        return image
    except BaseException:
        if backing_image is not None:
            backing_image.close()
        if data_storage is not None:
            data_storage.close()
        raise


def create_image(
    path: str,
    fmt: str = "raw",
    size: int | None = None,
    options: dict[str, str] | None = None,
    *,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    check_backing: bool = True,
    on_formatting=None,
) -> str:
    """Create an image; returns qemu-img's 'Formatting ...' line.

    `options` are the -o key/value pairs of qemu-img create, as typed. The
    size may be omitted when a backing file gives it. `on_formatting`, when
    given, receives the line where qemu-img prints it (before the format's
    own option checks, which can still fail).
    """
    if fmt not in FORMATS:
        raise BadOptionError(f"Unknown file format '{fmt}'")
    from qimg.create import create

    return create(
        path,
        fmt,
        size,
        dict(options or {}),
        backing_file=backing_file,
        backing_fmt=backing_fmt,
        check_backing=check_backing,
        on_formatting=on_formatting,
    )
