"""Shared fixtures: the real QEMU tools as the oracle.

Tests that need qemu-img / qemu-io take the `qemu_img` / `qemu_io` fixtures
(or call `require_tool`). Where the tool is missing they skip, except with
CI=true, where they fail: CI must never pass by skipping the oracle.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"

# Every `python -m qimg` a test starts, from any directory, runs this
# checkout's qimg, whichever one pip installed.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_CHECKOUT, os.environ.get("PYTHONPATH")]))


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package qemu-utils)"
        if IN_CI:
            pytest.fail(message + "; CI=true requires it", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def qemu_img() -> str:
    return require_tool("qemu-img")


@pytest.fixture(scope="session")
def qemu_io() -> str:
    return require_tool("qemu-io")


def _limit_memory() -> None:
    # qemu-img recurses without bound on some hostile images (a backing
    # loop); keep it from taking the machine down.
    limit = 2 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run(
    args: list[str], check: bool = True, timeout: float = 120, **kw
) -> subprocess.CompletedProcess:
    """Run a command (bounded in memory and time), capturing text output."""
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, preexec_fn=_limit_memory, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


# qemu-img's timing of PBKDF2 (a LUKS creation, a new key slot) fails at
# random when its first timed rounds see no CPU time pass (QEMU-NOTES): a
# quarter of runs on these VMs, over half under load. A failed run returns
# at once, so it is run again, up to PBKDF_TRIES times in all.
PBKDF_FLAKE = "Unable to get accurate CPU usage"
PBKDF_TRIES = 50


def run_timing_pbkdf(args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    """run() of a qemu tool command that times PBKDF2, run again while
    that timing fails (PBKDF_FLAKE)."""
    for _ in range(PBKDF_TRIES):
        proc = run(args, check=False, **kw)
        if proc.returncode == 0 or PBKDF_FLAKE not in proc.stderr:
            break
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def qimg(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the qimg command line in a subprocess, as a user would."""
    return run([sys.executable, "-m", "qimg", *map(str, args)], check=check, timeout=timeout)


def qemu_json(*args: str) -> dict | list:
    return json.loads(run(["qemu-img", *map(str, args)]).stdout)


def qemu_check_clean(path, fmt: str = "qcow2") -> None:
    """Assert that `qemu-img check` finds the image clean (exit 0)."""
    proc = run(["qemu-img", "check", "-f", fmt, str(path)], check=False)
    assert proc.returncode == 0, (
        f"qemu-img check {path}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    )


def qemu_read_raw(path, tmp_path, fmt: str | None = None) -> bytes:
    """The guest data of an image as qemu-img reads it (convert -O raw)."""
    out = tmp_path / f"oracle-{os.getpid()}-{id(path)}.raw"
    args = ["qemu-img", "convert", "-U"]
    if fmt:
        args += ["-f", fmt]
    run(args + ["-O", "raw", str(path), str(out)])
    data = out.read_bytes()
    out.unlink()
    return data


def host_data(path) -> list[tuple[int, int]]:
    """[start, end) of each run of data in a file (SEEK_DATA / SEEK_HOLE)."""
    runs = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, pos))
    return runs
