"""qimg create: make a new image (qemu-img create)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import need_filename, quiet_option
from qimg.errors import QimgError


@click.command("create")
@click.option("-f", "--format", "fmt", default="raw", metavar="FMT", help="Image format.")
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPTIONS",
    help="Format options, 'key=value,...'; '-o help' lists them.",
)
@click.option("-b", "--backing", "backing", metavar="BACKING", help="Backing file.")
@click.option("-F", "--backing-format", "backing_fmt", metavar="FMT", help="Backing file format.")
@click.option("-u", "unsafe", is_flag=True, help="Do not open the backing file.")
@quiet_option
@click.argument("filename", required=False)
@click.argument("size", required=False)
def command(fmt, options, backing, backing_fmt, unsafe, quiet, filename, size) -> None:
    """Create FILENAME of SIZE bytes (suffixes k, M, G, T, P, E)."""
    from qimg import api
    from qimg.options import parse_image_size, parse_options

    opts = parse_options(options)
    if "help" in opts:
        _print_options_help(fmt)
        return
    filename = need_filename(filename)
    nbytes = parse_image_size(size) if size is not None else None
    try:
        line = api.create_image(
            filename,
            fmt,
            nbytes,
            opts,
            backing_file=backing,
            backing_fmt=backing_fmt,
            check_backing=not unsafe,
        )
    except QimgError as exc:
        exc.args = (f"{filename}: {exc}",)
        raise
    if not quiet:
        click.echo(line)


def _print_options_help(fmt: str) -> None:
    from qimg.formats.qcow2.create import CREATE_OPTIONS_HELP

    if fmt == "qcow2":
        items = CREATE_OPTIONS_HELP
    else:
        items = [
            o
            for o in CREATE_OPTIONS_HELP
            if o[0] in ("extent_size_hint", "nocow", "preallocation", "size")
        ]
        items = [
            (n, t, "Preallocation mode (allowed values: off, falloc, full)")
            if n == "preallocation"
            else (n, t, d)
            for n, t, d in items
        ]
    click.echo("Supported options:")
    for name, typ, desc in items:
        click.echo(f"  {(name + '=<' + typ + '>'):<22} - {desc}")
