"""Image names as QEMU reads them: a path, `file:PATH`, or `json:{...}`.

QEMU's bdrv_open takes a filename that may name a protocol (`file:x`,
`nbd:...`) or be a `json:` pseudo-filename holding the options of the node
(block.c: parse_json_protocol, bdrv_fill_options). qimg speaks to files
only, so it understands the `file` protocol and, in `json:`, the options of
a qcow2 or raw node over a file:

    driver              "qcow2" or "raw" (else the format is probed)
    file.driver         "file"
    file.filename       the host file (required)
    file.locking, file.aio, ...      not supported: refused in QEMU's words
    backing             null only: the backing file is not opened

Any other key is refused as QEMU refuses an option a driver does not have.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

from qimg.errors import BadOptionError, ImageIOError

__all__ = [
    "ImageName",
    "create_path",
    "full_backing_filename",
    "has_protocol",
    "parse_filename",
]

_FORMATS = ("qcow2", "raw", "qcow")


class ImageName(NamedTuple):
    """What an image name says: the host file, the format driver it names
    (None: probe), and whether the backing file is to be opened."""

    path: str
    fmt: str | None = None
    open_backing: bool = True


def has_protocol(name: str) -> bool:
    """QEMU's path_has_protocol: a colon before any slash."""
    colon = name.find(":")
    slash = name.find("/")
    return colon > 0 and (slash < 0 or colon < slash)


def parse_filename(name: str) -> ImageName:
    """The ImageName a filename given to qemu-img means; raises a QimgError
    with qemu-img's words for names it would refuse."""
    if name.startswith("json:"):
        return _parse_json(name[len("json:") :])
    if has_protocol(name):
        protocol = name[: name.index(":")]
        if protocol != "file":
            raise ImageIOError(f"Unknown protocol '{protocol}'")
        return ImageName(name[len("file:") :])
    return ImageName(name)


def create_path(name: str) -> str:
    """The file `qemu-img create` (and convert's target creation) makes for
    `name`: a `file:` prefix is dropped; other protocols, `json:` included,
    are refused (bdrv_find_protocol)."""
    if has_protocol(name):
        protocol = name[: name.index(":")]
        if protocol != "file":
            raise ImageIOError(f"Unknown protocol '{protocol}'")
        return name[len("file:") :]
    return name


def full_backing_filename(image_path: str, backing: str) -> str:
    """QEMU's bdrv_get_full_backing_filename: a plain relative name is
    relative to the directory of the image that names it; absolute names,
    `json:` names and names with a protocol prefix are taken as they are."""
    if os.path.isabs(backing) or backing.startswith("json:") or has_protocol(backing):
        return backing
    return os.path.join(os.path.dirname(image_path), backing)


def _parse_json(text: str) -> ImageName:
    try:
        options = json.loads(text)
    except (ValueError, RecursionError):
        raise BadOptionError("Could not parse the JSON options: JSON parse error") from None
    if not isinstance(options, dict):
        raise BadOptionError("Invalid JSON object given")
    flat = _flatten(options)
    driver = flat.pop("driver", None)
    fmt = driver if driver in _FORMATS else None
    if isinstance(driver, str) and driver not in _FORMATS:
        raise BadOptionError(f"Unknown driver '{driver}'")
    open_backing = True
    if "backing" in flat:
        if flat.pop("backing") is not None:
            raise BadOptionError(
                f"Block format '{fmt or 'qcow2'}' does not support the option 'backing'"
            )
        open_backing = False
    if "file" in flat and not isinstance(flat["file"], dict):
        ref = flat.pop("file")
        raise BadOptionError(f"Cannot find device='{ref}' nor node-name='{ref}'")
    file_driver = flat.pop("file.driver", "file")
    if file_driver != "file":
        raise BadOptionError(f"Unknown protocol driver '{file_driver}'")
    path = flat.pop("file.filename", None)
    if "filename" in flat:
        if driver is None:
            raise BadOptionError("Must specify either driver or file")
        raise BadOptionError('A block device must be specified for "file"')
    for key in flat:
        if key.startswith("file."):
            raise BadOptionError(
                f"Block protocol 'file' doesn't support the option '{key[len('file.') :]}'"
            )
        raise BadOptionError(f"Block format '{fmt or 'qcow2'}' does not support the option '{key}'")
    if path is None:
        if driver is None:
            raise BadOptionError("Must specify either driver or file")
        raise BadOptionError('A block device must be specified for "file"')
    if not isinstance(path, str):
        raise BadOptionError("Parameter 'filename' expects a string")
    return ImageName(path, fmt, open_backing)


def _flatten(options: dict, prefix: str = "") -> dict:
    """QEMU's qdict_flatten: {"file": {"filename": x}} -> {"file.filename": x}.
    Iterative: a hostile name may nest deeply."""
    flat: dict = {}
    stack = [(prefix, options)]
    while stack:
        base, node = stack.pop()
        for key, value in node.items():
            if isinstance(value, dict) and value:
                stack.append((f"{base}{key}.", value))
            else:
                flat[f"{base}{key}"] = value
    return flat


def image_opts_name(text: str) -> str:
    """An --image-opts option string ("driver=qcow2,file.filename=x") as
    the json: name that says the same (read back by parse_filename, which
    checks its keys); a word without '=' is the implied key "file"."""
    from qimg.options import split_options

    options = {}
    for key, value in split_options(text):
        if value is None:
            key, value = "file", key
        options[key] = value
    return "json:" + json.dumps(options)
