"""qimg check: consistency check and repair (qemu-img check)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import (
    format_option,
    image_opts_option,
    need_filename,
    object_option,
    output_option,
    quiet_option,
    share_option,
)

_REPAIR = {"leaks": 1, "all": 3}


@click.command("check")
@format_option
@output_option
@click.option("-r", "--repair", metavar="leaks|all", help="Repair leaks, or all errors.")
@object_option
@image_opts_option
@share_option
@quiet_option
@click.argument("filename", nargs=-1, metavar="FILENAME")
def command(fmt, output, repair, objects, image_opts, force_share, quiet, filename) -> None:
    """Check FILENAME for consistency; with -r, repair what is found."""
    import sys

    from qimg import api, render

    filename = need_filename(filename)
    fix = 0
    if repair is not None:
        if repair not in _REPAIR:
            # qemu-img's error_exit: a usage error (with its "Try" line)
            raise click.UsageError(
                f"Unknown option value for -r (expecting 'leaks' or 'all'): {repair}"
            )
        fix = _REPAIR[repair]
        warning = api.probed_raw_warning(filename) if fmt is None and not image_opts else None
        if warning:
            sys.stderr.write(warning)
    try:
        result = api.check_image_file(
            filename, fmt, fix, force_share, image_opts=image_opts, secrets=objects
        )
    except api.CheckFailed as exc:
        if exc.result is not None:
            render.check_messages(exc.result.messages)
        raise
    render.check_messages(result.messages)
    if output == "json":
        render.print_json(result.to_json())
    elif not quiet:
        text = render.check_human(result)
        if result.repaired:
            text = (
                render.check_repaired_human(result.leaks_fixed, result.corruptions_fixed)
                + "\n"
                + text
            )
        render.print_human(text, render.CHECK_STYLES)
    if result.check_errors:
        from qimg.errors import relabel

        sys.stderr.write(relabel("qimg: Check failed") + "\n")
    sys.exit(result.exit_code)
