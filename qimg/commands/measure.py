"""qimg measure: the size a new image needs (qemu-img measure)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import output_option, share_option


@click.command("measure")
@output_option
@click.option("-O", "out_fmt", default="raw", metavar="OUTPUT_FMT", help="Target format.")
@click.option("-o", "options", multiple=True, metavar="OPTIONS", help="Target creation options.")
@click.option("--object", "objects", multiple=True, metavar="OBJECTDEF", help="Define an object.")
@click.option("--image-opts", "image_opts", is_flag=True, help="FILENAME is an option string.")
@click.option("--size", metavar="N", help="Measure an empty image of N bytes.")
@click.option(
    "-f", "fmt", metavar="FMT", help="Source format (qcow2, qcow or raw); probed when omitted."
)
@click.option(
    "-l", "snapshot_param", metavar="SNAPSHOT_PARAM", help="Measure the source's snapshot."
)
@share_option
@click.argument("filename", nargs=-1, metavar="[FILENAME]")
def command(
    output, out_fmt, options, objects, image_opts, size, fmt, snapshot_param, force_share, filename
) -> None:
    """Measure a new OUTPUT_FMT image of N bytes, or holding FILENAME's data."""
    from qimg import api, render
    from qimg.errors import BadOptionError
    from qimg.options import check_option_list, cvtnum
    from qimg.secrets import parse_objects

    # qemu-img's order: each option as it is read, the objects, the file names.
    for text in options:
        check_option_list(text)
    sid = sname = None
    if snapshot_param is not None:
        from qimg.convert import parse_snapshot_param

        try:
            sid, sname = parse_snapshot_param(snapshot_param)
        except BadOptionError as exc:
            raise BadOptionError(
                f"{exc}\nqimg: Failed in parsing snapshot param '{snapshot_param}'"
            ) from None
    img_size = cvtnum("image size", size) if size is not None else None
    secrets = parse_objects(objects)
    if len(filename) > 1:
        raise BadOptionError("At most one filename argument is allowed.")
    name = filename[0] if filename else None
    if name is None and (image_opts or fmt is not None or snapshot_param is not None):
        raise BadOptionError("--image-opts, -f, and -l require a filename argument.")
    if name is not None and img_size is not None:
        raise BadOptionError("--size N cannot be used together with a filename.")
    if name is None and img_size is None:
        raise BadOptionError("Either --size N or one filename must be specified.")
    result = api.measure_image(
        out_fmt,
        options,
        size=img_size,
        filename=name,
        fmt=fmt,
        image_opts=image_opts,
        force_share=force_share,
        snapshot_id=sid,
        snapshot_name=sname,
        secrets=secrets,
    )
    if output == "json":
        render.print_json(result.to_json())
    else:
        click.echo(result.human(), nl=False)
