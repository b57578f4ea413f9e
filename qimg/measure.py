"""qemu-img measure: the size a new image needs, of a given virtual size
or to hold a converted copy of a source image.

Checked in qemu-img's order: the source opened (and its snapshot loaded),
the target format, its -o options (qemu_opts_do_parse over the format's
and the file protocol's creation options), then the format's own measure.
The source's data is counted in target clusters touched by data, from its
block status through the backing chain (qimg.blockstatus), as
bdrv_block_status_above walks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from qimg.driver import Driver
from qimg.errors import BadOptionError, QimgError
from qimg.options import split_options

# QEMU 7.2's formats that create images but have no measure (qimg knows
# no more of them than that).
_NO_MEASURE = ("qcow", "vmdk", "vdi", "vpc", "vhdx", "qed", "parallels")


@dataclass
class Measurement:
    """QAPI's BlockMeasureInfo; `bitmaps` None where qemu-img omits it."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None

    def to_json(self) -> dict:
        """The members in the order qemu-img prints them, as QAPI's int
        (int64: a size of 2^63 or more wraps, as qemu-img prints it)."""
        out = {} if self.bitmaps is None else {"bitmaps": _int64(self.bitmaps)}
        out["required"] = _int64(self.required)
        out["fully-allocated"] = _int64(self.fully_allocated)
        return out

    def human(self) -> str:
        text = f"required size: {self.required}\nfully allocated size: {self.fully_allocated}\n"
        if self.bitmaps is not None:
            text += f"bitmaps size: {self.bitmaps}\n"
        return text


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def typed_options(fmt: str, texts: list[str] | tuple[str, ...]) -> dict:
    """The -o options for a `fmt` image, each value parsed as its type
    (later ones win); unknown names and bad values fail as
    qemu_opts_do_parse does, followed by qemu-img's second line."""
    from qimg.create import option_list, typed_value

    descs = {d.name: d for d in option_list(fmt)}
    values: dict = {}
    try:
        for text in texts:
            for key, value in split_options(text):
                value = "on" if value is None else value
                desc = descs.get(key)
                if desc is None:
                    raise BadOptionError(f"Invalid parameter '{key}'")
                values[key] = typed_value(desc, value)
    except QimgError as exc:
        raise BadOptionError(f"{exc}\nqimg: Invalid options for file format '{fmt}'") from None
    return values


def measure(
    out_fmt: str,
    options: list[str] | tuple[str, ...] = (),
    *,
    size: int | None = None,
    source: Driver | None = None,
    secrets: Mapping[str, bytes] | None = None,
) -> Measurement:
    """Measure an image of format `out_fmt` made with `options` (-o
    texts): of `size` bytes, or holding `source` (an opened image, its
    snapshot view if one is asked for)."""
    from qimg.opening import FORMATS

    if out_fmt in _NO_MEASURE:
        raise QimgError(f"Block driver '{out_fmt}' does not support size measurement")
    if out_fmt not in FORMATS:
        raise QimgError(f"Unknown file format '{out_fmt}'")
    values = typed_options(out_fmt, options)
    if size is not None:
        values["size"] = size
    if out_fmt == "raw":
        return _measure_raw(values, source)
    if out_fmt == "luks":
        return _measure_luks(values, source, secrets or {})
    return _measure_qcow2(values, source, secrets or {})


