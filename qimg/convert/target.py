"""The target: the checks qemu-img makes before creating it, its creation
(sized after the sources), its opening, its backing file (-B), and its
removal when a copy into a new target fails."""

from __future__ import annotations

import os
import sys
import threading

from qimg.convert.options import ConvertOptions
from qimg.convert.source import Sources, need_name
from qimg.driver import Driver
from qimg.errors import BadOptionError, ImageIOError, ImageLockedError, QimgError


def check_target_options(o: ConvertOptions) -> None:
    """The checks qemu-img makes before creating the target."""
    from qimg.api import FORMATS

    if o.target_format is None and o.target_image_opts:
        return  # the target's options name its format (or it is probed)
    if o.target_format not in FORMATS:
        raise BadOptionError(f"Unknown file format '{o.target_format}'")
    if o.target_format == "qcow":  # qimg reads qcow (version 1) images only
        verb = "written" if o.skip_create else "created"
        raise BadOptionError(f"qcow images can be read but not {verb} by qimg")
    if o.skip_create:
        return
    _check_create_options(o)
    fmt = o.target_format
    if o.backing_file and fmt != "qcow2":
        raise BadOptionError(f"Backing file not supported for file format '{fmt}'")
    # -B and -F are -o backing_file and backing_fmt under other names.
    backing = o.backing_file or o.create_options.get("backing_file")
    if backing and not (o.backing_format or o.create_options.get("backing_fmt")):
        raise BadOptionError("Use of backing file requires explicit backing format")
    if o.compress and fmt != "qcow2":
        raise BadOptionError("Compression not supported for this file format")
    if o.compress and _encrypts(o.create_options):
        raise BadOptionError("Compression and encryption not supported at the same time")
    if o.compress and o.create_options.get("preallocation", "off") != "off":
        raise BadOptionError("Compression and preallocation not supported at the same time")
    if o.bitmaps and fmt != "qcow2":
        raise BadOptionError(f"Format driver '{fmt}' does not support bitmaps")


def _encrypts(options: dict[str, str]) -> bool:
    """Whether -o asks for an encrypted target (qemu-img's test: the
    `encryption` flag or any `encrypt.format`)."""
    from qimg.options import parse_bool

    return "encrypt.format" in options or parse_bool("encryption", options.get("encryption", "off"))


def _check_create_options(o: ConvertOptions) -> None:
    """Unknown or malformed -o options fail before anything is created
    (qemu_opts_do_parse), unwrapped; validation failures come later."""
    from qimg.create import _typed, option_list

    descs = {d.name: d for d in option_list(o.target_format)}
    for key, text in o.create_options.items():
        if key not in descs:
            raise BadOptionError(f"Invalid parameter '{key}'")
        _typed(descs[key], text)


def create_target(target: str, size: int, o: ConvertOptions) -> None:
    """Create the target, `size` bytes (the sources' size), in qemu-img
    convert's words when that fails."""
    from qimg.api import create_image
    from qimg.filenames import create_path

    create_path(target)  # an unknown protocol fails before creation, unprefixed
    opts = dict(o.create_options)
    opts.pop("size", None)  # qemu-img convert sizes the target after its sources
    if o.backing_format and not o.backing_file:
        opts["backing_fmt"] = o.backing_format  # create rejects it with qemu's words
    try:
        create_image(
            target,
            o.target_format,
            size,
            opts,
            backing_file=o.backing_file,
            backing_fmt=o.backing_format if o.backing_file else None,
            # As qemu-img: the backing file is first opened with the new
            # target ("Could not open 'T': Could not open backing file: ..."),
            # which is then removed again.
            check_backing=False,
            secrets=o.secrets,
        )
    except QimgError as exc:
        # Never remove anything here: a target that could not be created may
        # be someone else's file (e.g. one of the sources, locked by us).
        err: QimgError = exc
        if not os.path.isdir(os.path.dirname(os.path.abspath(target))):
            err = ImageIOError(f"Could not create '{target}': No such file or directory")
        msg = str(err).removeprefix(f"{target}: ")
        err.args = (f"{target}: error while converting {o.target_format}: {msg}",)
        raise err from None


