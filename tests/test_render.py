"""Human output prints file names verbatim, whatever characters they hold."""

from __future__ import annotations

import pytest
from conftest import qimg


@pytest.mark.parametrize("name", [":smile:.qcow2", "[bold]x[red].qcow2"])
def test_human_output_prints_file_names_verbatim(tmp_path, name):
    path = tmp_path / name
    qimg("create", "-q", "-f", "qcow2", path, "1M")
    assert f"image: {path}" in qimg("info", path).stdout.splitlines()
    assert "No errors were found on the image." in qimg("check", path).stdout


def _on_a_terminal(*args: str) -> str:
    """qimg's output with stdout and stderr on a pseudo-terminal."""
    import os
    import pty
    import subprocess
    import sys

    main, sub = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "80"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qimg", *args], stdout=sub, stderr=sub, env=env, close_fds=True
    )
    os.close(sub)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert proc.wait(timeout=60) in (0, 2, 3)
    return out.decode().replace("\r\n", "\n")


def _plain(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("command", ["info", "check"])
def test_terminal_output_is_the_piped_text_with_styles(tmp_path, command):
    """On a terminal Rich styles the text; the characters are those a pipe gets."""
    path = tmp_path / "[bold]disk.qcow2"
    qimg("create", "-q", "-f", "qcow2", path, "1M")
    piped = qimg(command, path)
    shown = _on_a_terminal(command, str(path))
    assert "\x1b[" in shown
    assert _plain(shown) == piped.stdout + piped.stderr
