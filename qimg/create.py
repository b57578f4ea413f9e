"""Image creation as qemu-img's bdrv_img_create does it.

The steps and their order decide which error a user sees, and whether the
"Formatting ..." line is printed before it:

1. `-o` options are checked against the format's option list (unknown names,
   sizes, numbers, booleans): errors here come before the line.
2. The size (given once), the backing file (opened unless `-u`, giving the
   size when none was given; a backing format is required).
3. The "Formatting ..." line (QEMU's qemu_opts_print over the option list).
4. The format driver's own validation (enumerations, cluster size,
   compatibility level...), then the files are written. A failure from here
   on removes what was created.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from qimg.errors import (
    BackingChainError,
    BadOptionError,
    ImageIOError,
    QimgError,
)
from qimg.options import parse_bool, parse_number, strtosz


class OptDesc(NamedTuple):
    """One entry of a QemuOptsList: name, type, default text, help."""

    name: str
    type: str  # "size", "num", "bool" or "str"
    default: str | None
    help: str


_SIZE = OptDesc("size", "size", None, "Virtual disk size")
_NOCOW = OptDesc("nocow", "bool", None, "Turn off copy-on-write (valid only on btrfs)")
_EXTENT_SIZE_HINT = OptDesc(
    "extent_size_hint", "size", None, "Extent size hint for the image file, 0 to disable"
)
_PREALLOC_FILE = OptDesc(
    "preallocation", "str", None, "Preallocation mode (allowed values: off, falloc, full)"
)

# block/file-posix.c's create options, in their order (size and preallocation
# are shadowed by the format's own).
PROTOCOL_OPTS = (_SIZE, _NOCOW, _PREALLOC_FILE, _EXTENT_SIZE_HINT)

# block/qcow2.c's encryption create options (QCOW_COMMON_OPTIONS' and
# BLOCK_CRYPTO_OPT_DEF_QCOW/LUKS_*'s, "encrypt." prefixed), first in the
# order qemu_opts_print walks the list.
QCOW2_ENCRYPT_OPTS = (
    OptDesc(
        "encryption",
        "bool",
        None,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    OptDesc("encrypt.format", "str", None, "Encrypt the image, format choices: 'aes', 'luks'"),
    OptDesc(
        "encrypt.key-secret",
        "str",
        None,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    OptDesc("encrypt.cipher-alg", "str", None, "Name of encryption cipher algorithm"),
    OptDesc("encrypt.cipher-mode", "str", None, "Name of encryption cipher mode"),
    OptDesc("encrypt.ivgen-alg", "str", None, "Name of IV generator algorithm"),
    OptDesc("encrypt.ivgen-hash-alg", "str", None, "Name of IV generator hash algorithm"),
    OptDesc("encrypt.hash-alg", "str", None, "Name of encryption hash algorithm"),
    OptDesc("encrypt.iter-time", "num", None, "Time to spend in PBKDF in milliseconds"),
)

# block/qcow2.c's create options in the order qemu_opts_print walks them.
QCOW2_OPTS = QCOW2_ENCRYPT_OPTS + (
    OptDesc("cluster_size", "size", "65536", "qcow2 cluster size"),
    OptDesc("extended_l2", "bool", "off", "Extended L2 tables"),
    OptDesc(
        "preallocation",
        "str",
        None,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    OptDesc(
        "compression_type",
        "str",
        "zlib",
        "Compression method used for image cluster compression",
    ),
    _SIZE,
    OptDesc("compat", "str", None, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc("backing_file", "str", None, "File name of a base image"),
    OptDesc("backing_fmt", "str", None, "Image format of the base image"),
    OptDesc("data_file", "str", None, "File name of an external data file"),
    OptDesc("data_file_raw", "bool", None, "The external data file must stay valid as a raw image"),
    OptDesc("lazy_refcounts", "bool", "off", "Postpone refcount updates"),
    OptDesc("refcount_bits", "num", "16", "Width of a reference count entry in bits"),
)

RAW_OPTS = (_SIZE,)

# block/qcow.c's create options (for -o help: qimg does not create qcow images).
QCOW_OPTS = (
    _SIZE,
    OptDesc("backing_file", "str", None, "File name of a base image"),
    OptDesc("backing_fmt", "str", None, "Format of the backing image"),
    OptDesc(
        "encryption",
        "bool",
        None,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    OptDesc("encrypt.format", "str", None, "Encrypt the image, format choices: 'aes'"),
    OptDesc(
        "encrypt.key-secret", "str", None, "ID of the secret that provides the AES encryption key"
    ),
)

# block/crypto.c's luks create options, in their print order.
LUKS_OPTS = (
    _SIZE,
    OptDesc("key-secret", "str", None, "ID of the secret that provides the keyslot passphrase"),
    OptDesc("cipher-alg", "str", None, "Name of encryption cipher algorithm"),
    OptDesc("cipher-mode", "str", None, "Name of encryption cipher mode"),
    OptDesc("ivgen-alg", "str", None, "Name of IV generator algorithm"),
    OptDesc("ivgen-hash-alg", "str", None, "Name of IV generator hash algorithm"),
    OptDesc("hash-alg", "str", None, "Name of encryption hash algorithm"),
    OptDesc("iter-time", "num", None, "Time to spend in PBKDF in milliseconds"),
)

FORMAT_OPTS = {"qcow2": QCOW2_OPTS, "raw": RAW_OPTS, "qcow": QCOW_OPTS, "luks": LUKS_OPTS}


def option_list(fmt: str, with_protocol: bool = True) -> tuple[OptDesc, ...]:
    """The format's options, then the protocol's not already named
    (QEMU's qemu_opts_append)."""
    opts = FORMAT_OPTS[fmt]
    if not with_protocol:
        return opts
    names = {o.name for o in opts}
    return opts + tuple(o for o in PROTOCOL_OPTS if o.name not in names)


def options_help(fmt: str, with_protocol: bool) -> str:
    """`qemu-img create -f FMT -o help [FILE]`: sorted by name."""
    lines = ["Supported options:" if with_protocol else f"Supported {fmt} options:"]
    lines += help_lines(option_list(fmt, with_protocol))
    if not with_protocol:
        lines += [
            "",
            "The protocol level may support further options.",
            "Specify the target filename to include those options.",
        ]
    return "\n".join(lines)


def help_lines(opts) -> list[str]:
    """qemu_opts_print_help's lines for `opts`, sorted by name."""
    typ = {"size": "size", "num": "num", "bool": "bool (on/off)", "str": "str"}
    return [
        f"  {o.name + '=<' + typ[o.type] + '>':<22} - {o.help}"
        for o in sorted(opts, key=lambda o: o.name)
    ]


def typed_value(desc: OptDesc, text: str):
    """QemuOpts' parse of one value; errors are qemu_opts_do_parse's."""
    if desc.type == "size":
        return parse_size_option(desc.name, text)
    if desc.type == "num":
        return parse_number(desc.name, text)
    if desc.type == "bool":
        return parse_bool(desc.name, text)
    return text


_typed = typed_value  # the name convert.py imports


def parse_size_option(name: str, text: str) -> int:
    """QemuOpts' parse_option_size: any value below 2^64."""
    try:
        return strtosz(text)
    except OverflowError:
        raise BadOptionError(f"Value '{text}' is out of range for parameter '{name}'") from None
    except ValueError:
        raise BadOptionError(
            f"Parameter '{name}' expects a non-negative number below 2^64\n"
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively."
        ) from None


def _escaped(text: str) -> str:
    return text.replace(",", ",,")


def formatting_line(
    path: str, fmt: str, given: dict[str, str], descs, typed: dict | None = None
) -> str:
    """qemu-img's "Formatting ..." line (qemu_opts_print): every option that
    was given or has a default, sizes and numbers as parsed numbers
    (`typed` holds those already parsed)."""
    parts = [f"Formatting '{path}', fmt={fmt}"]
    typed = typed or {}
    for d in descs:
        text = given.get(d.name, d.default)
        if text is None:
            continue
        if d.type in ("size", "num") and d.name in given:
            value = typed[d.name] if d.name in typed else typed_value(d, text)
            text = str(_as_int64(value))
        elif d.type == "str":
            text = _escaped(text)
        parts.append(f"{d.name}={text}")
    return " ".join(parts)


def _as_int64(value: int) -> int:
    """qemu_opts_print shows sizes as int64_t."""
    return value - (1 << 64) if value >= 1 << 63 else value


def full_backing_filename(path: str, backing: str) -> str:
    """QEMU's bdrv_get_full_backing_filename_from_filename (json: and
    file: names are taken as they are: qimg.filenames)."""
    from qimg.filenames import full_backing_filename as full

    if "/" not in path:
        return backing
    return full(path, backing)


def create(
    path: str,
    fmt: str,
    size: int | None,
    options: dict[str, str],
    *,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
    check_backing: bool = True,
    on_formatting: Callable[[str], None] | None = None,
    secrets: Mapping[str, bytes] | None = None,
) -> str:
    """Create an image as `qemu-img create` does; returns the "Formatting" line.

    `options` hold the -o values as typed. `on_formatting` receives the
    line at the point qemu-img prints it (before the format's own checks).
    `secrets` are the --object secrets the options (and an encrypted
    backing file's json: name) may name.
    """
    from qimg.filenames import create_path

    file_path = create_path(path)  # "file:" dropped; other protocols refused
    descs = option_list(fmt)
    by_name = {d.name: d for d in descs}
    given: dict[str, str] = {}
    typed: dict = {}  # parsed once: a parse may warn (hex with a suffix)
    for key, text in options.items():
        if key not in by_name:
            raise BadOptionError(f"Invalid parameter '{key}'")
        typed[key] = typed_value(by_name[key], text)
        given[key] = text
    if "size" in given:
        if size is not None:
            raise BadOptionError("The image size must be specified only once")
    elif size is not None:
        given["size"] = str(size)
        typed["size"] = size
    if backing_file is not None:
        if "backing_file" not in by_name:
            raise BadOptionError(f"Backing file not supported for file format '{fmt}'")
        given["backing_file"] = backing_file
    if backing_fmt is not None:
        if "backing_fmt" not in by_name:
            raise BadOptionError(f"Backing file format not supported for file format '{fmt}'")
        given["backing_fmt"] = backing_fmt
    if typed.get("size") == (1 << 64) - 1:
        del given["size"], typed["size"]  # bdrv_img_create's "no size yet" value
    _check_backing(path, given, check_backing, secrets)
    if "size" not in given:
        raise BadOptionError("Image creation needs a size parameter")

    line = formatting_line(path, fmt, given, descs, typed)
    if on_formatting is not None:
        on_formatting(line)
    values = {k: typed[k] if k in typed else typed_value(by_name[k], v) for k, v in given.items()}
    # The driver's create parses its size options again (QAPI field order).
    own = {d.name for d in FORMAT_OPTS[fmt]}
    for key in ("size", "cluster_size"):
        if key in options and key in own:
            typed_value(by_name[key], options[key])
    path = file_path  # the Formatting line keeps the name as typed
    if fmt == "luks":
        from qimg.formats.luks import create_luks

        create_luks(path, values, secrets or {})
        return line
    _check_truncate(fmt, values["size"])
    if fmt == "raw":
        _create_raw(path, values)
    else:
        from qimg.formats.qcow2.create import Qcow2CreateOptions, create_qcow2

        o = Qcow2CreateOptions.from_values(values)
        o.validate()
        create_qcow2(path, o, secrets or {})
    return line


# QEMU's BDRV_MAX_LENGTH: the largest offset a block request may reach.
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)


