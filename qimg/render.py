"""Output: JSON exactly as qemu-img prints it, and human text through Rich."""

from __future__ import annotations

import json
import sys


def print_json(value) -> None:
    """qemu-img's JSON layout: four-space indent, one value per line."""
    sys.stdout.write(json.dumps(value, indent=4, ensure_ascii=False) + "\n")


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def human_size(n: int) -> str:
    """QEMU's size_to_str: 1 decimal place where needed, binary units."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    value = float(n)
    i = 0
    while value >= 1024 - 0.05 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{n} B"
    text = f"{value:.3g}"
    return f"{text} {units[i]}"


def info_human(info: dict) -> str:
    """The facts of `qemu-img info`, as its human output lays them out."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"disk size: {human_size(info['actual-size'])}",
    ]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        bf = info["backing-filename"]
        full = info.get("full-backing-filename")
        lines.append(
            f"backing file: {bf}" + (f" (actual path: {full})" if full and full != bf else "")
        )
    if "backing-filename-format" in info:
        lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    snaps = info.get("snapshots")
    if snaps:
        lines.append("Snapshot list:")
        lines.append(
            f"{'ID':<10}{'TAG':<18}{'VM SIZE':>7}{'DATE':>21}{'VM CLOCK':>13}{'ICOUNT':>11}"
        )
        import time

        for s in snaps:
            date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
            secs = s["vm-clock-sec"]
            clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{s['vm-clock-nsec'] // 1000000:03d}"
            icount = s.get("icount")
            lines.append(
                f"{s['id']:<10}{s['name']:<18}{human_size(s['vm-state-size']):>7}"
                f"{date:>21}{clock:>13}{'' if icount is None else icount:>11}"
            )
    fs = info.get("format-specific")
    if fs:
        lines.append("Format specific information:")
        lines.extend(_tree(fs["data"], 1))
    return "\n".join(lines)


def _tree(value, depth: int) -> list[str]:
    pad = "    " * depth
    out = []
    if isinstance(value, dict):
        for key, v in value.items():
            name = key.replace("-", " ")
            if isinstance(v, (dict, list)):
                out.append(f"{pad}{name}:")
                out.extend(_tree(v, depth + 1))
            else:
                out.append(f"{pad}{name}: {_scalar(v)}")
    else:
        for i, v in enumerate(value):
            if isinstance(v, (dict, list)):
                out.append(f"{pad}[{i}]:")
                out.extend(_tree(v, depth + 1))
            else:
                out.append(f"{pad}[{i}]: {_scalar(v)}")
    return out


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def print_human(text: str) -> None:
    """Human text through Rich (markup off, so file names print verbatim)."""
    _console().print(text, markup=False)
