"""qimg rebase: change an image's backing file (qemu-img rebase)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import format_option, quiet_option, share_option


@click.command("rebase")
@format_option
@click.option("-F", "backing_fmt", metavar="FMT", help="Format of the new backing file.")
@click.option("-b", "backing", metavar="BACKING", help="New backing file ('' for none).")
@click.option("-u", "unsafe", is_flag=True, help="Unsafe: rewrite the header only.")
@click.option("-p", "show_progress", is_flag=True, help="Show progress.")
@click.option("-t", "cache", default="writeback", metavar="CACHE", help="Cache mode of FILE.")
@click.option(
    "-T", "src_cache", default="writeback", metavar="CACHE", help="Cache mode of backing files."
)
@share_option
@click.option("--object", "objects", multiple=True, metavar="OBJECTDEF", help="Define an object.")
@click.option("--image-opts", "image_opts", is_flag=True, help="FILE is an option string.")
@quiet_option
@click.argument("filename", nargs=-1, metavar="FILE")
def command(
    fmt,
    backing_fmt,
    backing,
    unsafe,
    show_progress,
    cache,
    src_cache,
    force_share,
    objects,
    image_opts,
    quiet,
    filename,
) -> None:
    """Make BACKING the backing file of FILE, copying into FILE what reads
    differently through the old and the new backing chain (not with -u)."""
    from qimg.cachemode import parse_cache_mode
    from qimg.commands.common import open_target
    from qimg.progress import make_progress
    from qimg.rebase import rebase_image
    from qimg.secrets import parse_objects

    if len(filename) != 1:
        raise click.UsageError("Expecting one image file name")
    if not unsafe and backing is None:
        raise click.UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    secrets = parse_objects(objects)
    cache = parse_cache_mode(cache)
    src_cache = parse_cache_mode(src_cache, source=True)
    reporter = make_progress(show_progress and not quiet, "Rebasing")
    try:
        reporter.report(0, 1)
        with open_target(
            filename[0],
            fmt,
            image_opts,
            writable=True,
            backing=not unsafe,
            cache=cache,
            secrets=secrets,
        ) as image:
            if fmt is None and not image_opts and image.format_name == "raw":
                from qimg.commands.common import warn_probed_raw

                warn_probed_raw(filename[0])
            rebase_image(
                image,
                backing,
                backing_fmt,
                unsafe=unsafe,
                force_share=force_share,
                cache=src_cache,
                progress=reporter.report,
                secrets=secrets,
            )
        reporter.finish()
    finally:
        reporter.close()
