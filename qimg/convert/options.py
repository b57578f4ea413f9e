"""What qemu-img convert takes: its options with their defaults, the checks
qemu-img makes on them alone (in its words), -l's snapshot parameter and
the target's `-o help`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qimg.errors import BadOptionError

MAX_SPARSE = 16 << 20  # qemu-img's limit for -S
MAX_COROUTINES = 16  # qemu-img's limit for -m
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")


@dataclass
class ConvertOptions:
    """Everything qemu-img convert takes, with its defaults."""

    source_format: str | None = None
    target_format: str | None = "raw"  # None only with target_image_opts: the options say
    create_options: dict[str, str] = field(default_factory=dict)
    backing_file: str | None = None
    backing_format: str | None = None
    compress: bool = False
    compression_level: str = "default"
    sparse_size: int = 4096  # -S; 0: write every byte
    coroutines: int = 8  # -m
    out_of_order: bool = False  # -W
    copy_range: bool = False  # -C: data is copied as it is, no zero detection in it
    rate_limit: int = 0  # -r: bytes of data a second, 0 for no limit
    sparse_given: bool = False  # -S was on the command line (qemu-img's explict_min_sparse)
    cache: str = "unsafe"  # -t (qemu-img convert defaults to unsafe: no fsync)
    source_cache: str = "writeback"  # -T
    force_share: bool = False  # -U
    snapshot_id: str | None = None
    snapshot_name: str | None = None
    skip_create: bool = False  # -n
    target_is_zero: bool = False
    bitmaps: bool = False
    skip_broken_bitmaps: bool = False
    salvage: bool = False
    image_opts: bool = False  # the sources are --image-opts option strings
    target_image_opts: bool = False  # so is the target (which must exist: -n)
    # The --object secrets the images' options may name (never in the repr).
    secrets: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    def validate(self, nsources: int) -> None:
        """qemu-img convert's checks on the options alone, in its words and
        its order."""
        self._check_numbers()
        self._check_copy_offload()
        for mode in (self.cache, self.source_cache):
            if mode not in CACHE_MODES:
                raise BadOptionError(f"Invalid cache option: {mode}")
        if self.target_image_opts and not self.skip_create:
            raise BadOptionError("--target-image-opts requires use of -n flag")
        if self.target_is_zero and not self.skip_create:
            raise BadOptionError("--target-is-zero requires use of -n flag")
        if self.skip_broken_bitmaps and not self.bitmaps:
            raise BadOptionError("Use of --skip-broken-bitmaps requires --bitmaps")
        self._check_compression_level()
        self._check_sources(nsources)
        if self.skip_create and self.create_options:
            raise BadOptionError("-o has no effect when skipping image creation")

    def _check_numbers(self) -> None:
        if self.coroutines < 1 or self.coroutines > MAX_COROUTINES:
            raise BadOptionError(
                "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"
            )
        s = self.sparse_size
        if s < 0 or s % 512 or s > MAX_SPARSE:
            raise BadOptionError(
                "Invalid buffer size for sparse output specified. Valid sizes are multiples "
                "of 512 up to 16777216. Select 0 to disable sparse detection (fully "
                "allocates output)."
            )

    def _check_copy_offload(self) -> None:
        if not self.copy_range:
            return
        if self.compress:
            raise BadOptionError("Cannot enable copy offloading when -c is used")
        if self.sparse_given:
            raise BadOptionError("Cannot enable copy offloading when -S is used")
        if self.salvage:
            raise BadOptionError("Cannot use copy offloading in salvaging mode")

    def _check_compression_level(self) -> None:
        from qimg.formats.qcow2.compress import COMPRESSION_LEVELS

        if self.compression_level not in COMPRESSION_LEVELS:
            raise BadOptionError(
                f"Invalid compression level '{self.compression_level}' "
                f"(allowed: {', '.join(COMPRESSION_LEVELS)})"
            )

    def _check_sources(self, nsources: int) -> None:
        if nsources < 1:
            raise BadOptionError("Expecting image file name")
        if nsources > 1 and (self.backing_file or self.create_options.get("backing_file")):
            raise BadOptionError(
                "Having a backing file for the target makes no sense when concatenating "
                "multiple input images"
            )


def parse_snapshot_param(text: str) -> tuple[str | None, str | None]:
    """-l 'snapshot.id=ID,snapshot.name=NAME' or a bare NAME: (id, name)."""
    if not text.startswith("snapshot."):
        return None, text
    from qimg.options import split_options

    sid = name = None
    for key, value in split_options(text):
        if key == "snapshot.id":
            sid = value
        elif key == "snapshot.name":
            name = value
        else:
            raise BadOptionError(f"Invalid parameter '{key}'")
    return sid, name


def options_help(target_format: str, with_protocol: bool) -> str:
    """`convert -O FMT -o help`: the target format's creation options (and
    the protocol's, `with_protocol`, when a target is named)."""
    from qimg.api import FORMATS
    from qimg.create import options_help as create_help

    if target_format not in FORMATS:
        raise BadOptionError(f"Unknown file format '{target_format}'")
    return create_help(target_format, with_protocol=with_protocol)
