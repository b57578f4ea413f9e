"""qimg commit: write an overlay's data into its backing chain (qemu-img commit)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import format_option, quiet_option


def _rate_limit(ctx, param, value):
    from qimg.options import cvtnum

    return 0 if value is None else cvtnum("rate limit", value)


@click.command("commit")
@format_option
@click.option("-t", "cache", default="writeback", metavar="CACHE", help="Cache mode.")
@click.option("-b", "base", metavar="BASE", help="Commit into BASE, further down (implies -d).")
@click.option("-d", "drop", is_flag=True, help="Keep FILE's data (do not empty it).")
@click.option("-p", "show_progress", is_flag=True, help="Show progress.")
@click.option(
    "-r", "rate_limit", callback=_rate_limit, metavar="RATE", help="Bytes a second at most."
)
@click.option("--object", "objects", multiple=True, metavar="OBJECTDEF", help="Define an object.")
@click.option("--image-opts", "image_opts", is_flag=True, help="FILE is an option string.")
@quiet_option
@click.argument("filename", nargs=-1, metavar="FILE")
def command(
    fmt, cache, base, drop, show_progress, rate_limit, objects, image_opts, quiet, filename
) -> None:
    """Write the data of FILE into its backing file (or BASE), then empty
    FILE unless -d or -b."""
    from qimg.cachemode import parse_cache_mode
    from qimg.commands.common import open_target
    from qimg.commit import commit_image
    from qimg.progress import make_progress
    from qimg.secrets import parse_objects

    if len(filename) != 1:
        raise click.UsageError("Expecting one image file name")
    secrets = parse_objects(objects)
    cache = parse_cache_mode(cache)
    reporter = make_progress(show_progress and not quiet, "Committing")
    try:
        reporter.report(0, 1)
        with open_target(
            filename[0], fmt, image_opts, writable=True, cache=cache, secrets=secrets
        ) as image:
            if fmt is None and not image_opts and image.format_name == "raw":
                from qimg.commands.common import warn_probed_raw

                warn_probed_raw(filename[0])
            commit_image(
                image,
                filename[0],
                base,
                drop=drop,
                rate_limit=rate_limit,
                progress=reporter.report,
                cache=cache,
                secrets=secrets,
            )
        reporter.finish()
    finally:
        reporter.close()
    if not quiet:
        click.echo("Image committed.")
