"""Progress reporting for long commands (convert -p).

On a terminal, a Rich bar on stderr (bytes done, rate, time left). Anywhere
else, qemu-img's own lines, on stdout as qemu-img prints them
(util/qemu-progress.c): ``"    (%3.2f/100%)\\r"`` each time the percentage
moves by at least one point, and a newline at the end.

The engine only calls `report(done, total)`; this module is the command
layer's side of that callback.
"""

from __future__ import annotations

import struct
import sys
from typing import TextIO


class PlainProgress:
    """qemu-img's progress lines (min_skip 1.0, as img_convert sets it)."""

    def __init__(self, stream: TextIO | None = None, min_skip: float = 1.0):
        self.stream = stream or sys.stdout
        self.min_skip = min_skip
        self.last: float | None = None

    def start(self) -> None:
        """qemu-img convert's 0% (printed before the sources are opened)."""
        self._print(0.0)

    def report(self, done: int, total: int) -> None:
        """Print `done` of `total` as qemu-img does (each call is one of
        its qemu_progress_print calls; see convert's progress callback)."""
        if total <= 0:
            pct = 0.0 if done <= 0 else 100.0
        else:
            pct = min(100.0, done * 100.0 / total)
        self._print(pct)

    def _print(self, pct: float) -> None:
        """qemu_progress_print: a move of more than min_skip either way,
        and 0 and 100 each time they are reached, are printed. QEMU keeps
        the percentage in a C float: so does this (rounding as %3.2f does)."""
        pct = struct.unpack("f", struct.pack("f", pct))[0]
        last = 0.0 if self.last is None else self.last
        if abs(pct - last) > self.min_skip or pct in (0.0, 100.0) or self.last is None:
            self.last = pct
            self.stream.write(f"    ({pct:3.2f}/100%)\r")
            self.stream.flush()

    def finish(self) -> None:
        """A command that succeeded prints 100% once more (img_convert)."""
        self._print(100.0)

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


class RichProgress:
    """A Rich progress bar on stderr."""

    def __init__(self, description: str = "Converting"):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._task = self._progress.add_task(description, total=None)
        self._progress.start()

    def start(self) -> None:
        pass

    def report(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self._progress.stop()


class NoProgress:
    def start(self) -> None:
        pass

    def report(self, done: int, total: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(enabled: bool, description: str = "Converting"):
    """The progress reporter for -p: Rich when stderr is a terminal."""
    if not enabled:
        return NoProgress()
    if sys.stderr.isatty():
        try:
            return RichProgress(description)
        except ImportError:
            pass
    return PlainProgress()
