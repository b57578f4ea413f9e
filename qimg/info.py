"""ImageInfo as qemu-img reports it (qapi/block-core.json: ImageInfo)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from qimg.driver import Driver
from qimg.opening import resolve_backing_path


def image_info(img: Driver) -> dict:
    """The keys and values of `qemu-img info --output=json` for one image,
    in bdrv_query_image_info's order."""
    d = img.info()
    info: dict = {}
    # bdrv_query_image_info: the format only beside a backing file name.
    if d.backing_format and d.backing_file:
        info["backing-filename-format"] = d.backing_format
    if d.snapshots:
        info["snapshots"] = d.snapshots
    info["virtual-size"] = d.virtual_size
    info["filename"] = img.filename
    if d.cluster_size is not None:
        info["cluster-size"] = d.cluster_size
    info["format"] = img.format_name
    info["actual-size"] = d.actual_size
    if d.format_specific is not None:
        info["format-specific"] = d.format_specific
    if d.backing_file:
        info["full-backing-filename"] = resolve_backing_path(img.filename, d.backing_file)
    if d.encrypted:
        info["encrypted"] = True
    if d.backing_file:
        info["backing-filename"] = d.backing_file
    info["dirty-flag"] = d.dirty
    return info


def describe(
    filename: str,
    fmt: str | None,
    *,
    force_share: bool = False,
    backing_chain: bool = False,
    image_opts: bool = False,
    secrets: Mapping[str, bytes] | None = None,
) -> list[dict]:
    """`qemu-img info [--backing-chain]`: each image of the chain opened on its
    own (metadata only, no backing), as collect_image_info_list does, so
    errors name the image that failed and a loop ends with an error.
    With `image_opts`, `filename` is an --image-opts option string;
    `secrets` are those image options may name."""
    from qimg.errors import BackingChainError, ImageLockedError, QimgError
    from qimg.filenames import image_opts_name
    from qimg.opening import open_image

    infos: list[dict] = []
    seen: set[str] = set()
    seen_real: set[str] = set()
    name: str | None = filename
    while name is not None:
        opened = image_opts_name(name) if image_opts and name is filename else name
        real = _real_path(opened)
        if name in seen or real in seen_real:
            raise BackingChainError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        seen_real.add(real)
        try:
            img = open_image(
                opened,
                fmt,
                force_share=force_share,
                backing=False,
                data_file=False,
                secrets=secrets,
            )
        except QimgError as exc:
            # qemu-img doubles the prefix of a failed file open, but a lock
            # conflict comes from the permission update and carries one.
            if not isinstance(exc, ImageLockedError):
                exc.args = (f"Could not open '{name}': {exc}",)
            raise
        with img:
            info = image_info(img)
        infos.append(info)
        if not backing_chain:
            break
        backing = info.get("backing-filename")
        name = resolve_backing_path(opened, backing) if backing else None
        # collect_image_info_list: the backing file's format is the one its
        # parent names, else probed (not the format given for the top).
        fmt = info.get("backing-filename-format")
    return infos


def _real_path(name: str) -> str:
    """The real path of the file an image name opens (a json: or file:
    name resolved); the name itself if it cannot be parsed (opening it
    then fails with the parser's message)."""
    from qimg.errors import QimgError
    from qimg.filenames import parse_filename

    try:
        return os.path.realpath(parse_filename(name).path)
    except QimgError:
        return name
