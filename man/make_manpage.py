"""Write man/qimg.1 from the Click command tree, so the page never drifts
from --help. Run: python man/make_manpage.py > man/qimg.1

tests/test_docs.py renders the shipped page and checks that it names every
command and option; it does not compare the text with this script's output,
which may differ in details from one Click release to another."""

from __future__ import annotations

import sys

import click

from qimg import __version__
from qimg.cli import COMMANDS, cli


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("'", "\\(aq")


def _option_line(param: click.Parameter) -> tuple[str, str]:
    names = ", ".join(param.opts + param.secondary_opts)
    if isinstance(param, click.Option) and not param.is_flag and param.metavar:
        names += f" {param.metavar}"
    elif isinstance(param, click.Option) and not param.is_flag:
        names += f" {param.name.upper()}"
    return names, (getattr(param, "help", None) or "")


def manpage() -> str:
    ctx = click.Context(cli, info_name="qimg")
    out = [
        f'.TH QIMG 1 "" "qimg {__version__}" "User Commands"',
        ".SH NAME",
        "qimg \\- create, inspect, check and convert qcow2 and raw disk images",
        ".SH SYNOPSIS",
        ".B qimg",
        "\\fICOMMAND\\fR [\\fIOPTIONS\\fR] \\fIFILE\\fR ...",
        ".SH DESCRIPTION",
        _esc(
            "qimg is a qemu-img work-alike: the same commands and options, the same "
            "JSON output and exit codes. Errors are one line starting with the name the "
            "program was run by ('qimg:'; 'qemu-img:' where qimg is installed as qemu-img)."
        ),
        ".SH COMMANDS",
    ]
    for name in COMMANDS:
        cmd = cli.get_command(ctx, name)
        if cmd is None:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx)
        out.append(f".SS qimg {name}")
        out.append(_esc("Usage: qimg " + name + " " + " ".join(cmd.collect_usage_pieces(sub))))
        out.append(".PP")
        out.append(_esc((cmd.help or "").strip()))
        for param in cmd.params:
            if isinstance(param, click.Option):
                names, help_text = _option_line(param)
                out.append(".TP")
                out.append(f"\\fB{_esc(names)}\\fR")
                out.append(_esc(help_text))
    out += [
        ".SH EXIT STATUS",
        _esc(
            "0 on success; 1 on error. check: 2 corruptions found, 3 leaks only, "
            "63 the format has no check."
        ),
        ".SH SEE ALSO",
        "qemu-img(1)",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(manpage())
