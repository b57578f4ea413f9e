"""What every part of one check pass shares: the image, the result, the
repair mode, the file's size, the stored refcounts and the messages."""

from __future__ import annotations

import numpy as np

from qimg.formats.qcow2.check.messages import Messages
from qimg.formats.qcow2.check.result import CheckFailed, CheckResult
from qimg.formats.qcow2.refcount import StoredRefcounts
from qimg.storage import sector_length


class CheckContext:
    def __init__(self, image, res: CheckResult, fix: int):
        self.image = image
        self.res = res
        self.fix = fix
        self.geo = image.geo
        self.cs = self.geo.cluster_size
        self.cb = self.geo.cluster_bits
        self.has_data_file = image.header.has_data_file
        self.v3 = image.header.version >= 3
        self.messages = Messages(res)
        self.stored = StoredRefcounts(image.storage, self.geo, image.refcounts.table)
        # Set where the refcount structure must be rebuilt to be repaired.
        self.rebuild = False
        self.measure_file()

    def measure_file(self) -> None:
        """The file's length (whole sectors) and clusters: repairs may grow it."""
        self.file_len = sector_length(self.image.storage)
        self.nb_clusters = -(-self.file_len // self.cs)

    def say(self, line: str) -> None:
        self.messages.say(line)

    def fail(self, line: str) -> None:
        """A check error that ends the check (qemu-img's "Check failed")."""
        self.say(line)
        self.res.check_errors += 1
        raise CheckFailed("Check failed: Input/output error")

    def forget_stored(self) -> None:
        """The refcounts on disk changed: read them again when next asked."""
        self.stored.invalidate(self.image.refcounts.table)

    def read_l1(self, offset: int, size: int) -> np.ndarray:
        raw = self.image.storage.pread(offset, size * 8) if size else b""
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    def l2_write_overlaps(self, offset: int) -> bool:
        """Would writing an L2 table at `offset` land on other metadata?
        (The image's overlap map; no side effects.)"""
        return self.image.overlap_map.may_overlap(offset, self.cs, "l2")
