"""qimg info: describe an image (qemu-img info)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import (
    format_option,
    image_opts_option,
    object_option,
    output_option,
    share_option,
)


@click.command("info")
@format_option
@output_option
@click.option("--backing-chain", is_flag=True, help="Describe every image of the backing chain.")
@object_option
@image_opts_option
@share_option
@click.argument("filename", nargs=-1, metavar="FILENAME")
def command(fmt, output, backing_chain, objects, image_opts, force_share, filename) -> None:
    """Show the format, size and metadata of FILENAME."""
    from qimg import api, render
    from qimg.commands.common import need_filename

    infos = api.describe(
        need_filename(filename),
        fmt,
        force_share=force_share,
        backing_chain=backing_chain,
        image_opts=image_opts,
        secrets=objects,
    )
    if output == "json":
        render.print_json(infos if backing_chain else infos[0])
    else:
        render.print_human("\n\n".join(render.info_human(i) for i in infos))
