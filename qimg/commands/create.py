"""qimg create: make a new image (qemu-img create)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import object_option, quiet_option
from qimg.errors import FileTooLargeError, ImageIOError, QimgError


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
@object_option
@quiet_option
@click.argument("args", nargs=-1, metavar="FILENAME [SIZE]")
def command(fmt, options, backing, backing_fmt, unsafe, objects, quiet, args) -> None:
    """Create FILENAME of SIZE bytes (suffixes k, M, G, T, P, E)."""
    from qimg import api
    from qimg.options import has_help_option, parse_image_size, parse_options

    filename = args[0] if args else None
    opts = parse_options(options)
    if has_help_option(options):
        click.echo(api.create_options_help(fmt, with_protocol=bool(filename)))
        return
    # qemu-img's order: the file name, the size's syntax, then extra arguments.
    if filename is None:
        raise click.UsageError("Expecting image file name")
    nbytes = parse_image_size(args[1]) if len(args) > 1 else None
    if len(args) > 2:
        raise click.UsageError(f"Unexpected argument: {args[2]}")
    echo = None if quiet else click.echo
    try:
        api.create_image(
            filename,
            fmt,
            nbytes,
            opts,
            backing_file=backing,
            backing_fmt=backing_fmt,
            check_backing=not unsafe,
            on_formatting=echo,
            secrets=objects,
        )
    except FileTooLargeError:
        # qemu-img create's (bdrv_img_create's) words for EFBIG
        hint = " (try using a larger cluster size)" if "cluster_size" in opts else ""
        raise ImageIOError(
            f"{filename}: The image size is too large for file format '{fmt}'{hint}"
        ) from None
    except QimgError as exc:
        exc.args = (f"{filename}: {exc}",)
        raise
