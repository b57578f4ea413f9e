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