def _measure_raw(values: dict, source: Driver | None) -> Measurement:
    """QEMU's raw_measure: the size, whole sectors; every byte is required."""
    from qimg.blockstatus import sector_length

    if source is not None:
        required = sector_length(source)
    else:
        required = -(-values.get("size", 0) // 512) * 512
    return Measurement(required, required)


def _measure_luks(values: dict, source: Driver | None, secrets: Mapping[str, bytes]) -> Measurement:
    """QEMU's block_crypto_measure: the header, then every byte of the
    disk (unallocated blocks are encrypted too); the size is not rounded."""
    from qimg.blockstatus import sector_length

    size = sector_length(source) if source is not None else values.get("size", 0)
    total = luks_header_length(values, secrets, "") + size
    return Measurement(total, total)


def _measure_qcow2(
    values: dict, source: Driver | None, secrets: Mapping[str, bytes]
) -> Measurement:
    """QEMU's qcow2_measure."""
    from qimg.blockstatus import sector_length
    from qimg.formats.qcow2.measure import Qcow2Target, bitmaps_size, prealloc_size

    target = Qcow2Target.from_options(values)
    cs = target.cluster_size
    payload = 0
    if target.luks:
        payload = -(-luks_header_length(values, secrets, "encrypt.") // cs) * cs
    size = values.get("size", 0)
    target.check_size(size)
    virtual = -(-size // cs) * cs
    required = 0
    if source is not None:
        virtual = -(-sector_length(source) // cs) * cs
        # With a backing file nothing is known to be shared: all counts.
        required = virtual if target.has_backing_file else data_cluster_bytes(source, cs)
    if target.preallocation in ("full", "falloc"):
        required = virtual
    order = target.refcount_bits.bit_length() - 1
    fully = payload + prealloc_size(virtual, cs, order, target.extended_l2)
    bitmaps = None
    if target.version >= 3 and source is not None and _persistent_bitmaps_supported(source):
        bitmaps = bitmaps_size(_bitmaps(source), source.size, cs)
    return Measurement(fully - virtual + required, fully, bitmaps)


def data_cluster_bytes(image: Driver, cluster_size: int) -> int:
    """The bytes of the `cluster_size` clusters that data (not zeros) of
    `image` touches, through its backing chain: qcow2_measure's loop, which
    after each data run goes on from the end of its cluster."""
    from qimg.blockstatus import BLOCK_DATA, BLOCK_ZERO, BlockStatus, sector_length

    status = BlockStatus(image)
    end = sector_length(image)
    total = 0
    pos = 0
    while pos < end:
        try:
            st = status.query(pos, end - pos)
        except QimgError:
            raise QimgError("Unable to get block status: Input/output error") from None
        pnum = st.pnum
        if st.flags & (BLOCK_DATA | BLOCK_ZERO) == BLOCK_DATA:
            pnum = -(-(pos + pnum) // cluster_size) * cluster_size - pos
            total += pos % cluster_size + pnum
        pos += pnum
    return total


def _persistent_bitmaps_supported(image: Driver) -> bool:
    """bdrv_supports_persistent_dirty_bitmap: a qcow2 image of version 3."""
    header = getattr(image, "header", None)
    return image.format_name == "qcow2" and header is not None and header.version >= 3


def _bitmaps(image: Driver) -> list[tuple[str, int]]:
    """(name, granularity) of each persistent bitmap the image loads."""
    from qimg.formats.qcow2.bitmap import read_bitmap_directory

    return [(e.name, e.granularity) for e in read_bitmap_directory(image)]


def luks_header_length(values: dict, secrets: Mapping[str, bytes], prefix: str) -> int:
    """The LUKS header's length for the `prefix`ed LUKS options (QEMU's
    qcrypto_block_calculate_payload_offset: the options parsed, the secret
    looked up, the cipher checked, as creating the volume would)."""
    from qimg.crypto.luks1 import check_params, header_length, parse_luks_options
    from qimg.crypto.sectors import MISSING_ALGS, essiv_cipher_alg
    from qimg.secrets import lookup_secret

    texts = {k: str(v) for k, v in values.items() if k.startswith(prefix)}
    params = parse_luks_options(texts, prefix)
    lookup_secret(secrets, values.get(prefix + "key-secret"), prefix + "key-secret")
    if params.cipher_alg in MISSING_ALGS:
        # Ciphers qimg cannot run but QEMU can (serpent, twofish): their
        # header is measured all the same, checked as an AES one of the
        # same key size (the same block size: the same rules), ESSIV by
        # its own family.
        if params.essiv_hash is not None:
            essiv_cipher_alg(params.cipher_alg, params.essiv_hash)
        bits = params.cipher_alg.rpartition("-")[2]
        params = replace(params, cipher_alg=f"aes-{bits}")
    check_params(params)
    return header_length(params)
