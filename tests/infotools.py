"""Helpers shared by test_create/test_info/test_hostile: run qimg and the QEMU
tools side by side in one directory and compare what they print."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from itertools import combinations
from pathlib import Path

from conftest import run

# The checkout under test: `python -m qimg` run from another directory would
# otherwise import whatever qimg is installed.
_REPO = str(Path(__file__).resolve().parent.parent)


def qimg_in(cwd: Path, *args: str, check: bool = False, **kw):
    """`qimg ARGS` run from `cwd` (relative names resolve as a user's would),
    with this checkout's qimg."""
    env = dict(kw.pop("env", None) or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO, env.get("PYTHONPATH")]))
    return run([sys.executable, "-m", "qimg", *map(str, args)], check=check, cwd=cwd, env=env, **kw)


def qimg_here(d: Path, *args: str) -> subprocess.CompletedProcess:
    """The qimg command line run in this process from directory `d` (a
    subprocess per command would make these tests slow): exit code, stdout
    and stderr as a user would see them."""
    from qimg.cli import main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(d)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def qemu_in(cwd: Path, tool: str, *args: str, check: bool = False, **kw):
    return run([tool, *map(str, args)], check=check, cwd=cwd, **kw)


def without_actual_size(value):
    """The info JSON minus "actual-size" (host allocation differs by design)."""
    if isinstance(value, list):
        return [without_actual_size(v) for v in value]
    return {k: v for k, v in value.items() if k != "actual-size"}


def info_json_pair(cwd: Path, name: str, *extra: str) -> tuple:
    """(qemu-img's, qimg's) `info --output=json` of one image, minus actual-size."""
    q = qemu_in(cwd, "qemu-img", "info", "--output=json", *extra, name, check=True)
    m = qimg_in(cwd, "info", "--output=json", *extra, name, check=True)
    return without_actual_size(json.loads(q.stdout)), without_actual_size(json.loads(m.stdout))


def assert_same_info(cwd: Path, name: str, *extra: str) -> dict:
    q, m = info_json_pair(cwd, name, *extra)
    assert m == q
    return q


def message(stderr: str, prog: str) -> str:
    """An error's text with the program name taken off every line."""
    lines = [
        ln[len(prog) + 2 :] if ln.startswith(prog + ": ") else ln for ln in stderr.splitlines()
    ]
    return "\n".join(lines).rstrip()


def human_facts(text: str) -> list[str]:
    """The lines of human `info` output that do not depend on host allocation."""
    return [ln.rstrip() for ln in text.splitlines() if not ln.startswith("disk size:")]


def pairwise(axes: dict[str, list], valid, seed: int = 2) -> list[dict]:
    """A small set of valid combinations covering every valid pair of values
    (AETG-style greedy; pairs that no valid combination holds are dropped)."""
    rng = random.Random(seed)
    names = list(axes)
    uncovered = {
        ((a, va), (b, vb)) for a, b in combinations(names, 2) for va in axes[a] for vb in axes[b]
    }
    chosen: list[dict] = []

    def pairs_of(case):
        return {((a, case[a]), (b, case[b])) for a, b in combinations(names, 2)}

    while uncovered:
        target = min(uncovered, key=repr)
        best, best_gain = None, 0
        for _ in range(300):
            case = {n: rng.choice(axes[n]) for n in names}
            (a, va), (b, vb) = target
            case[a], case[b] = va, vb
            if not valid(case):
                continue
            gain = len(pairs_of(case) & uncovered)
            if gain > best_gain:
                best, best_gain = case, gain
        if best is None:
            uncovered.discard(target)  # no valid combination has this pair
            continue
        chosen.append(best)
        uncovered -= pairs_of(best)
    return chosen
