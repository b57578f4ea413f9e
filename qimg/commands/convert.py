"""qimg convert: copy images between formats (qemu-img convert)."""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import image_opts_option, object_option, quiet_option, share_option
from qimg.errors import BadOptionError


def _sparse_size(ctx, param, value):
    """-S: cvtnum, then multiples of 512 up to 16 MiB (qemu-img's checks)."""
    from qimg.options import cvtnum

    if value is None:
        return 4096
    size = cvtnum("buffer size for sparse output", value, two_lines=False)
    if size % 512 or size > 16 << 20:
        raise BadOptionError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of "
            "512 up to 16777216. Select 0 to disable sparse detection (fully allocates output)."
        )
    return size


def _rate_limit(ctx, param, value):
    from qimg.options import cvtnum

    return 0 if value is None else cvtnum("rate limit", value, two_lines=False)


def _coroutines(ctx, param, value):
    """-m: qemu_strtoi, 1 to 16."""
    from qimg.options import strtoi

    if value is None:
        return 8
    try:
        n = strtoi(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 16:
        raise BadOptionError(
            "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"
        )
    return n


@click.command("convert")
@click.option(
    "-f", "--format", "source_format", metavar="FMT", help="Source format (probed when omitted)."
)
@click.option("-O", "target_format", metavar="FMT", help="Target format (default raw).")
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPTIONS",
    help="Target creation options, as for create; '-o help' lists them.",
)
@click.option("-B", "backing_file", metavar="BACKING", help="Backing file of the target.")
@click.option("-F", "backing_format", metavar="FMT", help="Format of the backing file.")
@click.option("-c", "compress", is_flag=True, help="Compress the target's clusters (qcow2).")
@click.option(
    "--compression-level",
    type=click.Choice(["fast", "default", "best"]),
    default="default",
    help="qimg only: trade size for speed with -c. 'default' stays within 1% of "
    "qemu-img's size; 'fast' is several times faster and somewhat larger; 'best' "
    "is slower and smaller.",
)
@click.option("-p", "show_progress", is_flag=True, help="Show progress.")
@quiet_option
@click.option("-n", "skip_create", is_flag=True, help="Write into an existing target.")
@click.option(
    "-S",
    "sparse_size",
    callback=_sparse_size,
    metavar="SIZE",
    help=(
        "Zeros must run SIZE bytes (default 4k) to be left sparse; shorter zero "
        "gaps after data are written. 0 writes every byte."
    ),
)
@click.option(
    "-m",
    "coroutines",
    callback=_coroutines,
    metavar="N",
    help="Parallel workers (1-16, default 8).",
)
@click.option(
    "-W", "out_of_order", is_flag=True, help="Accepted for compatibility (writes stay in order)."
)
@click.option("-t", "cache", default="unsafe", metavar="CACHE", help="Target cache mode.")
@click.option("-T", "source_cache", default="writeback", metavar="CACHE", help="Source cache mode.")
@share_option
@click.option(
    "-C", "copy_range", is_flag=True, help="Copy data as it is (no zero detection in it)."
)
@click.option(
    "-r",
    "rate_limit",
    callback=_rate_limit,
    metavar="RATE",
    help="Copy at most RATE bytes of data a second (k, M, G suffixes).",
)
@click.option(
    "-l",
    "snapshot_param",
    metavar="SNAPSHOT_PARAM",
    help="snapshot.id=ID,snapshot.name=NAME or a snapshot name.",
)
@click.option("-s", "snapshot", metavar="SNAPSHOT", help="Snapshot id or name to read.")
@click.option("--target-is-zero", is_flag=True, help="The target (-n) reads as zeros already.")
@click.option("--bitmaps", is_flag=True, help="Copy persistent bitmaps.")
@click.option("--skip-broken-bitmaps", is_flag=True, help="Skip inconsistent bitmaps.")
@click.option("--salvage", is_flag=True, help="Go on past read errors (zeros there).")
@object_option
@image_opts_option
@click.option(
    "--target-image-opts",
    is_flag=True,
    help="TARGET is an option string, as FILENAME is with --image-opts (requires -n).",
)
@click.argument("files", nargs=-1)
def command(
    files, options, show_progress, quiet, snapshot_param, snapshot, objects, **fields
) -> None:
    """Convert SOURCE... into TARGET (sources are concatenated)."""
    from qimg.convert import ConvertOptions, convert, options_help, parse_snapshot_param
    from qimg.options import has_help_option, parse_options
    from qimg.progress import make_progress

    ctx = click.get_current_context()
    source = ctx.get_parameter_source("sparse_size")
    opts = parse_options(options)
    sid, sname = None, snapshot
    if snapshot_param is not None:
        sid, sname = parse_snapshot_param(snapshot_param)
    if fields["target_format"] is None and not fields["target_image_opts"]:
        fields["target_format"] = "raw"
    o = ConvertOptions(
        secrets=objects,
        create_options=opts,
        sparse_given=source is click.core.ParameterSource.COMMANDLINE,
        snapshot_id=sid,
        snapshot_name=sname,
        **fields,
    )
    # qemu-img's order: the option checks (-n with -o last), help, the file names.
    o.check_options()
    if has_help_option(options):
        # The target's protocol options are listed when it is named.
        click.echo(options_help(o.target_format, with_protocol=len(files) >= 2))
        return
    if len(files) < 2:
        raise BadOptionError("Must specify image file name")
    o.check_source_cache()
    shown = show_progress and not quiet
    reporter = make_progress(shown)
    reporter.start()
    try:
        convert(list(files[:-1]), files[-1], o, progress=reporter.report if shown else None)
    except BaseException:
        # qemu-img ends its progress line after the error message is out.
        import atexit

        atexit.register(reporter.close)
        raise
    reporter.finish()
    reporter.close()
