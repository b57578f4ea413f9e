"""One conversion from end to end: options checked, sources opened, the
target checked, created and opened, the copy run (plan, pipeline, writer),
bitmaps copied; a new target is removed again when the copy fails."""

from __future__ import annotations

from qimg.cachemode import parse_cache_mode
from qimg.convert.options import ConvertOptions
from qimg.convert.progress import ProgressCallback
from qimg.convert.source import Sources
from qimg.convert.target import (
    check_bitmaps,
    check_target_options,
    create_while_loading,
    open_backing,
    open_target,
    remove_target,
)
from qimg.driver import Driver
from qimg.errors import BadOptionError, QimgError


def convert(
    sources: list[str],
    target: str,
    options: ConvertOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    **kw,
) -> None:
    """Copy the concatenation of `sources` into `target`.

    Options are those of `ConvertOptions`, given as an object or as keyword
    arguments (e.g. ``target_format="qcow2", compress=True,
    compression_level="fast"``). `progress(done, total)` is called with
    qemu-img's progress units: bytes of data to copy (the source's
    allocated data, every byte with sparse_size 0), counted a copy request
    at a time as qemu-img counts them, so that the percentages printed are
    qemu-img's. A new target is removed again when the copy fails; an
    existing one (skip_create, -n) is left as it is.
    """
    o = _with_keywords(options or ConvertOptions(), kw)
    o.validate(len(sources))
    opened = Sources(sources, o)
    try:
        check_target_options(o)
        # -t last of the checks: qemu-img checks it once it has created
        # the target (and leaves that behind); qimg writes nothing for a
        # bad option, so checks it just before.
        parse_cache_mode(o.cache)
        if o.skip_create:
            _copy_into(opened, target, o, progress)
            return
        create_while_loading(target, opened.disk.size, o)
        try:
            _copy_into(opened, target, o, progress)
        except BaseException:
            remove_target(target)
            raise
    finally:
        opened.close()


def _with_keywords(o: ConvertOptions, kw: dict) -> ConvertOptions:
    for key, value in kw.items():
        if not hasattr(o, key):
            raise TypeError(f"convert() got an unexpected keyword argument '{key}'")
        setattr(o, key, value)
    return o


def _copy_into(
    sources: Sources, target: str, o: ConvertOptions, progress: ProgressCallback | None
) -> None:
    tgt = open_target(target, o)
    try:
        bitmaps = check_bitmaps(sources, tgt, o) if o.bitmaps else None
        src = sources.disk
        if o.skip_create and tgt.size < src.size:
            raise QimgError("output file is smaller than input file")
        if o.compress and not hasattr(tgt, "write_compressed_many"):
            raise BadOptionError("Compression not supported for this file format")
        tgt.stream_writes()  # under writeback, whose flush below waits for the data
        _copy(sources, tgt, o, progress)
        if bitmaps is not None:
            from qimg.formats.qcow2.bitmap import copy_bitmaps

            copy_bitmaps(tgt, bitmaps)  # stored when the target is closed
        tgt.flush()  # the cache mode decides: nothing under unsafe (the default)
    finally:
        tgt.close()


def _copy(
    sources: Sources, tgt: Driver, o: ConvertOptions, callback: ProgressCallback | None
) -> None:
    """The copy itself: the producer reads and scans the plan's runs ahead
    of this thread, which writes them."""
    from qimg.convert.pipeline import Pipeline
    from qimg.convert.plan import Plan
    from qimg.convert.progress import Progress
    from qimg.convert.writer import Writer

    backing, same = (
        open_backing(tgt, sources, o.secrets) if tgt.backing is not None else (None, False)
    )
    try:
        plan = Plan(sources.disk, tgt, o, backing, same)
        # qemu-img counts what it will copy (its progress units) before it
        # copies anything, so a source whose block status fails leaves an
        # existing target (-n) as it was. A new target is removed on any
        # failure: there the count is only made for a progress callback.
        if callback is None and o.skip_create:
            callback = _ignore_progress
        progress = Progress(plan, callback) if callback is not None else None
        reached = progress.reached if progress is not None else _ignore
        with Pipeline(plan) as pipeline:
            writer = Writer(tgt, plan, o, pipeline.release, reached)
            writer.write_all(pipeline.pieces())
    finally:
        if backing is not None:
            backing.close()
    reached(plan.total)


def _ignore(pos: int) -> None:
    pass


def _ignore_progress(done: int, total: int) -> None:
    pass