def _check_truncate(fmt: str, size: int) -> None:
    """The checks of the truncate that sets a new image's size (QEMU's
    bdrv_co_truncate), on the size rounded up to 512 bytes."""
    rounded = -(-size // 512) * 512
    if rounded > (1 << 63) - 1:
        if fmt == "raw":
            raise ImageIOError("Could not resize file: Invalid argument")
        raise BadOptionError("Could not resize image: Image size cannot be negative")
    if fmt != "raw" and rounded > BDRV_MAX_LENGTH:
        raise BadOptionError(
            f"Could not resize image: offset({rounded}) exceeds maximum({BDRV_MAX_LENGTH})"
        )


def _check_backing(
    path: str, given: dict[str, str], check_backing: bool, secrets: Mapping[str, bytes] | None
) -> None:
    """bdrv_img_create's backing file checks; sets the size from the
    backing file when none was given."""
    backing = given.get("backing_file")
    if backing is None:
        return
    if backing == path:
        raise BadOptionError(
            "Error: Trying to create an image with the same filename as the backing file"
        )
    if backing == "":
        raise BadOptionError("Expected backing file name, got empty string")
    backing_fmt = given.get("backing_fmt")
    if not check_backing:
        if not backing_fmt:
            raise BadOptionError("Backing file specified without backing format")
        return
    from qimg.opening import open_image

    full = full_backing_filename(path, backing)
    try:
        with open_image(full, backing_fmt, force_share=True, secrets=secrets) as b:
            if not backing_fmt:
                raise BackingChainError(
                    "Backing file specified without backing format\n"
                    f"Detected format of {b.format_name}."
                )
            given.setdefault("size", str(b.size))
    except BackingChainError:
        raise
    except QimgError as exc:
        raise BackingChainError(f"{exc}\nCould not open backing image.") from None


def _create_raw(path: str, values: dict) -> None:
    from qimg.storage import create_storage, delete_storage, storage_exists

    prealloc = values.get("preallocation", "off")
    if prealloc not in ("off", "falloc", "full"):
        raise BadOptionError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    size = -(-values["size"] // 512) * 512
    existed = storage_exists(path)
    storage = create_storage(path)
    try:
        if prealloc == "falloc":
            storage.fallocate(0, size)
        elif prealloc == "full":
            from qimg.formats.qcow2.create import write_zeros

            write_zeros(storage, 0, size)
        storage.truncate(size)
        if prealloc in ("off", "falloc") and size:
            # QEMU's allocate_first_block (after fallocate too): the first
            # block of a new raw file is written (zeros), so probing its
            # alignment stays cheap: 4 KiB, or a sector if the file is smaller.
            storage.pwrite(0, bytes(4096 if size >= 4096 else 512))
    except BaseException:
        storage.close()
        if not existed:  # (QEMU leaves the empty file behind)
            delete_storage(path)
        raise
    storage.close()
