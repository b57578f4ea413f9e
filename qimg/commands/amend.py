"""qimg amend: change the options of an existing image (qemu-img amend)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import format_option, quiet_option
from qimg.errors import QimgError


def _option_list(ctx, param, value):
    """qemu-img checks each -o as it reads it, then joins them with ','."""
    from qimg.options import check_option_list

    for text in value:
        check_option_list(text)
    return ",".join(value) if value else None


@click.command("amend")
@format_option
@click.option(
    "-o",
    "options",
    multiple=True,
    callback=_option_list,
    metavar="OPTIONS",
    help="Options to change, 'key=value,...'; '-o help' lists them.",
)
@click.option("--object", "objects", multiple=True, metavar="OBJECTDEF", help="Define an object.")
@click.option("--image-opts", "image_opts", is_flag=True, help="FILE is an option string.")
@click.option("-p", "show_progress", is_flag=True, help="Show progress.")
@click.option("--force", is_flag=True, help="Allow changes that may lose data (encryption).")
@quiet_option
@click.argument("filename", nargs=-1, metavar="FILE")
def command(fmt, options, objects, image_opts, show_progress, force, quiet, filename) -> None:
    """Change the format options of FILE (qcow2: compat, refcount_bits,
    lazy_refcounts, data_file, data_file_raw, size)."""
    from qimg.commands.common import open_target
    from qimg.formats.qcow2 import amend
    from qimg.options import has_help_option
    from qimg.secrets import parse_objects

    secrets = parse_objects(objects)
    if options is None:
        raise click.UsageError("Must specify options (-o)")
    wants_help = has_help_option([options])
    if fmt is not None and wants_help:
        click.echo(_luks_help() if fmt == "luks" else amend.options_help(fmt))
        return
    if len(filename) != 1:
        raise QimgError("Expecting one image file name")
    from qimg.progress import make_progress

    reporter = make_progress(show_progress and not quiet, "Amending")
    try:
        with open_target(filename[0], fmt, image_opts, secrets, writable=True) as image:
            if fmt is None and not image_opts and image.format_name == "raw":
                from qimg.commands.common import warn_probed_raw

                warn_probed_raw(filename[0])
            if wants_help:
                luks = image.format_name == "luks"
                click.echo(_luks_help() if luks else amend.options_help(image.format_name))
                return
            if image.format_name == "luks":
                from qimg.formats.luks_amend import amend_luks

                reporter.report(0, 1)
                amend_luks(image, options, secrets, force)
                reporter.report(1, 1)
                return
            if image.format_name != "qcow2":
                raise QimgError(
                    f"Format driver '{image.format_name}' does not support option amendment"
                )
            values = amend.parse_options(options)
            reporter.report(0, 1)
            amend.amend(image, values, reporter.report, secrets=secrets, force=force)
            reporter.report(1, 1)
    finally:
        reporter.close()


def _luks_help() -> str:
    from qimg.formats.luks_amend import amend_options_help

    return amend_options_help()
