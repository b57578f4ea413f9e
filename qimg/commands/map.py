"""qimg map: the extents of an image and where they are stored (qemu-img map)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import format_option, share_option


@click.command("map")
@format_option
@click.option("--output", metavar="human|json", help="Output format.")
@click.option("--object", "objects", multiple=True, metavar="OBJECTDEF", help="Define an object.")
@click.option("--image-opts", "image_opts", is_flag=True, help="FILENAME is an option string.")
@click.option("--start-offset", metavar="OFFSET", help="Map from guest byte OFFSET on.")
@click.option("--max-length", metavar="LENGTH", help="Map at most LENGTH bytes.")
@share_option
@click.argument("filename", nargs=-1, metavar="FILENAME")
def command(
    fmt, output, objects, image_opts, start_offset, max_length, force_share, filename
) -> None:
    """Show the allocation of FILENAME through its backing chain."""
    import sys

    from qimg import api
    from qimg.errors import BadOptionError
    from qimg.map import write_human, write_json
    from qimg.options import cvtnum
    from qimg.secrets import parse_objects

    # qemu-img's order: options as read, the file name, --output, the open.
    start = cvtnum("start offset", start_offset) if start_offset is not None else 0
    length = cvtnum("max length", max_length) if max_length is not None else None
    secrets = parse_objects(objects)
    if len(filename) != 1:
        raise click.UsageError("Expecting one image file name")
    if output not in (None, "human", "json"):
        raise BadOptionError("--output must be used with human or json as argument.")
    with api.map_image(
        filename[0],
        fmt,
        image_opts=image_opts,
        force_share=force_share,
        start=start,
        max_length=length,
        secrets=secrets,
    ) as entries:
        render = write_json if output == "json" else write_human
        render(entries, sys.stdout.write)