def create_while_loading(target: str, size: int, o: ConvertOptions) -> None:
    """create_target in a thread while this one loads what the copy needs.

    Replacing an existing target frees its pages first (~0.13 s a GiB on
    tmpfs, all in the kernel); numpy and the pipeline's modules (~50 ms)
    load meanwhile. Nothing is loaded before every check that qemu-img
    makes ahead of creating the target has passed, so a failure still
    leaves the file system as it was."""
    failure: list[BaseException] = []

    def create() -> None:
        try:
            create_target(target, size, o)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=create, name="qimg-convert-create")
    thread.start()
    try:
        _load_pipeline()
    except BaseException:
        thread.join()
        if not failure:
            remove_target(target)  # made here, and no copy will follow
        raise
    thread.join()
    if failure:
        raise failure[0]


def _load_pipeline() -> None:
    import numpy  # noqa: F401

    import qimg.convert.pipeline  # noqa: F401
    import qimg.convert.writer  # noqa: F401
    import qimg.formats.qcow2.cluster  # noqa: F401
    import qimg.formats.qcow2.refcount  # noqa: F401


def remove_target(path: str) -> None:
    from qimg.filenames import create_path

    try:
        os.unlink(create_path(path))
    except (OSError, QimgError):
        pass


def open_target(target: str, o: ConvertOptions) -> Driver:
    from qimg.api import open_image
    from qimg.filenames import image_opts_name, name_lock_error

    if o.target_image_opts and o.target_format is not None:
        raise BadOptionError("--image-opts and --format are mutually exclusive")
    opened = image_opts_name(target) if o.target_image_opts else _with_key_secrets(target, o)
    try:
        need_name(target)
        image = open_image(opened, o.target_format, writable=True, cache=o.cache, secrets=o.secrets)
    except ImageLockedError as exc:
        name_lock_error(exc, opened, target)  # qemu-img's words: "Could not open 'T': ..."
        raise
    except QimgError as exc:
        # qemu-img names the target before what the opener said, which for
        # a file that cannot be opened names it once more.
        exc.args = (f"Could not open '{target}': {exc}",)
        raise
    if o.target_image_opts and image.format_name == "raw" and _probed(target):
        from qimg.api import probed_raw_text

        sys.stderr.write(probed_raw_text(image.filename))
    return image


def _with_key_secrets(target: str, o: ConvertOptions) -> str:
    """The name a new target is opened by: with the create options that
    name key secrets (qemu-img's img_add_key_secrets), a json: name
    carrying them as node options."""
    keys = {k: v for k, v in o.create_options.items() if k.endswith("key-secret")}
    if o.skip_create or not keys:
        return target
    import json

    from qimg.filenames import create_path

    node = {"driver": o.target_format, "file": {"filename": create_path(target)}, **keys}
    return "json:" + json.dumps(node)


def _probed(options: str) -> bool:
    """Whether an --image-opts string leaves the format to be probed."""
    from qimg.options import split_options

    return all(key != "driver" for key, _ in split_options(options))


def open_backing(tgt: Driver, sources: Sources, secrets=None) -> tuple[Driver, bool]:
    """-B: the target's backing file, opened to compare the source with
    (only what differs is written), and whether the single source's own
    backing file is that file (then what the source leaves to it is
    skipped without being read)."""
    from qimg.api import open_image

    b = tgt.backing
    backing = open_image(b.filename, b.format_name, force_share=True, secrets=secrets)
    if len(sources.images) != 1 or sources.views:
        return backing, False
    tb = sources.images[0].backing
    same = tb is not None and os.path.realpath(tb.filename) == os.path.realpath(b.filename)
    return backing, same and tb.size == b.size


def check_bitmaps(sources: Sources, tgt: Driver, o: ConvertOptions) -> list:
    """qemu-img's convert_check_bitmaps and the target's support: the source's
    persistent bitmaps (bitmap.Bitmap), loaded before anything is copied."""
    from qimg.formats.qcow2.bitmap import bitmaps_to_copy, supports_bitmaps

    bitmaps = bitmaps_to_copy(sources.images, o.skip_broken_bitmaps)
    if not supports_bitmaps(tgt):
        raise BadOptionError(f"Format driver '{tgt.format_name}' does not support bitmaps")
    return bitmaps
