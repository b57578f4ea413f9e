"""One exception tree for every failure a user can see.

The command layer (`qimg.cli`) turns any `QimgError` into one line on stderr
and the exception's `exit_code`; nothing below the command layer prints.
"""

from __future__ import annotations

from collections.abc import Callable

# Where engine warnings go: None sends them to the "qimg" logger (a library
# user's logging set-up decides); the command layer sets a function that
# prints them, so a command never imports logging.
warning_sink: Callable[[str], None] | None = None

# The name every printed message begins with: the basename of argv[0] as the
# program was invoked (qemu-img's error_init), so qimg installed as qemu-img
# speaks as qemu-img. The command layer sets it; library text that names the
# program says "qimg: " and goes through relabel() where it is printed.
program_name = "qimg"


def relabel(text: str) -> str:
    """`text` with the "qimg: " that begins any of its lines replaced by
    program_name's."""
    if program_name == "qimg":
        return text
    lines = text.split("\n")
    prefix = f"{program_name}: "
    return "\n".join(prefix + ln[6:] if ln.startswith("qimg: ") else ln for ln in lines)


def warn(message: str) -> None:
    """Report a warning (qemu-img's warn_report) without stopping."""
    if warning_sink is not None:
        warning_sink(message)
        return
    import logging

    logging.getLogger("qimg").warning(message)


# Where a driver's own notices go, printed as they are (QEMU's qcow2 driver
# prints its corruption events with fprintf, "qcow2: ..."): None sends them
# to the "qimg" logger; the command layer sets a function that prints them.
notice_sink: Callable[[str], None] | None = None


def notice(message: str) -> None:
    """Report a driver notice (e.g. "qcow2: Image is corrupt: ...") as is."""
    if notice_sink is not None:
        notice_sink(message)
        return
    import logging

    logging.getLogger("qimg").warning(message)


class QimgError(Exception):
    """Base of every error qimg reports to a user.

    Raised when: never directly; catch it to handle any qimg failure.
    """

    exit_code = 1


class InvalidImageError(QimgError):
    """Raised when: a file is not a valid image of the format asked for
    (bad magic, unsupported version, a header field out of range)."""


class CorruptImageError(QimgError):
    """Raised when: metadata contradicts itself (a table past the end of the
    file, an overlap with other metadata, a bad compressed descriptor).

    `offset` is the host offset involved where one is known; `guest_offset`
    the guest offset whose mapping failed, where the failure is QEMU's EIO
    from a mapping (block status) request.
    """

    def __init__(self, message: str, offset: int | None = None, guest_offset: int | None = None):
        super().__init__(message)
        self.offset = offset
        self.guest_offset = guest_offset


class UnsupportedFeatureError(QimgError):
    """Raised when: the image uses a feature qimg does not implement, such as
    an unknown incompatible feature bit."""


class ImageLockedError(QimgError):
    """Raised when: another process (QEMU, qemu-io, qemu-nbd, qimg) holds a
    byte-range lock that conflicts with the access asked for."""


class BadOptionError(QimgError):
    """Raised when: an option or argument given by the user is invalid
    (unknown -o option, bad size, conflicting options)."""


class MissingSecretError(QimgError):
    """Raised when: an encrypted image is opened without the secret it needs."""


class BackingChainError(QimgError):
    """Raised when: a backing file cannot be opened, or the chain loops."""


class ImageIOError(QimgError):
    """Raised when: the operating system refuses a read or write, or a file
    cannot be opened or created."""


class FileTooLargeError(ImageIOError):
    """The file system refused the file's size (EFBIG)."""


class NoCheckError(QimgError):
    """Raised when: `check` is asked of a format that has no consistency check."""

    exit_code = 63
