"""The Click module the commands use.

rich-click renders help through Rich; it costs tens of milliseconds to
import, so it is loaded only when help is asked for and plain Click serves
every other run (start-up time of `qimg info` matters in scripts).
"""

from __future__ import annotations

import sys

if any(arg in ("--help", "-h", "help") for arg in sys.argv[1:]):
    import rich_click as click  # noqa: F401
else:
    import click  # noqa: F401

__all__ = ["click"]
