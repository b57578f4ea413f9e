"""convert's checks of an existing target (-n), beside qemu-img 7.2: the
same exit code and message, and the target left as it was."""

from __future__ import annotations

import os

import pytest

from tests.conftest import qimg, run


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_compress_into_an_existing_target_is_refused_where_the_format_cannot_store_it(
    tmp_path, qemu_img, fmt
):
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(64 << 10))
    results = []
    for tool in ("qemu-img", "qimg"):
        tgt = tmp_path / f"{tool}.{fmt}"
        run(["qemu-img", "create", "-q", "-f", fmt, str(tgt), "64K"])
        before = tgt.read_bytes()
        argv = ["convert", "-n", "-c", "-f", "raw", "-O", fmt, str(src), str(tgt)]
        proc = run([tool, *argv], check=False) if tool == "qemu-img" else qimg(*argv, check=False)
        message = proc.stderr.split(": ", 1)[-1]
        changed = tgt.read_bytes() != before
        results.append((proc.returncode, message, changed if fmt == "raw" else None))
    assert results[0] == results[1]
