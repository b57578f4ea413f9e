"""qemu-img map: the extents of an image through its backing chain.

Block status answers (qimg.blockstatus) are merged as qemu-img's img_map
merges them (entry_mergeable): neighbours with the same data, zero,
depth, presence and host file, whose host offsets (where they have one)
follow each other. Rendered as qemu-img's JSON lines or its human table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from qimg.blockstatus import (
    BLOCK_ALLOCATED,
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    BlockStatus,
    sector_length,
)
from qimg.driver import Driver
from qimg.errors import QimgError


@dataclass
class MapEntry:
    """qemu-img's MapEntry. `offset` is None where QEMU has no host offset
    (compressed or encrypted data, unallocated clusters); `filename` names
    the file `offset` is in."""

    start: int
    length: int
    depth: int = 0
    present: bool = False
    zero: bool = False
    data: bool = False
    offset: int | None = None
    filename: str | None = None
    # The last entry of its map (iter_map sets it): qemu-img writes every
    # other one followed by a comma as soon as the next one begins.
    last: bool = field(default=False, compare=False, repr=False)

    def mergeable(self, nxt: MapEntry) -> bool:
        """qemu-img's entry_mergeable (the host file follows the offset)."""
        if not self.length:
            return False
        if (self.zero, self.data, self.depth, self.present) != (
            nxt.zero,
            nxt.data,
            nxt.depth,
            nxt.present,
        ):
            return False
        if (self.offset is None) != (nxt.offset is None) or self.filename != nxt.filename:
            return False
        return self.offset is None or self.offset + self.length == nxt.offset

    def to_json(self) -> str:
        """One line as qemu-img prints it (not QAPI's JSON writer)."""
        text = (
            f'{{ "start": {self.start}, "length": {self.length}, "depth": {self.depth},'
            f' "present": {_bool(self.present)}, "zero": {_bool(self.zero)},'
            f' "data": {_bool(self.data)}'
        )
        if self.offset is not None:
            text += f', "offset": {self.offset}'
        return text + "}"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def map_range(image: Driver, start: int = 0, max_length: int | None = None) -> tuple[int, int]:
    """The guest range img_map walks: [start, end) with end the image's
    length, or start + max_length if that is less."""
    end = sector_length(image)
    if max_length is not None:
        end = min(start + max_length, end)
    return start, end


def iter_map(image: Driver, start: int = 0, max_length: int | None = None) -> Iterator[MapEntry]:
    """The merged entries of guest [start, start + max_length) clipped to
    the image, as `qemu-img map --output=json` lists them, each yielded as
    soon as the next one does not merge with it (so a failed query leaves
    the entries before it out, as qemu-img has printed them). A start at or
    past the end gives one empty entry there, as qemu-img prints it."""
    start, end = map_range(image, start, max_length)
    status = BlockStatus(image)
    curr = MapEntry(start, 0)
    pos = start
    while pos < end:
        try:
            st = status.query(pos, end - pos)
        except QimgError:
            # qemu-img prints strerror of the query's errno: EIO for a
            # corrupt entry or a failed read.
            raise QimgError("Could not read file metadata: Input/output error") from None
        offset = st.host if st.flags & BLOCK_OFFSET_VALID else None
        nxt = MapEntry(
            pos,
            st.pnum,
            st.depth,
            bool(st.flags & BLOCK_ALLOCATED),
            bool(st.flags & BLOCK_ZERO),
            bool(st.flags & BLOCK_DATA),
            offset,
            st.file if offset is not None else None,
        )
        pos += st.pnum
        if curr.mergeable(nxt):
            curr.length += nxt.length
            continue
        if curr.length:
            yield curr
        curr = nxt
    curr.last = True
    yield curr


def image_map(image: Driver, start: int = 0, max_length: int | None = None) -> list[MapEntry]:
    """iter_map's entries as a list."""
    return list(iter_map(image, start, max_length))


def write_json(entries: Iterable[MapEntry], write: Callable[[str], object]) -> None:
    """qemu-img's JSON output: "[", the entries one a line, "]"."""
    write("[")
    for e in entries:
        write(e.to_json() + ("]\n" if e.last else ",\n"))


HUMAN_HEADER = f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"

HUMAN_REFUSAL = "File contains external, encrypted or compressed clusters."


def write_human(entries: Iterable[MapEntry], write: Callable[[str], object]) -> None:
    """qemu-img's human table: data that is not zero, with its host offset
    and file. It stops at data without a host offset (compressed or
    encrypted clusters), refused in qemu-img's words."""
    write(HUMAN_HEADER)
    for i, e in enumerate(entries):
        # img_map's human dump turns each entry after the first into zeros
        # unless it is data, so only the first can fail as zero data.
        if e.data and e.offset is None and (not e.zero or i == 0):
            raise QimgError(HUMAN_REFUSAL)
        if e.data and not e.zero:
            write(
                f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}{e.filename or ''}\n"
            )


def _hex(value: int | None) -> str:
    """C's %#x: 0 has no 0x."""
    return f"{value:#x}" if value else "0"
