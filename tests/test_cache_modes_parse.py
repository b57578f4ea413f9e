"""Cache mode names (-t / -T) are the ones qemu-img accepts, refused in its
words and with its exit code."""

from __future__ import annotations

import pytest
from conftest import qimg, run

from qimg.cachemode import CACHE_MODES, parse_cache_mode
from qimg.errors import BadOptionError

NAMES = [*CACHE_MODES, "off", "", "bogus", "Unsafe", "writeback,foo", " none", "direct"]


def _qemu_convert(tmp_path, flag: str, name: str):
    src = tmp_path / "src.raw"
    dst = tmp_path / "dst.raw"
    for path in (src, dst):
        path.write_bytes(bytes(65536))
    return run(["qemu-img", "convert", "-n", flag, name, str(src), str(dst)], check=False)


def _message(stderr: str) -> str:
    """The message without the program name (qemu-img: / qimg:)."""
    return stderr.rstrip("\n").split(": ", 1)[1]


@pytest.mark.parametrize("flag,source", [("-t", False), ("-T", True)])
def test_cache_mode_names_parse_as_qemu_img_parses_them(qemu_img, tmp_path, flag, source):
    for name in NAMES:
        proc = _qemu_convert(tmp_path, flag, name)
        try:
            mode = parse_cache_mode(name, source=source)
        except BadOptionError as exc:
            assert proc.returncode == 1, (name, proc.stderr)
            assert str(exc) == _message(proc.stderr), name
        else:
            assert proc.returncode == 0, (name, proc.stderr)
            assert mode.name == name


def test_bad_mode_on_the_command_line_fails_as_qemu_img_fails(qemu_img, tmp_path):
    src = tmp_path / "src.raw"
    dst = tmp_path / "dst.raw"
    for path in (src, dst):
        path.write_bytes(bytes(65536))
    for args in (["-t", "bogus"], ["-T", "bogus"], ["-t", "bad", "-T", "worse"]):
        ours = qimg("convert", "-n", *args, src, dst, check=False)
        theirs = run(["qemu-img", "convert", "-n", *args, str(src), str(dst)], check=False)
        assert ours.returncode == theirs.returncode == 1
        assert _message(ours.stderr) == _message(theirs.stderr)


def test_modes_mean_what_qemu_means():
    assert parse_cache_mode("none").direct and not parse_cache_mode("none").writethrough
    assert parse_cache_mode("off").direct
    assert parse_cache_mode("directsync").direct and parse_cache_mode("directsync").writethrough
    assert parse_cache_mode("writethrough").writethrough
    assert not parse_cache_mode("writethrough").direct
    assert parse_cache_mode("unsafe").no_flush
    wb = parse_cache_mode("writeback")
    assert not (wb.direct or wb.writethrough or wb.no_flush)
