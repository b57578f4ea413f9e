"""qimg dd: copy part of an image into a new image (qemu-img dd).

The copy is described by dd's `key=value` operands (bs, count, skip, if,
of), read after the options as qemu-img reads them; qimg.dd holds its rules.
"""

from __future__ import annotations

from qimg.commands._click import click
from qimg.commands.common import share_option


@click.command("dd")
@click.option("-f", "fmt", metavar="FMT", help="Input format (probed when omitted).")
@click.option("-O", "out_fmt", default="raw", metavar="FMT", help="Output format (default raw).")
@click.option("--object", "objects", multiple=True, metavar="OBJECTDEF", help="Define an object.")
@click.option("--image-opts", "image_opts", is_flag=True, help="INPUT is an option string.")
@share_option
@click.argument(
    "operands", nargs=-1, metavar="[bs=BYTES] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT"
)
def command(fmt, out_fmt, objects, image_opts, force_share, operands) -> None:
    """Copy INPUT, from block SKIP to block COUNT (counted from the start),
    into a new image OUTPUT of format -O, BYTES (default 512) a block."""
    from qimg.cli import fail
    from qimg.dd import dd, parse_operands
    from qimg.secrets import parse_objects

    secrets = parse_objects(objects)
    ops = parse_operands(operands)
    done = dd(
        ops,
        fmt=fmt,
        out_fmt=out_fmt,
        image_opts=image_opts,
        force_share=force_share,
        secrets=secrets,
    )
    if done.past_end:
        # qemu-img reports it as an error, yet succeeds.
        fail(f"{ops.input}: cannot skip to specified offset", 0)
