"""The sources as one disk: each image opened (its internal snapshot loaded
with -l/-s), the images end to end, each rounded up to 512 bytes as
qemu-img counts them; that size is the target's."""

from __future__ import annotations

from qimg.convert.options import ConvertOptions
from qimg.convert.scan import DATA, SKIP, ZERO
from qimg.driver import COMPRESSED, UNALLOCATED, Driver
from qimg.driver import DATA as EXTENT_DATA
from qimg.errors import BadOptionError, CorruptImageError, ImageIOError, QimgError


class Sources:
    """The opened source images (`images`) and the disk they make (`disk`),
    read from their snapshot where one is asked for. close() closes what
    was opened."""

    def __init__(self, paths: list[str], o: ConvertOptions):
        self.images: list[Driver] = []
        self.views: list[Driver] = []
        try:
            for path in paths:
                self.images.append(open_source(path, o))
            if o.snapshot_id is not None or o.snapshot_name is not None:
                # qemu-img loads the snapshot in every source.
                for image in self.images:
                    self.views.append(snapshot_view(image, o.snapshot_id, o.snapshot_name))
        except BaseException:
            self.close()
            raise
        self.disk = Concat(self.views or self.images)

    def close(self) -> None:
        for view in self.views:
            view.close()
        for image in self.images:
            image.close()


def open_source(path: str, o: ConvertOptions) -> Driver:
    from qimg.api import open_image
    from qimg.cachemode import parse_cache_mode
    from qimg.errors import ImageLockedError
    from qimg.filenames import image_opts_name, name_lock_error

    cache = parse_cache_mode(o.source_cache, source=True)
    if o.image_opts and o.source_format is not None:
        raise BadOptionError("--image-opts and --format are mutually exclusive")
    opened = image_opts_name(path) if o.image_opts else path
    try:
        need_name(path)
        return open_image(
            opened,
            o.source_format,
            force_share=o.force_share,
            cache=cache,
            lock=True,
            secrets=o.secrets,
        )
    except ImageLockedError as exc:
        name_lock_error(exc, opened, path)  # prefixed once already, as qemu-img's
        raise
    except QimgError as exc:
        # qemu-img: "Could not open 'X': " before what the opener said,
        # which for a file that cannot be opened names it once more.
        exc.args = (f"Could not open '{path}': {exc}",)
        raise


def need_name(path: str) -> None:
    """An empty file name is refused by QEMU's file driver before any open."""
    if not path:
        raise QimgError("The 'file' block driver requires a file name")


def snapshot_view(image: Driver, sid: str | None, name: str | None) -> Driver:
    """`image` as its internal snapshot `sid` / `name` holds it."""
    from qimg.snapshot import load_tmp

    return load_tmp(image, sid, name)


class Concat(Driver):
    """Several sources end to end, each rounded up to 512 bytes as qemu-img
    counts them (blk_nb_sectors); the padding reads as zeros. Read-only."""

    format_name = "concat"

    def __init__(self, parts: list[Driver]):
        self.parts: list[tuple[int, Driver]] = []  # (guest start, image)
        pos = 0
        for d in parts:
            self.parts.append((pos, d))
            pos += -(-d.size // 512) * 512
        self.size = pos
        self.filename = parts[0].filename if parts else ""
        self.writable = False

    def spans(self) -> list[tuple[int, int, Driver]]:
        """(start, end, image) of each part, the padding included."""
        ends = [start for start, _d in self.parts[1:]] + [self.size]
        return [(start, end, d) for (start, d), end in zip(self.parts, ends)]

    def _pieces(self, offset: int, length: int):
        """(driver, local offset, length inside the driver, pad, guest
        offset) per part met by guest [offset, offset+length)."""
        end = offset + length
        for start, stop, d in self.spans():
            lo, hi = max(offset, start), min(end, stop)
            if lo >= hi:
                continue
            inside = max(0, min(hi, start + d.size) - lo)
            yield d, lo - start, inside, hi - lo - inside, lo

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        for d, local, inside, pad, lo in self._pieces(offset, len(view)):
            dst = view[lo - offset : lo - offset + inside + pad]
            if inside:
                d.readinto(local, dst[:inside])
            if pad:
                dst[inside:] = bytes(pad)

    def allocated_extents(self, offset: int, length: int) -> list[tuple[int, int, bool, bool]]:
        out = []
        for d, local, inside, pad, lo in self._pieces(offset, length):
            if inside:
                for s, n, is_data, is_zero in d.allocated_extents(local, inside):
                    out.append((s - local + lo, n, is_data, is_zero))
            if pad:
                out.append((lo + inside, pad, False, True))
        return out

    def top_extents(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(offset, length, kind) of the top images only: what they leave
        to their backing files is SKIP."""
        out = []
        for d, local, inside, pad, lo in self._pieces(offset, length):
            if inside:
                for e in d.block_status(local, inside):
                    out.append((e.offset - local + lo, e.length, _TOP_KIND.get(e.kind, ZERO)))
            if pad:
                out.append((lo + inside, pad, ZERO))
        return out

    def close(self) -> None:
        pass


# block_status kinds as runs of the top image (the rest read as zeros).
_TOP_KIND = {EXTENT_DATA: DATA, COMPRESSED: DATA, UNALLOCATED: SKIP}


def block_status(src: Driver, offset: int, length: int, salvage: bool) -> list:
    """src.allocated_extents; a mapping that fails as QEMU's block status
    fails (EIO at a guest offset) is reported in qemu-img convert's words,
    or with --salvage, the range is read (what fails to read is zeros)."""
    try:
        return src.allocated_extents(offset, length)
    except CorruptImageError as exc:
        if exc.guest_offset is None:
            raise
        if salvage:
            return [(offset, length, True, False)]
        raise ImageIOError(
            f"error while reading block status at offset {exc.guest_offset}: {exc}"
        ) from None
