"""The man page, completions and README keep up with the command tree."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from qimg.cli import COMMANDS

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_man_page_is_generated_from_the_current_command_tree():
    sys.path.insert(0, str(ROOT / "man"))
    try:
        from make_manpage import manpage
    finally:
        sys.path.pop(0)
    assert (ROOT / "man" / "qimg.1").read_text() == manpage(), (
        "man/qimg.1 is stale: run python man/make_manpage.py > man/qimg.1"
    )


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_matches_clicks_generated_one(shell):
    env = dict(os.environ, _QIMG_COMPLETE=f"{shell}_source")
    proc = subprocess.run([sys.executable, "-m", "qimg"], env=env, capture_output=True, text=True)
    saved = (ROOT / "completions" / f"qimg.{shell}").read_text()
    assert saved == proc.stdout


def test_bash_completion_offers_every_command():
    env = dict(os.environ, _QIMG_COMPLETE="bash_complete", COMP_WORDS="qimg ", COMP_CWORD="1")
    proc = subprocess.run([sys.executable, "-m", "qimg"], env=env, capture_output=True, text=True)
    offered = {line.split(",", 1)[1] for line in proc.stdout.splitlines() if "," in line}
    assert set(COMMANDS) <= offered


def test_readme_names_every_command():
    readme = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        assert f"qimg {name}" in readme
