"""The interface every format driver offers (raw, qcow2).

Convert, compare, map and measure are written once against it. Offsets and
lengths are in bytes of the guest (virtual) disk.
"""

from __future__ import annotations


class Driver:
    """Base of the format drivers; usable as a context manager."""

    format_name = ""
    filename: str
    size: int
    writable: bool
    backing: Driver | None = None

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes [offset, offset+length)."""
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buf) -> None:
        raise NotImplementedError

    def write(self, offset: int, data) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def block_status(self, offset: int, length: int) -> list:
        """Extents (kind, offset, length, host) covering the range."""
        raise NotImplementedError

    def allocated_extents(self, offset: int, length: int) -> list[tuple[int, int, bool, bool]]:
        """(offset, length, is_data, is_zero) runs through the whole chain:
        `is_data` runs must be read, `is_zero` runs read as zeros."""
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
