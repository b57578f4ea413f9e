"""Parsing of what users type: sizes with suffixes and `-o key=value,...` lists."""

from __future__ import annotations

import re

from qimg.errors import BadOptionError

_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}
_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?)\s*([bkmgtpeBKMGTPE]?)\s*$")
MAX_SIZE = (1 << 63) - 1

SIZE_ERROR = (
    "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
    "qimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
)


def parse_size(text: str, default_suffix: str = "") -> int:
    """QEMU's qemu_strtosz: '10G', '512', '1.5M'. Raises ValueError."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(text)
    number, suffix = m.groups()
    mult = _SUFFIXES[(suffix or default_suffix).lower()]
    if number[:2] in ("0x", "0X"):
        value = int(number, 16) * mult  # 7.2 still takes (deprecated) suffixes here
    elif "." in number:
        if mult == 1:
            raise ValueError(text)
        value = int(float(number) * mult)
    else:
        value = int(number) * mult
    if value > MAX_SIZE:
        raise OverflowError(text)
    return value


def parse_image_size(text: str) -> int:
    """A SIZE argument of create/resize, with qemu-img's errors."""
    if text.strip().startswith("-"):
        raise BadOptionError(SIZE_ERROR)
    try:
        return parse_size(text)
    except OverflowError:
        raise BadOptionError(
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        ) from None
    except ValueError:
        raise BadOptionError(SIZE_ERROR) from None


def split_options(text: str) -> list[tuple[str, str | None]]:
    """Split 'a=1,b=x,,y,help' into pairs; ',,' is a literal comma."""
    out: list[tuple[str, str | None]] = []
    items: list[str] = []
    cur = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    for item in items:
        if not item:
            continue
        if "=" in item:
            key, value = item.split("=", 1)
            out.append((key, value))
        else:
            out.append((item, None))
    return out


def parse_options(texts: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Merge several -o arguments; later values win, as in qemu-img."""
    result: dict[str, str] = {}
    for text in texts:
        for key, value in split_options(text):
            result[key] = "on" if value is None and key != "help" else (value or "")
    return result


def parse_bool(name: str, value: str) -> bool:
    """QEMU's qapi_bool_parse, with QemuOpts' message."""
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise BadOptionError(f"Parameter '{name}' expects 'on' or 'off'")


_NUMBER_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$")


def parse_number(name: str, value: str) -> int:
    """A QEMU_OPT_NUMBER value (strtoull, base 0), with QemuOpts' message."""
    m = _NUMBER_RE.match(value)
    if not m:
        raise BadOptionError(f"Parameter '{name}' expects a number")
    text = m.group(1)
    octal = len(text) > 1 and text[0] == "0" and text[1] not in "xX"
    number = int(text, 8) if octal else int(text, 0)
    if number >= 1 << 64:
        raise BadOptionError(f"Parameter '{name}' expects a number")
    return number
