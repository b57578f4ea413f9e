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
MAX_SIZE = (1 << 63) - 1
_U64 = 1 << 64

# strtoull's syntax: leading white space, a sign, digits (a 0x prefix in base 16).
_DEC_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")
_HEX_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)(?:0[xX](?=[0-9a-fA-F]))?([0-9a-fA-F]+)")
# strtod on the fraction: '.', digits, an optional exponent.
_FRACTION_RE = re.compile(r"\.([0-9]+)([eE][+-]?[0-9]+)?")


def _strtou64(pattern: re.Pattern, text: str, base: int) -> tuple[int, int]:
    """QEMU's qemu_strtou64: (value, end index); ValueError without digits,
    OverflowError past 2^64 - 1. A '-' negates modulo 2^64, as strtoull."""
    m = pattern.match(text)
    if not m:
        raise ValueError(text)
    value = int(m.group(2), base)
    if value >= _U64:
        raise OverflowError(text)
    if m.group(1) == "-":
        value = -value % _U64
    return value, m.end()


def strtosz(text: str) -> int:
    """QEMU 7.2's qemu_strtosz: '10G', '512', '1.5M', '1024.0', '0x10'.

    A value in [0, 2^64). Raises ValueError where QEMU says EINVAL and
    OverflowError where it says ERANGE. A fraction is kept as 64.64 fixed
    point and rounded half up; it needs a suffix unless it is (nearly) zero.
    """
    val, end = _strtou64(_DEC_RE, text, 10)
    if "-" in text[:end]:
        raise ValueError(text)
    valf = 0
    hexadecimal = False
    rest = text[end:]
    if val == 0 and rest[:1] in ("x", "X"):
        val, end = _strtou64(_HEX_RE, text, 16)
        hexadecimal = True
        if text[end : end + 1] == ".":
            raise ValueError(text)
    elif rest[:1] == ".":
        m = _FRACTION_RE.match(rest)
        if not m:
            end += 1  # strtod took nothing: QEMU steps over the '.'
        elif m.group(2):
            raise ValueError(text)  # no exponents
        else:
            valf = int(float("0." + m.group(1)) * 2.0**64)
            valf = 0 if valf >= _U64 else valf  # a C cast of 2^64 gives 0 on x86-64
            end += m.end()
    mul = _SUFFIXES.get(text[end : end + 1].lower(), -1) if end < len(text) else -1
    if mul > 0:
        if hexadecimal:
            from qimg.errors import warn

            warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
        end += 1
    else:
        mul = 1
    if end != len(text):
        raise ValueError(text)
    if mul == 1:
        if valf:
            raise ValueError(text)
        return val
    frac = valf * mul
    value = val * mul + (frac >> 64) + ((frac >> 63) & 1)
    if value >= _U64:
        raise OverflowError(text)
    return value


def parse_size(text: str) -> int:
    """A size of at most 2^63 - 1 (qemu-img's cvtnum range). Raises
    ValueError (bad syntax) or OverflowError (out of range)."""
    value = strtosz(text)
    if value > MAX_SIZE:
        raise OverflowError(text)
    return value


def cvtnum(name: str, text: str, two_lines: bool = True) -> int:
    """qemu-img's cvtnum: a size argument named `name` in its messages.
    qemu-img reports bad syntax as two lines; `two_lines=False` joins them
    (convert's options keep each error on one line)."""
    try:
        return parse_size(text)
    except OverflowError:
        raise BadOptionError(
            f"Invalid {name} specified. Must be between 0 and {MAX_SIZE}."
        ) from None
    except ValueError:
        joint = "\nqimg: " if two_lines else " "
        raise BadOptionError(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for{joint}"
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None


def parse_image_size(text: str) -> int:
    """A SIZE argument of create/resize, with qemu-img's errors."""
    return cvtnum("image size", text)


_INT_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$")


def strtoi(text: str) -> int:
    """QEMU's qemu_strtoi in base 0 with the whole text used; ValueError
    otherwise (syntax, or outside a C int)."""
    m = _INT_RE.match(text)
    if not m:
        raise ValueError(text)
    value = int(m.group(0).strip(), 0) if "x" in text.lower() else _c_int(m.group(0).strip())
    if not -(1 << 31) <= value < (1 << 31):
        raise ValueError(text)
    return value


def _c_int(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    if len(digits) > 1 and digits[0] == "0":
        return sign * int(digits, 8)
    return sign * int(digits, 10)


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


def check_option_list(text: str) -> None:
    """qemu-img's is_valid_option_list, checked as each -o is read: not
    empty, not starting with ',', not ending with an unpaired ','."""
    trailing = len(text) - len(text.rstrip(","))
    if not text or text[0] == "," or trailing % 2:
        raise BadOptionError(f"Invalid option list: {text}")


def has_help_option(texts: list[str] | tuple[str, ...]) -> bool:
    """QEMU's has_help_option: 'help' or '?' named without a value."""
    return any(
        key in ("help", "?") and value is None
        for text in texts
        for key, value in split_options(text)
    )


def parse_options(texts: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Merge several -o arguments; later values win, as in qemu-img.
    A name without a value means "on"."""
    result: dict[str, str] = {}
    for text in texts:
        check_option_list(text)
        for key, value in split_options(text):
            result[key] = "on" if value is None else value
    return result


def parse_bool(name: str, value: str) -> bool:
    """QEMU's qapi_bool_parse, with QemuOpts' message."""
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise BadOptionError(f"Parameter '{name}' expects 'on' or 'off'")


_NUMBER_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$")


def parse_number(name: str, value: str) -> int:
    """A QEMU_OPT_NUMBER value (qemu_strtou64, base 0: a '-' wraps modulo
    2^64, as strtoull), with QemuOpts' messages."""
    m = _NUMBER_RE.match(value)
    if not m:
        raise BadOptionError(f"Parameter '{name}' expects a number")
    sign, text = m.groups()
    octal = len(text) > 1 and text[0] == "0" and text[1] not in "xX"
    number = int(text, 8) if octal else int(text, 0)
    if number >= _U64:
        raise BadOptionError(f"Value '{value}' is too large for parameter '{name}'")
    return -number % _U64 if sign == "-" else number
