"""The root command group: global options and the error -> exit code map.

Every QimgError becomes one `PROG: message` on stderr and its exit code; a
usage error adds qemu-img's "Try 'PROG --help'" line and exits 1, as
qemu-img's do. PROG is the program's name as invoked (qemu-img's error_init:
the basename of argv[0]; `python -m qimg` is qimg). No traceback reaches the
user unless QIMG_DEBUG is set.
"""

from __future__ import annotations

import gc
import os
import sys

# The program's start-up makes ~40,000 objects that live as long as it
# does (modules, classes, functions: click, numpy, qimg), and hardly any
# cyclic garbage follows (~500 unreachable objects after a 1 GiB commit,
# compare, convert or rebase). At the default threshold (700) the
# collector ran over them ~55 times, 4-5% of a 1 MiB commit's CPU.
gc.set_threshold(100_000)

# numpy's wheels link OpenBLAS, which starts a server thread per extra
# core when numpy loads, spinning before it sleeps; qimg calls no BLAS
# routine. With none (measured on 2 cores): `import numpy` alone 0.22 ->
# 0.11 CPU-s, a 1 MiB convert 5-10 ms less CPU. A user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from qimg import __version__, errors  # noqa: E402
from qimg.commands._click import click  # noqa: E402
from qimg.errors import QimgError  # noqa: E402

COMMANDS = ("create", "info", "check", "snapshot", "amend", "convert", "resize", "bitmap")
COMMANDS += ("map", "measure", "compare", "dd", "rebase", "commit")

# The completion scripts' variable (qimg.completion), whatever the program's name.
COMPLETE_VAR = "_QIMG_COMPLETE"

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class QimgGroup(click.Group):
    """Loads command modules on first use, so start-up stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, name: str):
        return self._load(name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """An unknown command is qemu-img's usage error (not while completing)."""
        name = args[0] if args else ""
        if name and not name.startswith("-") and not ctx.resilient_parsing and not self._load(name):
            raise click.UsageError(f"Command not found: {name}")
        return super().resolve_command(ctx, args)

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


def program_name(argv0: str) -> str:
    """The name messages begin with: argv[0]'s basename, qimg for `python -m qimg`."""
    name = os.path.basename(argv0)
    if not name or name.endswith(".py") or name.startswith("-"):
        return "qimg"
    return name


def fail(message: str, code: int = 1) -> None:
    """Print `PROG: message` on stderr and exit with `code`."""
    sys.stderr.write(errors.relabel(f"qimg: {message}") + "\n")
    sys.exit(code)


def usage_error(message: str) -> None:
    """qemu-img's error_exit: the message, then where to find help; exit 1."""
    prog = errors.program_name
    sys.stderr.write(
        errors.relabel(f"qimg: {message}") + f"\nTry '{prog} --help' for more information\n"
    )
    sys.exit(1)


def _getopt_args(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """A command's arguments with long options written out, as getopt_long
    reads abbreviations (qimg.commands.getopt), and how they were typed."""
    if args and args[0].startswith("--") and args[0] != "--":
        # qemu-img's own long options: --help, --version (and --trace)
        matches = [n for n in ("help", "version", "trace") if n.startswith(args[0][2:])]
        if len(matches) == 1 and matches[0] != "trace":
            return [f"--{matches[0]}", *args[1:]], {}
    command = cli.get_command(None, args[0]) if args and args[0] in COMMANDS else None
    if command is None:
        return args, {}
    from qimg.commands.getopt import expand

    rest, typed = expand(command, args[1:])
    return [args[0], *rest], typed


def _usage_message(exc: click.UsageError, args: list[str], typed: dict[str, str]) -> str:
    """Click's usage errors in qemu-img's (getopt's) words where they differ."""
    if isinstance(exc, (click.NoSuchOption, click.BadOptionUsage)):
        word = None
        command = cli.get_command(None, args[0]) if args and args[0] in COMMANDS else None
        if command is not None:
            from qimg.commands.getopt import unrecognized

            word = unrecognized(command, args[0], args[1:])
        if word is not None or isinstance(exc, click.NoSuchOption):
            return f"unrecognized option '{word or exc.option_name}'"
        if "requires" in exc.message:
            return f"missing argument for option '{typed.get(exc.option_name, exc.option_name)}'"
    return exc.format_message()


def _warning_to_stderr(message: str) -> None:
    """Engine warnings print as qemu-img's warn_report does."""
    sys.stderr.write(errors.relabel(f"qimg: warning: {message}") + "\n")


def _notice_to_stderr(message: str) -> None:
    sys.stderr.write(f"{message}\n")


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    errors.warning_sink = _warning_to_stderr
    errors.notice_sink = _notice_to_stderr
    errors.program_name = prog = program_name(sys.argv[0])
    args = sys.argv[1:] if argv is None else argv
    if COMPLETE_VAR in os.environ:
        from qimg.completion import register

        register()
    elif not args:
        usage_error("Not enough arguments")
    # qimg uses no BLAS: without this, importing numpy starts a pool of
    # OpenBLAS threads, a third of a check's start-up on 2 cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    typed: dict[str, str] = {}
    typed_args = args  # as typed: messages name words as the user wrote them
    try:
        if COMPLETE_VAR not in os.environ:
            args, typed = _getopt_args(args)
        cli.main(args=args, prog_name=prog, complete_var=COMPLETE_VAR, standalone_mode=False)
    except QimgError as exc:
        fail(str(exc), exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        fail("Interrupted", 1)
    except click.ClickException as exc:
        if isinstance(exc, click.UsageError):
            usage_error(_usage_message(exc, typed_args, typed))
        fail(exc.format_message(), 1)
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


def run() -> None:
    """The program (console script, `python -m qimg`): main(), then the
    process ends once the exit handlers have run and stdout and stderr are
    flushed, without the interpreter's teardown of modules and threads
    (10-30 ms of CPU after every command, measured on a convert and an
    info). Images are closed by then: every command closes what it opens,
    and their writes are unbuffered system calls."""
    import atexit

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        sys.exit(code)  # the interpreter reports a failed flush, as it always did
    os._exit(code)


if __name__ == "__main__":
    run()
