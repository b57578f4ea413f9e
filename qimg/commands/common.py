"""Options and helpers shared by the command modules."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.errors import BadOptionError, QimgError


def _output(ctx, param, value):
    if value not in ("human", "json"):
        raise BadOptionError("--output must be used with human or json as argument.")
    return value


format_option = click.option(
    "-f",
    "--format",
    "fmt",
    metavar="FMT",
    help="Image format (qcow2, qcow or raw); probed when omitted.",
)
output_option = click.option(
    "--output", default="human", callback=_output, metavar="human|json", help="Output format."
)
share_option = click.option(
    "-U",
    "--force-share",
    "force_share",
    is_flag=True,
    help="Open the image read-only even if another process uses it.",
)
quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")


def _objects(ctx, param, value):
    """qemu-img creates each --object as it reads the command line: its
    errors come before the checks made after the options are read."""
    from qimg.secrets import parse_objects

    return parse_objects(value)


object_option = click.option(
    "--object",
    "objects",
    multiple=True,
    is_eager=True,
    callback=_objects,
    metavar="OBJECTDEF",
    help="Define a secret: secret,id=ID,data=STRING or file=PATH[,format=raw|base64]"
    "[,keyid=ID,iv=IV] (the image options name it by ID).",
)
image_opts_option = click.option(
    "--image-opts",
    "image_opts",
    is_flag=True,
    help="FILENAME is an option string: driver=qcow2|luks|raw,file.filename=PATH"
    "[,encrypt.key-secret=ID] (luks: key-secret=ID).",
)


def need_filename(filename: str | tuple[str, ...] | None) -> str:
    """The one file name of info and check (qemu-img's `optind != argc - 1`
    test: none or more than one is the same usage error)."""
    if isinstance(filename, tuple):
        filename = filename[0] if len(filename) == 1 else None
    if filename is None:
        raise click.UsageError("Expecting one image file name")
    if not filename:  # QEMU's file driver refuses it before any open
        raise QimgError("Could not open '': The 'file' block driver requires a file name")
    return filename


def open_target(filename: str, fmt: str | None, image_opts: bool, secrets=None, **kw):
    """api.open_named for the commands that take --image-opts (resize,
    amend, snapshot, ...), which refuse it beside --format first;
    `secrets` (the --object secrets) are those its options may name."""
    from qimg.api import open_named

    if image_opts and fmt is not None:
        raise BadOptionError("--image-opts and --format are mutually exclusive")
    return open_named(filename, fmt, image_opts=image_opts, secrets=secrets, **kw)


def warn_probed_raw(filename: str) -> None:
    """QEMU's warning on opening a probed raw image read-write (printed as
    it is, whatever the program's name, even with -q)."""
    import sys

    from qimg.api import probed_raw_text

    sys.stderr.write(probed_raw_text(filename))


def warn_if_probed_raw(filename: str) -> None:
    """warn_probed_raw where the file probes as raw (where it cannot be
    probed, the open fails in its own words)."""
    import sys

    from qimg.api import probed_raw_warning

    sys.stderr.write(probed_raw_warning(filename) or "")
