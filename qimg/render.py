"""Output: JSON exactly as qemu-img prints it, and human text (styled by Rich on a terminal)."""

from __future__ import annotations

import json
import sys


def print_json(value) -> None:
    """qemu-img's JSON layout: four-space indent, one value per line."""
    sys.stdout.write(to_json(value) + "\n")


def to_json(value, depth: int = 0) -> str:
    """QEMU's pretty JSON writer (qobject/json-writer.c): every member on a
    line of its own, an empty container's brackets on two lines, strings
    ASCII-only with \\uXXXX escapes in upper-case hex."""
    if isinstance(value, dict):
        items = [f"{_json_str(k)}: {to_json(v, depth + 1)}" for k, v in value.items()]
        return _container("{", items, "}", depth)
    if isinstance(value, (list, tuple)):
        return _container("[", [to_json(v, depth + 1) for v in value], "]", depth)
    if isinstance(value, str):
        return _json_str(value)
    return json.dumps(value)


def _container(open_: str, items: list[str], close: str, depth: int) -> str:
    inner = "\n" + "    " * (depth + 1)
    return (
        open_
        + "".join(
            inner + item + ("," if i < len(items) - 1 else "") for i, item in enumerate(items)
        )
        + "\n"
        + "    " * depth
        + close
    )


_JSON_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _json_str(text: str) -> str:
    """quoted_str: code points QEMU's modified UTF-8 decoder rejects
    (surrogates, noncharacters) become U+FFFD; outside printable ASCII,
    \\uXXXX (a surrogate pair beyond the BMP)."""
    out = ['"']
    for ch in text:
        cp = ord(ch)
        if ch in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[ch])
            continue
        if 0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
            cp = 0xFFFD
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


# Human text is laid out here, line for line as qemu-img prints it. On a
# terminal Rich prints it with the styles below (markup off: file names
# print verbatim); to a pipe or file the bytes are the text alone, which is
# what Rich writes there too, so Rich is not even imported (~20 ms of start-up).
INFO_STYLES = ((r"(?m)^[A-Za-z][A-Za-z _]*:", "bold"),)
CHECK_STYLES = (
    (r"(?m)^No errors were found on the image\.$", "green"),
    (r"(?m)^\d+ errors were found on the image\.$", "bold red"),
    (r"(?m)^\d+ leaked clusters were found on the image\.$", "yellow"),
    (r"(?m)^\d+ internal errors have occurred during the check\.$", "bold red"),
)
CHECK_MESSAGE_STYLES = (
    (r"(?m)^ERROR.*$", "red"),
    (r"(?m)^Leaked.*$", "yellow"),
    (r"(?m)^Repairing.*$", "cyan"),
)


def _emit(text: str, stream, styles) -> None:
    """`text` and a newline on `stream`: styled through Rich on a terminal."""
    if not stream.isatty():
        stream.write(text + "\n")
        return
    from rich.console import Console
    from rich.text import Text

    rich_text = Text(text)
    for pattern, style in styles:
        rich_text.highlight_regex(pattern, style)
    Console(file=stream, highlight=False, soft_wrap=True, emoji=False).print(rich_text)


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
    if info.get("encrypted"):
        lines.append("encrypted: yes")
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
        lines.append(snapshots_human(snaps))
    fs = info.get("format-specific")
    if fs:
        lines.append("Format specific information:")
        lines.extend(_tree(fs["data"], 1))
    return "\n".join(lines)


_U64_MAX = (1 << 64) - 1


def snapshots_human(snaps: list[dict]) -> str:
    """QEMU's snapshot list (info, snapshot -l) of info's "snapshots" dicts."""
    lines = ["Snapshot list:"]
    # QEMU's bdrv_snapshot_dump: fixed minimum widths, never truncated.
    lines.append(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
    import time

    for s in snaps:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
        secs = s["vm-clock-sec"]
        clock = (
            f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
            f"{s['vm-clock-nsec'] // 1000000:03d}"
        )
        icount = s.get("icount")
        size = human_size(s["vm-state-size"] & _U64_MAX)
        lines.append(
            f"{_ljust_bytes(s['id'], 9)} {_ljust_bytes(s['name'], 16)} {size:>8}"
            f"{date:>20}{clock:>13}{'' if icount is None else icount:>11}"
        )
    return "\n".join(lines)


def _ljust_bytes(text: str, width: int) -> str:
    """printf's "%-Ns": padded to `width` bytes of UTF-8, not characters."""
    return text + " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))


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


def print_human(text: str, styles=INFO_STYLES) -> None:
    """Human text on stdout (see _emit)."""
    _emit(text, sys.stdout, styles)


# --- check (qemu-img check) ------------------------------------------------------


def check_messages(lines: list[str]) -> None:
    """What qemu-img check prints on stderr while it runs (ERROR, Leaked,
    Repairing lines)."""
    if lines:
        from qimg.errors import relabel

        _emit(relabel("\n".join(lines)), sys.stderr, CHECK_MESSAGE_STYLES)


def check_repaired_human(leaks_fixed: int, corruptions_fixed: int) -> str:
    """img_check's note after a repair, before the second check."""
    return (
        "The following inconsistencies were found and repaired:\n\n"
        f"    {leaks_fixed} leaked clusters\n"
        f"    {corruptions_fixed} corruptions\n\n"
        "Double checking the fixed image now..."
    )


def check_human(result) -> str:
    """dump_human_image_check: the summary of a check result."""
    lines: list[str] = []
    if not (result.corruptions or result.leaks or result.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if result.corruptions:
            lines += [
                "",
                f"{result.corruptions} errors were found on the image.",
                "Data may be corrupted, or further writes to the image may corrupt it.",
            ]
        if result.leaks:
            lines += [
                "",
                f"{result.leaks} leaked clusters were found on the image.",
                "This means waste of disk space, but no harm to data.",
            ]
        if result.check_errors:
            lines += ["", f"{result.check_errors} internal errors have occurred during the check."]
    if result.total_clusters and result.allocated_clusters:
        a, t = result.allocated_clusters, result.total_clusters
        lines.append(
            f"{a}/{t} = {a * 100.0 / t:0.2f}% allocated, "
            f"{result.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
            f"{result.compressed_clusters * 100.0 / a:0.2f}% compressed clusters"
        )
    if result.image_end_offset:
        lines.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(lines)


# --- bitmap --list (qimg only) ---------------------------------------------------


BITMAP_STYLES = ((r"\A[^\n]*", "bold"), (r"in-use", "yellow"))


def bitmaps_human(rows: list[dict]) -> str:
    """A table of bitmaps: name, granularity, flags and dirty bytes ("-"
    where unknown: an in-use bitmap), columns as wide as their widest cell."""
    table = [("NAME", "GRANULARITY", "FLAGS", "DIRTY")]
    for r in rows:
        count = r.get("count")
        dirty = "-" if count is None else f"{human_size(count)} ({count} bytes)"
        table.append((r["name"], str(r["granularity"]), ",".join(r["flags"]) or "-", dirty))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    return "\n".join(
        f"{n:<{widths[0]}}  {g:>{widths[1]}}  {f:<{widths[2]}}  {d}" for n, g, f, d in table
    )
