"""qimg resize: change an image's virtual size (qemu-img resize)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import format_option, quiet_option
from qimg.errors import BadOptionError


def _preallocation(ctx, param, value):
    """qemu-img parses the mode as it reads the option (PreallocMode)."""
    from qimg.resize import PREALLOC_MODES

    if value is not None and value not in PREALLOC_MODES:
        raise BadOptionError(f"Invalid preallocation mode '{value}'")
    return value


@click.command("resize", context_settings={"ignore_unknown_options": True})
@format_option
@click.option("--object", "objects", multiple=True, metavar="OBJECTDEF", help="Define an object.")
@click.option("--image-opts", "image_opts", is_flag=True, help="FILE is an option string.")
@click.option(
    "--preallocation",
    callback=_preallocation,
    metavar="MODE",
    help="Preallocate the new area: off, metadata, falloc or full.",
)
@click.option("--shrink", is_flag=True, help="Allow shrinking (data past the new end is lost).")
@quiet_option
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="FILE [+|-]SIZE")
def command(fmt, objects, image_opts, preallocation, shrink, quiet, args) -> None:
    """Change the virtual size of FILE to SIZE, or by +SIZE / -SIZE."""
    from qimg.commands.common import open_target
    from qimg.resize import ShrinkRefused, resize_image

    # qemu-img takes the last word as the size before reading options, so
    # that "-1G" is a size; every other word that looks like an option is one.
    ctx = click.get_current_context()
    if not args:
        raise click.UsageError("Not enough arguments")
    *rest, size_text = args
    for word in rest:
        if word.startswith("-") and word != "-":
            raise click.NoSuchOption(word)
    from qimg.secrets import parse_objects

    secrets = parse_objects(objects)
    if len(rest) != 1:
        given = any(
            ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE
            for p in ("fmt", "objects", "image_opts", "preallocation", "shrink", "quiet")
        )
        raise click.UsageError(
            "Expecting image file name and size" if rest or given else "Not enough arguments"
        )
    relative, size = _parse_size(size_text)
    with open_target(rest[0], fmt, image_opts, secrets, writable=True) as image:
        if fmt is None and not image_opts and image.format_name == "raw":
            from qimg.commands.common import warn_probed_raw

            warn_probed_raw(rest[0])
        try:
            resize_image(image, size, relative, preallocation, shrink)
        except ShrinkRefused as exc:
            _shrink_refused(str(exc))
    if not quiet:
        click.echo("Image resized.")


def _shrink_refused(message: str) -> None:
    """qemu-img's error, then its warning on what shrinking does; exit 1."""
    import sys

    from qimg.errors import relabel, warn
    from qimg.resize import SHRINK_HINT

    sys.stderr.write(relabel(f"qimg: {message}") + "\n")
    warn(SHRINK_HINT)
    sys.exit(1)


def _parse_size(text: str) -> tuple[int, int]:
    """(+1, -1 or 0, bytes): a leading + or - makes the size relative;
    the rest is a QemuOpts size."""
    from qimg.create import parse_size_option

    relative = {"+": 1, "-": -1}.get(text[:1], 0)
    return relative, parse_size_option("size", text[1:] if relative else text)
