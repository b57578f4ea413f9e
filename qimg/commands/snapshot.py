"""qimg snapshot: list, create, apply or delete internal snapshots (qemu-img snapshot)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import format_option, output_option, quiet_option, share_option


@click.command("snapshot")
@format_option
@output_option
@quiet_option
@share_option
@click.option("--object", "objects", multiple=True, metavar="OBJECTDEF", help="Define an object.")
@click.option("--image-opts", "image_opts", is_flag=True, help="FILENAME is an option string.")
@click.option("-l", "list_", is_flag=True, multiple=True, help="List the snapshots.")
@click.option("-c", "create", multiple=True, metavar="NAME", help="Create snapshot NAME.")
@click.option(
    "-a", "apply", multiple=True, metavar="NAME", help="Apply snapshot NAME (id or name)."
)
@click.option("-d", "delete", multiple=True, metavar="NAME", help="Delete snapshot NAME.")
@click.argument("filename", nargs=-1, metavar="FILENAME")
def command(
    fmt, output, quiet, force_share, objects, image_opts, list_, create, apply, delete, filename
) -> None:
    """List (-l), create (-c), apply (-a) or delete (-d) internal snapshots of FILENAME."""
    import sys

    from qimg import render
    from qimg import snapshot as snapshots
    from qimg.secrets import parse_objects

    secrets = parse_objects(objects)
    from qimg.cli import usage_error
    from qimg.commands.common import need_filename

    if len(list_) + len(create) + len(apply) + len(delete) > 1:
        usage_error("Cannot mix '-l', '-a', '-c', '-d'")
    action, name = "list", None
    for act, names in (("create", create), ("apply", apply), ("delete", delete)):
        if names:
            action, name = act, names[0]
    if not list_ and name is None:
        action = "none"  # qemu-img opens the image read-write, and does nothing
    filename = need_filename(filename)
    from qimg.commands.common import open_target, warn_probed_raw

    probed = fmt is None and not image_opts
    writable = action != "list"
    with open_target(
        filename, fmt, image_opts, secrets, writable=writable, force_share=force_share
    ) as image:
        if writable and probed and image.format_name == "raw":
            warn_probed_raw(filename)  # as qemu-img's read-write open prints it
            if action == "apply":
                warn_probed_raw(filename)  # ... and its reopen after the fallback fails
        if action == "list":
            found = snapshots.list_snapshots(image)
            if output == "json":
                render.print_json(found)
            elif found:
                sys.stdout.write(render.snapshots_human(found) + "\n")
        elif action != "none":
            getattr(snapshots, action)(image, name)
