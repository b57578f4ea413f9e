"""Image names as QEMU reads them: a path, `file:PATH`, or `json:{...}`.

QEMU's bdrv_open takes a filename that may name a protocol (`file:x`,
`nbd:...`) or be a `json:` pseudo-filename holding the options of the node
(block.c: parse_json_protocol, bdrv_fill_options). qimg speaks to files
only, so it understands the `file` protocol and, in `json:`, the options of
a qcow2, luks or raw node over a file:

    driver              "qcow2", "luks" or "raw" (else the format is probed)
    file.driver         "file"
    file.filename       the host file (required)
    file.locking, file.aio, ...      not supported: refused in QEMU's words
    backing             null only: the backing file is not opened
    encrypt.key-secret, encrypt.format    qcow2 (and qcow): the node's
                        encryption options, kept in ImageName.options
                        (other encrypt.* keys too: an unencrypted image
                        ignores them, an encrypted one refuses them)
    key-secret          luks: the same
    backing.KEY         one of those for the backing file (backing.backing.KEY
                        for the one below it), used where the backing
                        file is opened

Any other key is refused as QEMU refuses an option a driver does not have.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

from qimg.errors import BadOptionError, ImageIOError

__all__ = [
    "ImageName",
    "check_node_options",
    "create_path",
    "full_backing_filename",
    "has_protocol",
    "node_filename",
    "parse_filename",
]

_FORMATS = ("qcow2", "raw", "qcow", "luks")

# The runtime options of each format node (beside driver, file, backing)
# that qimg takes: the encryption ones.
NODE_OPTIONS: dict[str, tuple[str, ...]] = {
    "qcow2": ("encrypt.key-secret", "encrypt.format"),
    "qcow": ("encrypt.key-secret", "encrypt.format"),
    "luks": ("key-secret",),
    "raw": (),
}
_ANY_NODE_OPTION = frozenset(k for keys in NODE_OPTIONS.values() for k in keys)
_BACKING = "backing."
_ENCRYPT = "encrypt."

# QEMU's "strong" runtime options: given, they make the node's filename the
# json: name that repeats them (bdrv_refresh_filename).
_STRONG = ("encrypt.key-secret", "key-secret")
# The order QEMU's QDict gives these keys in such a name (as qemu-img prints).
_QDICT_ORDER = ("encrypt.key-secret", "driver", "file", "key-secret")


class ImageName(NamedTuple):
    """What an image name says: the host file, the format driver it names
    (None: probe), whether the backing file is to be opened, and the
    node's options (NODE_OPTIONS' keys; `backing.KEY` ones for the
    backing file), values as given."""

    path: str
    fmt: str | None = None
    open_backing: bool = True
    options: Mapping[str, object] = MappingProxyType({})

    def own_options(self) -> dict[str, object]:
        """The options of this node (not of its backing file)."""
        return {k: v for k, v in self.options.items() if not k.startswith(_BACKING)}

    def backing_options(self) -> dict[str, object]:
        """The options given for the backing file, `backing.` dropped."""
        n = len(_BACKING)
        return {k[n:]: v for k, v in self.options.items() if k.startswith(_BACKING)}


def check_node_options(fmt: str, options: Mapping[str, object], backing_opened: bool) -> None:
    """Refuse, in QEMU's words, an option the format `fmt` does not have;
    `backing.` options are refused where the backing file is not opened
    (as qemu-img info refuses them)."""
    allowed = NODE_OPTIONS.get(fmt, ())
    for key in options:
        if key in allowed or (key.startswith(_BACKING) and backing_opened):
            continue
        if key.startswith(_ENCRYPT) and _ENCRYPT + "key-secret" in allowed:
            continue  # the encryption's own options: checked by opening
        raise BadOptionError(f"Block format '{fmt}' does not support the option '{key}'")


def node_filename(name: ImageName, fmt: str) -> str | None:
    """The json: filename QEMU gives a node opened with a strong option
    (a key-secret), None where it keeps the file's own name."""
    options = name.own_options()
    strong = {k: options[k] for k in _STRONG if k in options}
    if not strong:
        return None
    node = {
        "driver": fmt,
        "file": {"driver": "file", "filename": name.path},
        **strong,
    }
    import json

    return "json:" + json.dumps({k: node[k] for k in _QDICT_ORDER if k in node})


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
    import json

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
    options = {k: flat.pop(k) for k in list(flat) if _node_option(k)}
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
    if fmt is not None:
        # A probed format's options are checked once it is known (opening).
        check_node_options(
            fmt, {k: v for k, v in options.items() if not k.startswith(_BACKING)}, True
        )
    return ImageName(path, fmt, open_backing, MappingProxyType(options))


def _node_option(key: str) -> bool:
    """A key that names a node option of some format, this node's or
    (behind `backing.` prefixes) a backing file's."""
    while key.startswith(_BACKING):
        key = key[len(_BACKING) :]
    return key in _ANY_NODE_OPTION or key.startswith(_ENCRYPT)


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


def name_lock_error(exc: Exception, opened: str, shown: str) -> None:
    """A lock conflict names the host file ("Could not open 'PATH': ...");
    qemu-img names the image as it was given (`shown`: a json: name, a
    file: name or an --image-opts string, which opened the name `opened`)."""
    try:
        host = parse_filename(opened).path
    except BadOptionError:
        return
    old = f"Could not open '{host}': "
    text = str(exc)
    if host != shown and text.startswith(old):
        exc.args = (f"Could not open '{shown}': {text[len(old) :]}",)


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
    import json

    return "json:" + json.dumps(options)
