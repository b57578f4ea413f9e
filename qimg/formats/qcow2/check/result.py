"""What a check finds: BdrvCheckResult, the repair modes, and the failure."""

from __future__ import annotations

from dataclasses import dataclass, field

from qimg.errors import QimgError

# BdrvCheckMode
FIX_LEAKS = 1
FIX_ERRORS = 2
FIX_ALL = FIX_LEAKS | FIX_ERRORS


class CheckFailed(QimgError):
    """Raised when: the check could not complete (qemu-img's "Check failed").

    `result` holds what was found up to that point; its messages are still
    shown to the user.
    """

    def __init__(self, message: str, result: CheckResult | None = None):
        super().__init__(message)
        self.result = result


@dataclass
class CheckResult:
    """BdrvCheckResult plus qemu-img's ImageCheck fields."""

    filename: str = ""
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    # Lines qemu-img prints on stderr while checking, in order.
    messages: list[str] = field(default_factory=list)
    # Set when a repair ran: the counts of that first pass (the rest of the
    # result is the state found by the check that followed).
    repaired: bool = False

    def to_json(self) -> dict:
        """qemu-img check --output=json: keys in its order, optional ones only when non-zero."""
        optional = {
            "image-end-offset": self.image_end_offset,
            "compressed-clusters": self.compressed_clusters,
            "total-clusters": self.total_clusters,
            "corruptions": self.corruptions,
            "corruptions-fixed": self.corruptions_fixed,
            "check-errors": None,
            "leaks": self.leaks,
            "leaks-fixed": self.leaks_fixed,
            "allocated-clusters": self.allocated_clusters,
            "filename": None,
            "format": None,
            "fragmented-clusters": self.fragmented_clusters,
        }
        out: dict = {}
        for key, value in optional.items():
            if key == "check-errors":
                out[key] = self.check_errors
            elif key == "filename":
                out[key] = self.filename
            elif key == "format":
                out[key] = self.format
            elif value:
                out[key] = value
        return out

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit status for this result."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def counts(self) -> tuple[int, int, int, int, int]:
        """The counters a repair pass saves and restores."""
        return (
            self.check_errors,
            self.corruptions,
            self.leaks,
            self.corruptions_fixed,
            self.leaks_fixed,
        )

    def set_counts(self, saved: tuple[int, int, int, int, int]) -> None:
        (
            self.check_errors,
            self.corruptions,
            self.leaks,
            self.corruptions_fixed,
            self.leaks_fixed,
        ) = saved
