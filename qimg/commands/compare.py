"""qimg compare: whether two images hold the same data (qemu-img compare).

Exit codes as qemu-img's: 0 identical, 1 different (or a usage error),
2 an image or --object that cannot be used, 3 a block status failure,
4 a read error.
"""

from __future__ import annotations

import sys

from qimg.commands._click import click
from qimg.commands.common import quiet_option, share_option


class CompareProgress:
    """qemu-img compare's -p lines on stdout (util/qemu-progress.c with
    min_skip 2): the percentage is a C float summed chunk by chunk, printed
    when it moves by more than two points or is 0 or 100; a newline ends
    the command whatever its outcome."""

    def __init__(self, enabled: bool):
        import numpy as np

        self.enabled = enabled
        self.f32 = np.float32
        self.current = self.last = np.float32(0)

    def step(self, chunk: int, base: int) -> None:
        if not self.enabled:
            return
        f = self.f32
        # img_compare: ((float) chunk / progress_base) * 100; then
        # qemu_progress_print: current + delta / 100 * max (max 100).
        delta = f(f(chunk) / f(base)) * f(100) if base else f(0)
        current = f(self.current + f(f(delta / f(100)) * f(100)))
        self.current = current
        skip = f(2)
        if current > f(self.last + skip) or current < f(self.last - skip) or current in (0, 100):
            self.last = current
            sys.stdout.write(f"    ({float(current):3.2f}/100%)\r")
            sys.stdout.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


@click.command("compare")
@click.option("-f", "fmt1", metavar="FMT", help="Format of the first image (probed when omitted).")
@click.option("-F", "fmt2", metavar="FMT", help="Format of the second image.")
@click.option("-T", "cache", default="writeback", metavar="SRC_CACHE", help="Cache mode.")
@click.option("--object", "objects", multiple=True, metavar="OBJECTDEF", help="Define an object.")
@click.option("--image-opts", "image_opts", is_flag=True, help="The files are option strings.")
@click.option("-p", "show_progress", is_flag=True, help="Show progress.")
@quiet_option
@click.option(
    "-s", "strict", is_flag=True, help="Strict: a different size or allocation is a difference."
)
@share_option
@click.argument("files", nargs=-1, metavar="FILE1 FILE2")
def command(
    fmt1, fmt2, cache, objects, image_opts, show_progress, quiet, strict, force_share, files
) -> None:
    """Compare FILE1 and FILE2: exit 0 if they read the same, 1 if not."""
    from qimg.cachemode import parse_cache_mode
    from qimg.cli import fail
    from qimg.compare import CompareError, compare
    from qimg.errors import QimgError
    from qimg.secrets import parse_objects

    try:
        secrets = parse_objects(objects)
    except QimgError as exc:
        fail(str(exc), 2)  # compare exits 2 where --object fails
    if len(files) != 2:
        raise click.UsageError("Expecting two image file names")
    progress = CompareProgress(show_progress and not quiet)
    try:
        try:
            parse_cache_mode(cache, source=True)
        except QimgError as exc:
            fail(str(exc), 2)  # compare exits 2 on a bad -T
        try:
            result = compare(
                files[0],
                files[1],
                fmt1=fmt1,
                fmt2=fmt2,
                strict=strict,
                force_share=force_share,
                image_opts=image_opts,
                progress=progress.step,
                warn=None if quiet else click.echo,
                secrets=secrets,
            )
        except CompareError as exc:
            fail(str(exc), exc.exit_code)
        if not quiet:
            click.echo(result.message)
    finally:
        progress.end()  # after any message, even an error's
    sys.exit(result.code)
