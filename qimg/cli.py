"""The root command group: global options and the error -> exit code map.

Every QimgError becomes one `qimg: message` on stderr and its exit code; a
usage error exits 1, as qemu-img's do. No traceback reaches the user unless
QIMG_DEBUG is set.
"""

from __future__ import annotations

import os
import sys

from qimg import __version__, errors
from qimg.commands._click import click
from qimg.errors import QimgError

COMMANDS = ("create", "info", "check", "convert")

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class QimgGroup(click.Group):
    """Loads command modules on first use, so start-up stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, name: str):
        return self._load(name)

    def _load(self, name: str):
        if name not in COMMANDS:
            return None
        import importlib

        try:
            module = importlib.import_module(f"qimg.commands.{name}")
        except ModuleNotFoundError:
            return None
        return module.command


@click.group(cls=QimgGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(
    __version__,
    "-V",
    "--version",
    prog_name="qimg",
    message="qimg version %(version)s (qemu-img 7.2 compatible)",
)
def cli() -> None:
    """qimg: create, inspect, check and convert qcow2 and raw disk images.

    A qemu-img work-alike: the same commands, options, JSON and exit codes.
    """


def fail(message: str, code: int = 1) -> None:
    """Print `qimg: message` on stderr and exit with `code`."""
    sys.stderr.write(f"qimg: {message}\n")
    sys.exit(code)


def _warning_to_stderr(message: str) -> None:
    """Engine warnings print as qemu-img's warn_report does."""
    sys.stderr.write(f"qimg: warning: {message}\n")


def _notice_to_stderr(message: str) -> None:
    sys.stderr.write(f"{message}\n")


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    errors.warning_sink = _warning_to_stderr
    errors.notice_sink = _notice_to_stderr
    # qimg uses no BLAS: without this, importing numpy starts a pool of
    # OpenBLAS threads, a third of a check's start-up on 2 cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        cli.main(args=argv, prog_name="qimg", standalone_mode=False)
    except QimgError as exc:
        fail(str(exc), exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        fail("Interrupted", 1)
    except click.ClickException as exc:
        msg = exc.format_message()
        if isinstance(exc, click.UsageError):
            sys.stderr.write(f"qimg: {msg}\nTry 'qimg --help' for more information\n")
            sys.exit(1)
        fail(msg, 1)
    except KeyboardInterrupt:
        fail("Interrupted", 130)
    except BrokenPipeError:
        sys.exit(1)
    except MemoryError:
        fail("Out of memory", 1)
    except Exception as exc:  # a bug: still one line, never a traceback
        if os.environ.get("QIMG_DEBUG"):
            raise
        fail(f"internal error: {type(exc).__name__}: {exc}", 1)
    sys.exit(0)


if __name__ == "__main__":
    main()
