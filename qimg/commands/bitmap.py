"""qimg bitmap: edit persistent dirty bitmaps (qemu-img bitmap), or list them."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import format_option, output_option, warn_if_probed_raw
from qimg.errors import BadOptionError

_FLAGS = ("add", "remove", "clear", "enable", "disable")
# qemu-img 7.2's getopt string ":b:f:F:g:h" and qimg's own short options:
# {letter: takes an argument}; and its long options that take one.
_SHORTS = {"b": True, "f": True, "F": True, "g": True, "h": False, "q": False, "U": False}
_LONG_ARGS = ("merge", "object", "output", "granularity", "source-file", "source-format")


class _OrderedCommand(getattr(click, "RichCommand", click.Command)):
    """Keeps the command line: the order of the actions is qemu-img's
    order of application, which Click's parsed values do not keep."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["bitmap.argv"] = list(args)
        return super().parse_args(ctx, args)


def _actions(args: list[str]) -> list:
    """The actions in the order given, as getopt_long reads the words
    (abbreviated long options are written out before Click parses)."""
    from qimg.formats.qcow2.bitmap_ops import Action

    out = []
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if word == "--":
            break
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name in _FLAGS:
                out.append(Action(name))
            elif name in _LONG_ARGS and not eq:
                value = args[i] if i < len(args) else None
                i += 1
            if name == "merge":
                out.append(Action("merge", value))
        elif word.startswith("-") and word != "-":
            for j, letter in enumerate(word[1:], start=1):
                if _SHORTS.get(letter):
                    i += j == len(word) - 1  # the argument is the next word
                    break
    return out


def _granularity(ctx, param, value):
    from qimg.options import cvtnum

    return 0 if value is None else cvtnum("granularity", value)


@click.command("bitmap", cls=_OrderedCommand)
@click.option("--add", is_flag=True, help="Add BITMAP (enabled, unless --disable follows).")
@click.option("--remove", is_flag=True, help="Remove BITMAP.")
@click.option("--clear", is_flag=True, help="Clear every bit of BITMAP.")
@click.option("--enable", is_flag=True, help="Let BITMAP record writes.")
@click.option("--disable", is_flag=True, help="Stop BITMAP recording writes.")
@click.option(
    "--merge",
    multiple=True,
    metavar="SOURCE",
    help="OR bitmap SOURCE (of -b SOURCE_FILE if given, else of FILE) into BITMAP.",
)
@click.option(
    "-b", "--source-file", "source_file", metavar="SOURCE_FILE", help="Image --merge reads."
)
@click.option(
    "-F", "--source-format", "source_fmt", metavar="SOURCE_FMT", help="Format of SOURCE_FILE."
)
@click.option(
    "-g",
    "--granularity",
    "granularity",
    callback=_granularity,
    metavar="GRANULARITY",
    help="Bytes per bit of a bitmap --add makes (default: the cluster size within 4k..64k).",
)
@click.option(
    "--object", "objects", multiple=True, metavar="OBJECTDEF", help="Define an object (secret)."
)
@click.option(
    "--image-opts", is_flag=True, help="FILE is an option string (driver=...,file.filename=...)."
)
@format_option
@click.option(
    "-q", "--quiet", is_flag=True, help="Print nothing but errors (bitmap prints nothing else)."
)
@click.option(
    "--list",
    "list_",
    is_flag=True,
    help="qimg only: list FILE's bitmaps (name, granularity, flags, dirty bytes); no BITMAP.",
)
@output_option
@click.option(
    "-U", "--force-share", "force_share", is_flag=True, help="With --list: open FILE shared."
)
@click.argument("args", nargs=-1, metavar="FILE BITMAP")
@click.pass_context
def command(ctx, add, remove, clear, enable, disable, merge, source_file, source_fmt,
            granularity, objects, image_opts, fmt, quiet, list_, output, force_share, args) -> None:  # fmt: skip
    """Edit the persistent dirty bitmap BITMAP of FILE (qcow2).

    The actions --add, --remove, --clear, --enable, --disable and --merge
    may be given several times; they apply in the order given, and if any
    fails, nothing is written (qemu-img 7.2 keeps the ones before it).

    With --list (qimg only), FILE's bitmaps are listed instead, one per
    line: name, granularity, flags and dirty bytes. With --output=json, a
    list of objects with the keys of `info` ("name", "granularity",
    "flags") and "count": the dirty bytes, as QEMU's query-block counts
    them (dirty granules times the granularity); no "count" for an in-use
    bitmap, whose bits nobody can trust.
    """
    from qimg import api, render
    from qimg.secrets import parse_objects

    secrets = parse_objects(objects)
    if image_opts and fmt:
        raise BadOptionError("--image-opts and --format are mutually exclusive")
    actions = _actions(ctx.meta["bitmap.argv"])
    if list_:
        if actions or granularity or source_file or source_fmt:
            raise BadOptionError("--list takes no action, -g, -b or -F")
        if len(args) != 1:
            raise BadOptionError("Expecting one image file name")
        rows = api.list_bitmaps(
            args[0], fmt, force_share=force_share, image_opts=image_opts, secrets=secrets
        )
        if output == "json":
            render.print_json(rows)
        elif rows:
            render.print_human(render.bitmaps_human(rows), render.BITMAP_STYLES)
        return
    if force_share:
        raise click.NoSuchOption("-U")
    # qemu-img's checks, in its order.
    if not actions:
        raise BadOptionError(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
        )
    if granularity and not add:
        raise BadOptionError("granularity only supported with --add")
    if source_fmt and not source_file:
        raise BadOptionError("-F only supported with -b")
    if source_file and not merge:
        raise BadOptionError("Merge bitmap source file only supported with --merge")
    if len(args) != 2:
        raise BadOptionError("Expecting filename and bitmap name")
    path, name = args
    if not image_opts and fmt is None:
        warn_if_probed_raw(path)
    api.edit_bitmap(
        path,
        name,
        actions,
        fmt=fmt,
        granularity=granularity,
        source_path=source_file,
        source_fmt=source_fmt,
        image_opts=image_opts,
        secrets=secrets,
    )
