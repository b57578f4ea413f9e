"""qemu-img dd: copy part of an image into a new one, as qemu-img 7.2 does.

Its rules, kept here as qemu-img keeps them:
- operands are `bs=`, `count=`, `skip=`, `if=`, `of=` (the last one given
  wins); `count` and `skip` are in blocks of `bs` (default 512);
- the input's length is counted in whole sectors (rounded up);
- `count` counts from the start of the input, skipped blocks included:
  the copy ends at count * bs (when that is inside the input) and starts
  at skip * bs, so `count=4 skip=1` copies three blocks;
- a start past that end gives an empty output and the notice "cannot skip
  to specified offset", and still succeeds;
- the output is created (an existing file is overwritten) with the size
  left, rounded up to a sector, and every byte copied is written, zeros
  included (a qcow2 output has each of those clusters allocated).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qimg.driver import Driver
from qimg.errors import BadOptionError, QimgError

INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
SECTOR = 512
COPY_CHUNK = 4 << 20  # bytes per read and write (the result does not depend on it)
OPERANDS = ("bs", "count", "if", "of", "skip")


@dataclass
class DdOperands:
    """What the operands say (None: not given)."""

    bs: int = 512
    count: int | None = None
    skip: int | None = None
    input: str | None = None
    output: str | None = None


def parse_operands(words: list[str] | tuple[str, ...]) -> DdOperands:
    """`key=value` operands in order, failing at the first bad one in
    qemu-img's words."""
    ops = DdOperands()
    for word in words:
        name, eq, value = word.partition("=")
        if not eq or name not in OPERANDS:
            raise BadOptionError(f"unrecognized operand {name}")
        if name == "bs":
            ops.bs = _number("bs", value, 1, INT_MAX)
        elif name == "count":
            ops.count = _number("count", value, 0, INT64_MAX)
        elif name == "skip":
            ops.skip = _number("skip", value, 0, INT64_MAX)
        elif name == "if":
            ops.input = value
        else:
            ops.output = value
    return ops


def _number(name: str, text: str, low: int, high: int) -> int:
    """qemu-img's cvtnum_full: a size with suffixes in [low, high]."""
    from qimg.options import strtosz

    try:
        value = strtosz(text)
    except OverflowError:
        value = None
    except ValueError:
        raise BadOptionError(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n"
            "qimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    if value is None or not low <= value <= high:
        raise BadOptionError(f"Invalid {name} specified. Must be between {low} and {high}.")
    return value


@dataclass
class DdPlan:
    """What one dd copies: input bytes [start, end) to output offset 0 of
    an output of `out_size` bytes; `past_end` when skip lies beyond the end."""

    start: int
    end: int
    out_size: int
    past_end: bool


def plan(ops: DdOperands, input_length: int) -> DdPlan:
    """qemu-img's arithmetic on an input of `input_length` bytes (whole
    sectors): count cuts the end first, then skip is taken from what is left."""
    bs = ops.bs
    end = input_length
    if ops.count is not None and ops.count <= INT64_MAX // bs and ops.count * bs < end:
        end = ops.count * bs
    skip = ops.skip or 0
    if ops.skip is not None and (skip > INT64_MAX // bs or end < skip * bs):
        return DdPlan(end, end, 0, True)
    return DdPlan(skip * bs, end, end - skip * bs, False)


def dd(
    ops: DdOperands,
    *,
    fmt: str | None = None,
    out_fmt: str = "raw",
    image_opts: bool = False,
    force_share: bool = False,
    secrets: Mapping[str, bytes] | None = None,
) -> DdPlan:
    """qemu-img dd: open the input (`image_opts`: its name is an option
    string), create the output as `out_fmt`, copy. `secrets` (the --object
    secrets by id) serve the input's options and backing chain. Returns the plan it
    carried out (`past_end`: qemu-img's "cannot skip to specified offset"
    case, an empty output). Raises QimgError in qemu-img's words; nothing
    is created when the operands, the input or the format are refused."""
    from qimg.api import FORMATS, open_named

    if ops.input is None or ops.output is None:
        raise BadOptionError("Must specify both input and output files")
    from qimg.compare import open_input

    src = open_input(ops.input, fmt, image_opts, force_share, secrets)
    try:
        if out_fmt not in FORMATS:
            raise BadOptionError("Unknown file format")
        todo = plan(ops, -(-src.size // SECTOR) * SECTOR)
        _create(ops.output, out_fmt, todo.out_size)
        out = open_named(ops.output, out_fmt, writable=True, backing=False)
        try:
            _copy(src, out, todo)
        finally:
            out.close()
    finally:
        src.close()
    return todo


def _create(path: str, fmt: str, size: int) -> None:
    from qimg.api import create_image

    try:
        create_image(path, fmt, size)
    except QimgError as exc:
        text = str(exc)
        if text.startswith(f"{path}: "):
            text = text[len(path) + 2 :]
        exc.args = (f"{path}: error while creating output image: {text}",)
        raise


def _copy(src: Driver, out: Driver, todo: DdPlan) -> None:
    """Input [start, end) to output [0, end - start), every byte written."""
    from qimg.chain import read_padded

    buf = bytearray(min(COPY_CHUNK, max(0, todo.end - todo.start)))
    view = memoryview(buf)
    pos = todo.start
    while pos < todo.end:
        n = min(len(buf), todo.end - pos)
        try:
            read_padded(src, pos, view[:n])
        except QimgError as exc:
            raise QimgError(f"error while reading from input image file: {exc}") from None
        try:
            out.write(pos - todo.start, view[:n])
        except QimgError as exc:
            raise QimgError(f"error while writing to output image file: {exc}") from None
        pos += n
