"""The man page, the completion scripts and the README work for the user,
whatever versions of Click pip picks in the declared range (click>=8.1).

Nothing here compares shipped text with what one release of a library
generates: the completion scripts are run in the real shells (bash always;
zsh and fish where installed) and must offer the commands and options of the
command tree; the man page is rendered and must name every command and
every option of each.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import click
import pytest

from qimg.cli import COMPLETE_VAR, cli

# The commands the tree offers (a listed command appears once its module exists).
COMMANDS = tuple(cli.list_commands(None))

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHELLS = ("bash", "zsh", "fish")


def command_options() -> dict[str, list[str]]:
    """Every spelling of every option of every command, from the command tree."""
    ctx = click.Context(cli, info_name="qimg")
    options = {}
    for name in COMMANDS:
        params = cli.get_command(ctx, name).params
        options[name] = [
            opt for p in params if isinstance(p, click.Option) for opt in p.opts + p.secondary_opts
        ]
    return options


@pytest.fixture
def bin_dir(tmp_path) -> pathlib.Path:
    """A directory with a `qimg` program (a console script of this tree) for PATH."""
    script = tmp_path / "bin" / "qimg"
    script.parent.mkdir()
    script.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from qimg.cli import main\nmain()\n"
    )
    script.chmod(0o755)
    return script.parent


def shell_env(bin_dir: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("_QIMG")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def need_shell(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


# --- completion ---------------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_shipped_completion_script_is_what_qimg_prints(shell):
    # `_QIMG_COMPLETE=<shell>_source qimg` prints qimg's own script (qimg.completion),
    # so a user can regenerate the file; Click 8.5 drops the newline 8.1-8.4 add.
    env = dict(os.environ, **{COMPLETE_VAR: f"{shell}_source"})
    proc = subprocess.run(
        [sys.executable, "-m", "qimg"], env=env, capture_output=True, text=True, check=True
    )
    shipped = (ROOT / "completions" / f"qimg.{shell}").read_text()
    assert shipped.rstrip("\n") == proc.stdout.rstrip("\n")
    assert f"{COMPLETE_VAR}={shell}_complete" in shipped


BASH_DRIVER = r"""
source "$1"
compopt() { local IFS=' '; echo "compopt $*"; }  # the builtin works only inside a real completion
complete -p qimg
shift
COMP_WORDS=("$@")
COMP_CWORD=$(( $# - 1 ))
COMPREPLY=()
_qimg_completion qimg "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf 'reply %s\n' "${COMPREPLY[@]}"
"""


def bash_complete(bin_dir, words: list[str]) -> tuple[list[str], str]:
    """The candidates bash gets from completions/qimg.bash for `words` (the last
    one being typed), and what else the completion function printed."""
    bash = need_shell("bash")
    script = str(ROOT / "completions" / "qimg.bash")
    proc = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", BASH_DRIVER, "bash", script, *words],
        env=shell_env(bin_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert "complete -o nosort -F _qimg_completion qimg" in lines
    replies = [ln[6:] for ln in lines if ln.startswith("reply ") and ln[6:]]
    return replies, proc.stdout


def test_bash_completes_the_commands(bin_dir):
    replies, _ = bash_complete(bin_dir, ["qimg", ""])
    assert sorted(replies) == sorted(COMMANDS)
    replies, _ = bash_complete(bin_dir, ["qimg", "c"])
    assert sorted(replies) == sorted(c for c in COMMANDS if c.startswith("c"))


@pytest.mark.parametrize("command", COMMANDS)
def test_bash_completes_every_option_of_a_command(bin_dir, command):
    replies, _ = bash_complete(bin_dir, ["qimg", command, "-"])
    assert set(command_options()[command]) <= set(replies)
    assert all(r.startswith("-") for r in replies)


def test_bash_completes_file_names_for_an_image_argument(bin_dir):
    replies, out = bash_complete(bin_dir, ["qimg", "info", "dis"])
    assert replies == []
    assert "compopt -o default" in out  # readline's file name completion


ZSH_DRIVER = r"""
compdef() { print -r -- "compdef $*" }
_describe() { shift 2; print -rl -- "${(@P)1}" }
compadd() { print -rl -- "${(@P)${@[-1]}}" }
_path_files() { print -r -- "_path_files $*" }
source "$1"
shift
words=("$@")
CURRENT=$#
_qimg_completion
"""


def zsh_complete(bin_dir, words: list[str]) -> list[str]:
    """What completions/qimg.zsh hands zsh's completion system (_describe,
    compadd, _path_files are stand-ins that print their candidates)."""
    zsh = need_shell("zsh")
    script = str(ROOT / "completions" / "qimg.zsh")
    subprocess.run([zsh, "-n", script], check=True, timeout=60)
    proc = subprocess.run(
        [zsh, "-f", "-c", ZSH_DRIVER, "zsh", script, *words],
        env=shell_env(bin_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "compdef _qimg_completion qimg"
    return lines[1:]


def test_zsh_completes_commands_options_and_file_names(bin_dir):
    described = zsh_complete(bin_dir, ["qimg", ""])
    assert sorted(line.split(":", 1)[0] for line in described) == sorted(COMMANDS)
    described = zsh_complete(bin_dir, ["qimg", "convert", "-"])
    assert set(command_options()["convert"]) <= {line.split(":", 1)[0] for line in described}
    assert zsh_complete(bin_dir, ["qimg", "info", "dis"]) == ["_path_files -f"]


def fish_complete(bin_dir, line: str) -> list[str]:
    """The candidates fish offers for the command line `line` (complete -C)."""
    fish = need_shell("fish")
    script = str(ROOT / "completions" / "qimg.fish")
    subprocess.run([fish, "--no-execute", script], check=True, timeout=60)
    proc = subprocess.run(
        [fish, "--no-config", "-c", f"source {script}; complete -C {line!r}"],
        env=shell_env(bin_dir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return [ln.split("\t", 1)[0] for ln in proc.stdout.splitlines()]


def test_fish_completes_commands_options_and_file_names(bin_dir, tmp_path):
    assert sorted(fish_complete(bin_dir, "qimg ")) == sorted(COMMANDS)
    offered = set(fish_complete(bin_dir, "qimg convert --"))
    assert {o for o in command_options()["convert"] if o.startswith("--")} <= offered
    (tmp_path / "disk.qcow2").write_bytes(b"")
    assert fish_complete(bin_dir, f"qimg info {tmp_path}/di") == [f"{tmp_path}/disk.qcow2"]


# --- the man page ---------------------------------------------------------------------


def render_man(source: str, tmp_path) -> str:
    """The page as a reader sees it (groff or mandoc; plain text, long lines)."""
    page = tmp_path / "qimg.1"
    page.write_text(source)
    if shutil.which("groff"):
        args = ["groff", "-ww", "-man", "-Tascii", "-rLL=250n", "-P-c", "-P-b", "-P-u", "-P-o"]
    elif shutil.which("mandoc"):
        args = ["mandoc", "-W", "warning", "-Tascii", "-Owidth=250"]
    else:
        pytest.skip("neither groff nor mandoc is installed")
    proc = subprocess.run([*args, str(page)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return re.sub(r".\x08", "", proc.stdout)


def man_sources() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "man"))
    try:
        from make_manpage import manpage
    finally:
        sys.path.pop(0)
    return {"shipped": (ROOT / "man" / "qimg.1").read_text(), "generated": manpage()}


@pytest.mark.parametrize("which", ["shipped", "generated"])
def test_man_page_renders_and_names_every_command_and_option(which, tmp_path):
    text = render_man(man_sources()[which], tmp_path)
    for heading in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS"):
        assert re.search(rf"^{heading}$", text, re.M), heading
    starts = {}
    for name in COMMANDS:
        found = re.search(rf"^\s+qimg {name}$", text, re.M)
        assert found, f"man page has no section for qimg {name}"
        starts[name] = found.start()
    ends = sorted([*starts.values(), text.index("\nEXIT STATUS")])
    for name, options in command_options().items():
        section = text[starts[name] : min(e for e in ends if e > starts[name])]
        missing = [o for o in options if not re.search(rf"(?<![\w-]){o}(?![\w-])", section)]
        assert not missing, f"qimg {name}: the man page does not name {missing}"


# --- help -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_names_every_command_and_option(command):
    # Help is rendered by rich-click: whatever its version, --help works and
    # shows what the man page shows.
    args = [sys.executable, "-m", "qimg", *([command] if command else []), "--help"]
    env = dict(os.environ, COLUMNS="250", TERM="dumb")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    names = command_options()[command] if command else list(COMMANDS)
    missing = [n for n in names if not re.search(rf"(?<![\w-]){n}(?![\w-])", proc.stdout)]
    assert not missing, f"--help does not name {missing}"


def test_readme_names_every_command():
    readme = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        assert f"qimg {name}" in readme
