"""qemu-img's command lines are read by GNU getopt_long; Click differs in two
ways a user can see, made good here:

- getopt_long takes any unambiguous prefix of one of qemu-img's long
  options (`--back` is `--backing-chain`, `--o` is ambiguous in info:
  --output, --object): `expand` spells such prefixes out before Click
  parses. Long options qimg has and qemu-img lacks are taken only whole.
- qemu-img reports an unknown option as "unrecognized option 'W'" where W is
  argv[optind - 1]: the whole word when the bad letter ends it (`-q1`,
  `--foo=bar`), else the word before it once getopt has moved the file
  names seen so far behind the options (`info a -Zx` names 'a', `check -Zq
  a` names 'check'). `unrecognized` finds that word.
"""

from __future__ import annotations

from qimg.commands._click import click

# qemu-img 7.2's long options ({name: takes an argument}) per command.
QEMU_LONGS: dict[str, dict[str, bool]] = {
    "create": {"help": False, "object": True},
    "info": {
        "help": False,
        "format": True,
        "output": True,
        "backing-chain": False,
        "object": True,
        "image-opts": False,
        "force-share": False,
    },
    "check": {
        "help": False,
        "format": True,
        "repair": True,
        "output": True,
        "object": True,
        "image-opts": False,
        "force-share": False,
    },
    "snapshot": {"help": False, "object": True, "image-opts": False, "force-share": False},
    "resize": {
        "help": False,
        "object": True,
        "image-opts": False,
        "preallocation": True,
        "shrink": False,
    },
    "amend": {"help": False, "object": True, "image-opts": False, "force": False},
    "convert": {
        "help": False,
        "object": True,
        "image-opts": False,
        "force-share": False,
        "target-image-opts": False,
        "salvage": False,
        "target-is-zero": False,
        "bitmaps": False,
        "skip-broken-bitmaps": False,
    },
    "map": {
        "help": False,
        "format": True,
        "output": True,
        "object": True,
        "image-opts": False,
        "force-share": False,
        "start-offset": True,
        "max-length": True,
    },
    "measure": {
        "help": False,
        "image-opts": False,
        "object": True,
        "output": True,
        "size": True,
        "force-share": False,
    },
    "compare": {"help": False, "object": True, "image-opts": False, "force-share": False},
    "dd": {"help": False, "object": True, "image-opts": False, "force-share": False},
    "rebase": {"help": False, "object": True, "image-opts": False, "force-share": False},
    "commit": {"help": False, "object": True, "image-opts": False},
    "bitmap": {
        "help": False,
        "object": True,
        "image-opts": False,
        "add": False,
        "remove": False,
        "clear": False,
        "enable": False,
        "disable": False,
        "merge": True,
        "granularity": True,
        "source-file": True,
        "source-format": True,
    },
}


def _options(command: click.Command) -> tuple[dict[str, bool], dict[str, bool]]:
    """{letter: takes an argument}, {long name: takes an argument}: qimg's
    own, and qemu-img's (whose prefixes getopt_long matches)."""
    shorts = {"h": False}
    longs = dict(QEMU_LONGS.get(command.name or "", {"help": False}))
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        takes = not param.is_flag and not param.count
        for opt in param.opts + param.secondary_opts:
            if opt.startswith("--"):
                longs[opt[2:]] = takes
            elif len(opt) == 2:
                shorts[opt[1]] = takes
    return shorts, longs


def _long(longs: dict[str, bool], name: str, command: str) -> str | None:
    """getopt_long's match: the exact name, else the one of qemu-img's
    long options it begins."""
    if name in longs:
        return name
    matches = [n for n in QEMU_LONGS.get(command, {}) if n.startswith(name)]
    return matches[0] if len(matches) == 1 and name else None


def _words(shorts: dict[str, bool], longs: dict[str, bool], args: list[str], command: str):
    """(index, word, kind) for each word up to "--": kind is "arg" for an
    option's argument, "pos" for a file name, "opt" for an option word."""
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            return
        takes = False
        if word.startswith("--"):
            name, eq, _ = word[2:].partition("=")
            full = _long(longs, name, command)
            takes = full is not None and longs[full] and not eq
        elif word.startswith("-") and word != "-":
            for j, letter in enumerate(word[1:], start=1):
                if letter not in shorts:
                    break
                if shorts[letter]:
                    takes = j == len(word) - 1
                    break
        else:
            yield i, word, "pos"
            i += 1
            continue
        yield i, word, "opt"
        if takes and i + 1 < len(args):
            yield i + 1, args[i + 1], "arg"
            i += 1
        i += 1


def expand(command: click.Command, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """`args` with abbreviated long options written out, and {option as
    written out: as typed} (messages name an option as it was typed)."""
    shorts, longs = _options(command)
    out = list(args)
    typed: dict[str, str] = {}
    for i, word, kind in _words(shorts, longs, args, command.name or ""):
        if kind != "opt" or not word.startswith("--"):
            continue
        name, eq, value = word[2:].partition("=")
        full = _long(longs, name, command.name or "")
        if full is not None and full != name:
            typed[f"--{full}"] = f"--{name}"
            out[i] = f"--{full}{eq}{value}"
    return out, typed


def unrecognized(command: click.Command, name: str, args: list[str]) -> str | None:
    """The word qemu-img names for the first option getopt refuses in
    `args` (the words after the command `name`), or None if there is none."""
    shorts, longs = _options(command)
    previous, last_file = name, None
    for _i, word, kind in _words(shorts, longs, args, command.name or ""):
        if kind == "opt":
            if word.startswith("--"):
                long_name, eq, _ = word[2:].partition("=")
                full = _long(longs, long_name, command.name or "")
                if full is None or (eq and not longs[full]):
                    return word
            else:
                for j, letter in enumerate(word[1:], start=1):
                    if letter not in shorts:
                        if j == len(word) - 1:
                            return word
                        return last_file if last_file is not None else previous
                    if shorts[letter]:
                        break
        elif kind == "pos":
            last_file = word
        previous = word
    return None
