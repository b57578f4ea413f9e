"""The public library: a facade over the engine that the commands call.

    import qimg
    with qimg.open_image("disk.qcow2", writable=True) as img:
        img.write(0, b"hello")
        print(img.read(0, 5))

Everything the command line does goes through these functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

from qimg.cachemode import CacheMode
from qimg.driver import Driver
from qimg.errors import BadOptionError, QimgError
from qimg.opening import (
    FORMATS,
    open_backing_chain,
    open_data_file,
    probe_format,
    probed_raw_text,
    probed_raw_warning,
    resolve_backing_path,
)
from qimg.storage import Storage

__all__ = [
    "FORMATS",
    "check_image_file",
    "create_image",
    "create_options_help",
    "describe",
    "open_backing_chain",
    "open_data_file",
    "open_image",
    "probe_format",
    "probed_raw_text",
    "probed_raw_warning",
    "resolve_backing_path",
]


def open_image(
    path: str,
    fmt: str | None = None,
    *,
    writable: bool = False,
    force_share: bool = False,
    backing: bool = True,
    cache: CacheMode | str | None = None,
    lock: bool = True,
    data_file: bool = True,
    storage_wrapper: Callable[[Storage], Storage] | None = None,
    cache_unsafe: bool = False,
    secrets: Mapping[str, bytes] | None = None,
) -> Driver:
    """Open an image; with `backing`, its whole backing chain too.

    `path` is a file name as qemu-img takes it: a path, `file:PATH`, or a
    `json:{...}` pseudo-filename (qimg.filenames); so are backing file
    names read from images. An encrypted image's node options name its
    secret (`json:{..., "encrypt.key-secret": "s"}`, or `key-secret` for
    luks), whose value `secrets` holds by id (qimg.secrets.parse_objects). Raises a QimgError subclass with qemu-img's
    wording on failure. `data_file=False` opens for metadata only (QEMU's
    BDRV_O_NO_IO, as `info` does): an external data file is not opened.
    `storage_wrapper`, when given, wraps this image's own storage (not its
    backing files or data file) before the driver sees it: the place to
    inject crashes (qimg.faults.FaultyStorage) or observe I/O. `cache` is
    qemu-img's cache mode (qimg.cachemode; default writeback);
    `cache_unsafe` is the old spelling of cache="unsafe"."""
    from qimg import opening

    image = opening.open_image(
        path,
        fmt,
        writable=writable,
        force_share=force_share,
        backing=backing,
        cache=cache,
        cache_unsafe=cache_unsafe,
        lock=lock,
        data_file=data_file,
        storage_wrapper=storage_wrapper,
        secrets=secrets,
    )
    if writable and image.dirty:
        # QEMU's qcow2_do_open: a dirty image (lazy refcounts) has its
        # refcounts repaired, then the dirty bit cleared.
        from qimg.formats.qcow2.check import repair_dirty

        try:
            repair_dirty(image)
        except BaseException:
            image.close()
            raise
    return image


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
    secrets: Mapping[str, bytes] | None = None,
) -> str:
    """Create an image; returns qemu-img's 'Formatting ...' line.

    `options` are the -o key/value pairs of qemu-img create, as typed. The
    size may be omitted when a backing file gives it. `on_formatting`, when
    given, receives the line where qemu-img prints it (before the format's
    own option checks, which can still fail). `secrets` (by id) hold the
    values the options' secret ids name (encrypt.key-secret=ID).
    """
    if fmt not in FORMATS:
        raise BadOptionError(f"Unknown file format '{fmt}'")
    if fmt == "qcow":
        raise BadOptionError("qcow images can be read but not created by qimg")
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
        secrets=secrets,
    )


def create_options_help(fmt: str, with_protocol: bool = True) -> str:
    """`qemu-img create -f FMT -o help [FILE]`: the format's options (and,
    with `with_protocol`, the file protocol's), sorted by name."""
    if fmt not in FORMATS:
        raise QimgError(f"Unknown file format '{fmt}'")
    from qimg.create import options_help

    return options_help(fmt, with_protocol)


def describe(
    filename: str,
    fmt: str | None = None,
    *,
    force_share: bool = False,
    backing_chain: bool = False,
    image_opts: bool = False,
    secrets: Mapping[str, bytes] | None = None,
) -> list[dict]:
    """`qemu-img info [--backing-chain]`: the ImageInfo of the image (and,
    with `backing_chain`, of each image below it), as qemu-img's JSON.
    With `image_opts`, `filename` is an --image-opts option string."""
    from qimg.info import describe as describe_chain

    if image_opts and fmt is not None:
        raise BadOptionError("--image-opts and --format are mutually exclusive")
    return describe_chain(
        filename,
        fmt,
        force_share=force_share,
        backing_chain=backing_chain,
        image_opts=image_opts,
        secrets=secrets,
    )


def check_image_file(
    filename: str,
    fmt: str | None = None,
    fix: int = 0,
    force_share: bool = False,
    cache: CacheMode | str | None = None,
    *,
    image_opts: bool = False,
    secrets: Mapping[str, bytes] | None = None,
):
    """`qemu-img check [-r leaks|all] [-T cache]`: open, check (and repair:
    `fix` is 1 for leaks, 3 for all), close; returns the CheckResult. A
    check that cannot complete raises CheckFailed (whose `result` holds
    what was found). With `image_opts`, `filename` is an --image-opts
    option string."""
    from qimg.cachemode import cache_mode
    from qimg.filenames import image_opts_name
    from qimg.formats.qcow2.check import check_file

    cache = cache_mode(cache, source=True)
    if not image_opts:
        return check_file(filename, fmt, fix, force_share, cache, secrets=secrets)
    if fmt is not None:
        raise BadOptionError("--image-opts and --format are mutually exclusive")
    return check_file(
        image_opts_name(filename), None, fix, force_share, cache, secrets=secrets, shown=filename
    )


