"""The raw driver: guest offset == file offset."""

from __future__ import annotations

from qimg.driver import DATA, ZERO, Driver, DriverInfo, Extent
from qimg.storage import Storage


class RawImage(Driver):
    format_name = "raw"

    def __init__(self, storage: Storage):
        self.storage = storage
        self.filename = storage.path
        self.writable = storage.writable
        self.size = storage.size()

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        self.storage.pread_padded(offset, view)

    def write(self, offset: int, data) -> None:
        self._check_writable()
        self._check_range(offset, len(memoryview(data)))
        self.storage.pwrite(offset, data)

    def write_shared(self, offset: int, data, source: Storage, source_offset: int) -> bool | None:
        self._check_writable()
        self._check_range(offset, len(memoryview(data)))
        shared = self.storage.share_from(source, source_offset, offset, data)
        if not shared:
            self.storage.pwrite(offset, data)
        return shared

    def write_shared_runs(self, runs: list[tuple[int, object, Storage, int]]) -> bool | None:
        """Driver.write_shared_runs, each span of runs that continue each
        other in the file and in one source shared with one clone."""
        result = None
        i = 0
        while i < len(runs):
            offset, _data, source, source_offset = runs[i]
            j, length = _continuing(runs, i)
            merged = None
            if j - i > 1:
                self._check_writable()
                self._check_range(offset, length)
                merged = self.storage.clone_from(source, source_offset, offset, length)
            if merged is False:  # refused, nothing written
                unwritten = i
                break
            if not merged:  # one run, or not whole blocks: run by run
                merged = super().write_shared_runs(runs[i:j])
                if merged is False:  # runs[i:j] written all the same
                    unwritten = j
                    break
            result = result or merged
            i = j
        else:
            return result
        for offset, data, _s, _h in runs[unwritten:]:
            self.write(offset, data)
        return False

    def copies_from(self, source: Storage) -> bool:
        return self.storage.can_copy_from(source)

    def copy_runs(self, runs: list[tuple[int, int, Storage, int]], scratch: memoryview) -> None:
        """Driver.copy_runs: host to host (guest offsets are the file's)."""
        self._check_writable()
        for offset, length, source, source_offset in runs:
            self._check_range(offset, length)
            self.storage.copy_from(source, source_offset, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if unmap:
            self.storage.punch_hole(offset, length)
            return
        chunk = bytes(min(length, 1 << 22))
        while length:
            n = min(length, len(chunk))
            self.storage.pwrite(offset, chunk[:n])
            offset += n
            length -= n

    def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        self.storage.punch_hole(offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_range(offset, length)
        return [
            Extent(DATA if is_data else ZERO, start, n, start if is_data else 0)
            for start, n, is_data in self.storage.data_extents(offset, length)
        ]

    def allocated_extents(self, offset: int, length: int) -> list[tuple[int, int, bool, bool]]:
        return [
            (start, n, is_data, not is_data)
            for start, n, is_data in self.storage.data_extents(offset, length)
        ]

    def host_extents(self, offset: int, length: int) -> list[tuple[int, int, Storage, int]]:
        """The data runs of the file (its holes are not listed)."""
        self._check_range(offset, length)
        return [
            (start, n, self.storage, start)
            for start, n, is_data in self.storage.data_extents(offset, length)
            if is_data
        ]

    def truncate(self, size: int) -> None:
        self._check_writable()
        self.storage.truncate(size)
        self.size = size

    def info(self) -> DriverInfo:
        # QEMU counts a raw file's length in whole sectors (refresh_total_sectors
        # rounds up): a 1000-byte file is 1024 bytes to qemu-img, as convert
        # copies it.
        return DriverInfo(
            virtual_size=-(-self.size // 512) * 512,
            actual_size=self.storage.allocated_size(),
        )

    def flush(self) -> None:
        if self.writable:
            self.storage.flush()

    def start_writeback(self) -> None:
        self.storage.start_writeback()

    def stream_writes(self) -> None:
        self.storage.stream_writes()

    def close(self) -> None:
        self.storage.close()


def _continuing(runs: list[tuple], i: int) -> tuple[int, int]:
    """(j, length): runs[i:j] of (offset, data, source, source_offset)
    continue each other in the file and in one source, `length` bytes."""
    offset, data, source, source_offset = runs[i]
    length = memoryview(data).nbytes
    j = i + 1
    while j < len(runs):
        o, d, s, h = runs[j]
        if o != offset + length or s is not source or h != source_offset + length:
            break
        length += memoryview(d).nbytes
        j += 1
    return j, length
