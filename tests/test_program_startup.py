"""The program's start-up settings (qimg.cli, on import): the library
alone leaves the interpreter as it finds it."""

from __future__ import annotations

import os
import subprocess
import sys

PROGRAM = (
    "import gc, os, qimg.cli, numpy; "
    "print(gc.get_threshold()[0], os.environ['OPENBLAS_NUM_THREADS'], "
    "len(os.listdir('/proc/self/task')))"
)
LIBRARY = (
    "import gc, os, qimg.api, numpy; "
    "print(gc.get_threshold()[0], os.environ.get('OPENBLAS_NUM_THREADS', '-'))"
)


def _run(code: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_the_program_raises_the_collectors_threshold_and_loads_numpy_on_one_thread():
    threshold, blas_threads, tasks = _run(PROGRAM)
    assert int(threshold) == 100_000
    assert blas_threads == "1"
    assert tasks == "1"  # no BLAS server thread beside the main one


def test_a_users_openblas_setting_wins():
    assert _run(PROGRAM, OPENBLAS_NUM_THREADS="2")[1] == "2"


def test_the_library_alone_leaves_the_collector_and_environment_as_they_are():
    default = _run("import gc; print(gc.get_threshold()[0])")[0]
    assert _run(LIBRARY) == [default, "-"]