def open_named(path: str, fmt: str | None = None, *, image_opts: bool = False, **kw) -> Driver:
    """open_image (keywords as there, `secrets` among them) failing as
    qemu-img's img_open does: "Could not open 'PATH': " before what the
    open said. With `image_opts`, `path` is an --image-opts option string
    (driver=qcow2,file.filename=...,encrypt.key-secret=ID), opened as the
    json: name that says the same, and messages still call it `path`."""
    from qimg.errors import ImageLockedError
    from qimg.filenames import image_opts_name, name_lock_error

    opened = image_opts_name(path) if image_opts else path
    try:
        return open_image(opened, fmt, **kw)
    except ImageLockedError as exc:
        name_lock_error(exc, opened, path)
        raise
    except QimgError as exc:
        # qemu-img doubles the prefix of a failed file open, but a lock
        # conflict (or -U on a read-write open) comes from the permission
        # update and carries one.
        carries = isinstance(exc, BadOptionError) and str(exc).startswith("Could not open '")
        if not isinstance(exc, ImageLockedError) and not carries:
            exc.args = (f"Could not open '{path}': {exc}",)
        raise


def edit_bitmap(
    path: str,
    name: str,
    actions: list,
    *,
    fmt: str | None = None,
    granularity: int = 0,
    source_path: str | None = None,
    source_fmt: str | None = None,
    image_opts: bool = False,
    secrets: Mapping[str, bytes] | None = None,
) -> None:
    """qemu-img bitmap: apply `actions` (bitmap_ops.Action, in order) to the
    persistent bitmap `name`; merges read `source_path`'s bitmaps if given.
    Every action is checked before anything is written: on failure the
    image is left as it was (qimg.formats.qcow2.bitmap_ops). With
    `image_opts`, `path` is an option string (see open_named); `secrets`
    are those the images' options may name."""
    from qimg.formats.qcow2.bitmap_ops import apply_plan, plan_actions

    image = open_named(
        path, fmt, image_opts=image_opts, writable=True, backing=False, secrets=secrets
    )
    try:
        source = (
            open_named(source_path, source_fmt, backing=False, secrets=secrets)
            if source_path
            else None
        )
        try:
            apply_plan(image, plan_actions(image, name, actions, granularity, source))
        finally:
            if source is not None:
                source.close()
    finally:
        image.close()


def list_bitmaps(
    path: str,
    fmt: str | None = None,
    *,
    force_share: bool = False,
    image_opts: bool = False,
    secrets: Mapping[str, bytes] | None = None,
) -> list[dict]:
    """The persistent bitmaps of an image: name, granularity, flags and
    dirty bytes ("count"; see bitmap_ops.list_bitmaps)."""
    from qimg.formats.qcow2.bitmap_ops import list_bitmaps as listed

    with open_named(
        path, fmt, image_opts=image_opts, force_share=force_share, backing=False, secrets=secrets
    ) as image:
        return listed(image)


def __getattr__(name: str):
    # The check's result and failure types, loaded with the check (numpy).
    if name in ("CheckFailed", "CheckResult"):
        from qimg.formats.qcow2 import check

        return getattr(check, name)
    raise AttributeError(f"module 'qimg.api' has no attribute {name!r}")


@contextlib.contextmanager
def map_image(
    path: str,
    fmt: str | None = None,
    *,
    image_opts: bool = False,
    force_share: bool = False,
    start: int = 0,
    max_length: int | None = None,
    secrets: Mapping[str, bytes] | None = None,
) -> Iterator[Iterator]:
    """`qemu-img map`: opens the image (failing as qemu-img does), then
    gives the merged entries (qimg.map.MapEntry) of guest [start, start +
    max_length), clipped to the image, through its backing chain, as they
    are found; the image is closed on leaving. With `image_opts`, `path`
    is an option string; `secrets` are the --object secrets by id.

        with qimg.api.map_image("disk.qcow2") as entries:
            for entry in entries: ...
    """
    from qimg.map import iter_map

    if image_opts and fmt is not None:
        raise BadOptionError("--image-opts and --format are mutually exclusive")
    with open_named(
        path, fmt, image_opts=image_opts, force_share=force_share, secrets=secrets
    ) as image:
        yield iter_map(image, start, max_length)


def measure_image(
    out_fmt: str = "raw",
    options: list[str] | tuple[str, ...] = (),
    *,
    size: int | None = None,
    filename: str | None = None,
    fmt: str | None = None,
    image_opts: bool = False,
    force_share: bool = False,
    snapshot_id: str | None = None,
    snapshot_name: str | None = None,
    secrets: Mapping[str, bytes] | None = None,
):
    """`qemu-img measure`: the qimg.measure.Measurement of an `out_fmt`
    image made with `options` (-o texts), of `size` bytes or holding the
    image `filename` (its internal snapshot, if one is named)."""
    from qimg.measure import measure

    if filename is None:
        return measure(out_fmt, options, size=size, secrets=secrets)
    if image_opts and fmt is not None:
        raise BadOptionError("--image-opts and --format are mutually exclusive")
    with open_named(
        filename, fmt, image_opts=image_opts, force_share=force_share, secrets=secrets
    ) as image:
        if snapshot_id is None and snapshot_name is None:
            return measure(out_fmt, options, source=image, secrets=secrets)
        from qimg.snapshot import load_tmp

        with load_tmp(image, snapshot_id, snapshot_name) as view:
            return measure(out_fmt, options, source=view, secrets=secrets)
