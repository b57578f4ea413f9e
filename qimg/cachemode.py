"""Cache modes as qemu-img takes them (-t for the image written, -T for
the images read): what each name means for a host file.

    mode          O_DIRECT  each write durable  flush()
    none (off)    yes       no                  fdatasync
    writeback     no        no                  fdatasync
    writethrough  no        yes (O_DSYNC)       fdatasync
    directsync    yes       yes (O_DSYNC)       fdatasync
    unsafe        no        no                  nothing

`unsafe` is QEMU's cache.no-flush: no fsync or fdatasync of any kind, the
final durability flush and the flushes between ordered metadata updates
alike (qemu-img convert -t unsafe issues none; traced). What a metadata
update's ordering needs is kept in every mode all the same: the engine
issues its writes in dependency order (data before the L2 entry that
points at it, refcounts before the table that references them, L2 before
L1), so a qimg that is killed mid-way leaves the page cache holding an
image that may leak clusters but is never corrupt. Only a host crash can
lose that order under unsafe, as it can under QEMU's.

Who uses which mode, as qemu-img does:
- convert: target -t (default unsafe), sources -T (default writeback);
- check -T (default writeback; a repair is written with it);
- amend -t, commit -t, rebase -t/-T (default writeback);
- create has no mode: its image is written with writeback (qemu-img
  create's qcow2 creation flushes between its steps, traced), as is every
  image the library opens without one.

A command that writes much data and flushes at the end (commit, safe
rebase; convert with -t writeback) tells the file so (Storage.stream_writes). Under
writeback, its long data writes are then written back as it goes and
dropped from the page cache once on the disk (qimg.writeback.DropBehind):
that flush would wait for them all the same. The tables stay cached, and
the flush comes at the end as before.

writethrough and directsync open the file with O_DSYNC, where QEMU
flushes after each write: the same guarantee, one call fewer. none and
directsync open with O_DIRECT; FileStorage then reads and writes through
page-aligned buffers (an unaligned request goes through an aligned
bounce buffer). A file system that refuses O_DIRECT fails the open in
QEMU's words ("filesystem does not support O_DIRECT"); tmpfs accepts it
on the kernels here (6.6 and later), as qemu-img finds.
"""

from __future__ import annotations

from dataclasses import dataclass

from qimg.errors import BadOptionError


@dataclass(frozen=True)
class CacheMode:
    """One cache mode: its name (as given; `off` is an old name of none)
    and what it asks of the host file."""

    name: str
    direct: bool = False  # O_DIRECT: bypass the host's page cache
    writethrough: bool = False  # O_DSYNC: every write durable when it returns
    no_flush: bool = False  # flush() does nothing (unsafe)


_MODES = {
    "none": CacheMode("none", direct=True),
    "off": CacheMode("off", direct=True),
    "writeback": CacheMode("writeback"),
    "writethrough": CacheMode("writethrough", writethrough=True),
    "directsync": CacheMode("directsync", direct=True, writethrough=True),
    "unsafe": CacheMode("unsafe", no_flush=True),
}

# The names qemu-img's help lists (`off` is accepted, not listed).
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")

WRITEBACK = _MODES["writeback"]
UNSAFE = _MODES["unsafe"]

# qemu-img's defaults: BDRV_DEFAULT_CACHE, and convert's target.
DEFAULT_CACHE = "writeback"
CONVERT_TARGET_CACHE = "unsafe"


def parse_cache_mode(text: str, *, source: bool = False) -> CacheMode:
    """bdrv_parse_cache_mode: the mode `text` names (exactly, case
    included); anything else is refused in qemu-img's words, which name a
    -T mode "source cache option"."""
    mode = _MODES.get(text)
    if mode is None:
        what = "source cache option" if source else "cache option"
        raise BadOptionError(f"Invalid {what}: {text}")
    return mode


def cache_mode(value: str | CacheMode | None, *, source: bool = False) -> CacheMode:
    """A library caller's mode: a CacheMode as it is, a name parsed, None
    for writeback (qemu-img's default)."""
    if value is None:
        return WRITEBACK
    if isinstance(value, CacheMode):
        return value
    return parse_cache_mode(value, source=source)
