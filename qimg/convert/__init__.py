"""The copy behind `qimg convert` (qemu-img convert).

    from qimg.convert import convert
    convert(["disk.raw"], "disk.qcow2", target_format="qcow2", compress=True)

One copy for every direction, written against the driver interface:

- options.py   ConvertOptions and qemu-img's checks on them, -l's parameter
- source.py    the sources as one disk (opened, snapshot loaded, end to end)
- target.py    the target: checks before creation, creation, opening, -B
- plan.py      what to copy: DATA / ZERO / SKIP runs from the sources'
               extents, and the units (grain, zero-detection block)
- scan.py      zero detection as runs, over extent lists and buffers
               (reusable by compare and rebase)
- pipeline.py  the producer and reader threads, the read-buffer pool
- writer.py    target-side writes: data runs, zeroes, compressed clusters
- sharing.py   data runs that share the source's extents instead (reflink)
- progress.py  progress counted as qemu-img counts it
- job.py       convert(): one conversion from end to end

The engine never prints; it reports progress through a callback.
"""

from __future__ import annotations

import importlib

# Name -> the submodule defining it, imported on first use: commit, rebase
# and compare import qimg.convert.scan alone and need none of the rest.
_EXPORTS = {
    "convert": "job",
    "ConvertOptions": "options",
    "options_help": "options",
    "parse_snapshot_param": "options",
    "CHUNK": "pipeline",
}

__all__ = ["convert", "ConvertOptions", "parse_snapshot_param", "options_help", "CHUNK"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
