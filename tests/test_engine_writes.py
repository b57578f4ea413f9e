"""Random writes through the library read back identically through qemu-img.

Each example creates an image with qemu-img (optionally over a qcow2 or raw
backing file smaller than the overlay, or with an external data file), runs a
random sequence of write / write_zeroes (unmap both ways) / discard through
`qimg.open_image`, keeps a bytearray model of the guest disk, and then
demands that `qemu-img convert -O raw` and qimg's own read both equal the
model and that `qemu-img check` finds no leak and no corruption.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import host_data, qemu_check_clean, qemu_read_raw, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qimg.api import open_image

KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Config:
    cluster_size: int
    refcount_bits: int = 16
    compat: str = "1.1"
    extended_l2: bool = False
    backing: str | None = None  # None, "qcow2" or "raw"
    data_file: str | None = None  # None, "on" (data_file) or "raw" (data_file_raw)
    size: int = 4 * MiB
    max_len: int = 300 * KiB

    @property
    def id(self) -> str:
        parts = [f"c{self.cluster_size}", f"rb{self.refcount_bits}", f"v{self.compat}"]
        if self.extended_l2:
            parts.append("extl2")
        if self.backing:
            parts.append(f"back-{self.backing}")
        if self.data_file:
            parts.append(f"datafile-{self.data_file}")
        return "-".join(parts)


CONFIGS = [
    # 512-byte clusters: an L2 table spans 32 KiB, so most writes cross
    # tables; with refcount_bits 64 a refcount block covers 64 clusters and
    # the refcount table must grow several times.
    Config(512, 16, max_len=96 * KiB),
    Config(512, 64, size=6 * MiB, max_len=700 * KiB),
    Config(512, 1, max_len=96 * KiB),
    Config(512, 64, backing="qcow2", size=6 * MiB, max_len=700 * KiB),
    Config(4 * KiB, 16, compat="0.10"),
    Config(4 * KiB, 16, compat="0.10", backing="qcow2"),
    Config(4 * KiB, 1, backing="raw"),
    Config(4 * KiB, 64),
    Config(64 * KiB, 16),
    Config(64 * KiB, 16, backing="raw"),
    Config(64 * KiB, 16, extended_l2=True),
    Config(64 * KiB, 64, extended_l2=True, backing="qcow2"),
    Config(64 * KiB, 16, compat="0.10", backing="raw"),
    Config(2 * MiB, 16, size=12 * MiB, max_len=5 * MiB),
    Config(2 * MiB, 16, extended_l2=True, backing="raw", size=12 * MiB, max_len=5 * MiB),
    Config(64 * KiB, 16, data_file="on"),
    Config(64 * KiB, 16, data_file="raw"),
    Config(4 * KiB, 16, data_file="on", backing="qcow2"),
    Config(64 * KiB, 16, extended_l2=True, data_file="on"),
]

OPS = ("write", "zero", "zero_unmap", "discard")


def ops_for(cfg: Config):
    cs = cfg.cluster_size
    offset = st.one_of(
        st.integers(0, cfg.size - 1),
        st.integers(0, cfg.size // cs - 1).map(lambda c: c * cs),
    )
    length = st.one_of(
        st.integers(1, cfg.max_len),
        st.integers(1, max(1, cfg.max_len // cs)).map(lambda c: c * cs),
    )
    return st.lists(st.tuples(st.sampled_from(OPS), offset, length), min_size=1, max_size=10)


def backing_content(size: int) -> bytes:
    """Backing data with holes, so overlay COW sees both data and zeros."""
    rnd = random.Random(size)
    buf = bytearray(size)
    for _ in range(12):
        off = rnd.randrange(size)
        n = min(size - off, rnd.randrange(1, 200 * KiB))
        buf[off : off + n] = rnd.randbytes(n)
    return bytes(buf)


def make_backing(cfg: Config, directory: Path) -> tuple[Path, bytes]:
    size = cfg.size - cfg.size // 4 - 1536  # smaller than the overlay, 512-aligned
    content = backing_content(size)
    raw = directory / "backing.raw"
    raw.write_bytes(content)
    if cfg.backing == "raw":
        return raw, content
    path = directory / "backing.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    raw.unlink()
    return path, content


def make_image(cfg: Config, directory: Path, backing: Path | None) -> Path:
    path = directory / "disk.qcow2"
    opts = [f"cluster_size={cfg.cluster_size}", f"compat={cfg.compat}"]
    if cfg.compat != "0.10":
        opts.append(f"refcount_bits={cfg.refcount_bits}")
    if cfg.extended_l2:
        opts.append("extended_l2=on")
    if cfg.data_file:
        opts.append(f"data_file={directory / 'disk.data'}")
        if cfg.data_file == "raw":
            opts.append("data_file_raw=on")
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", str(backing), "-F", cfg.backing]
    run(args + [str(path), str(cfg.size)])
    return path


def apply(img, model: bytearray, ops, cfg: Config, has_backing: bool) -> None:
    """Run `ops` on the image and on the model, with QEMU's semantics."""
    cs = cfg.cluster_size
    for i, (kind, offset, length) in enumerate(ops):
        length = min(length, cfg.size - offset)
        if kind == "write":
            data = random.Random(i * 7919 + offset).randbytes(length)
            img.write(offset, data)
            model[offset : offset + length] = data
        elif kind in ("zero", "zero_unmap"):
            img.write_zeroes(offset, length, unmap=kind == "zero_unmap")
            model[offset : offset + length] = bytes(length)
        else:
            img.discard(offset, length)
            # Whole clusters only; the last, partial cluster counts as whole.
            start = -(-offset // cs) * cs
            end = (offset + length) // cs * cs
            if offset + length == cfg.size:
                end = cfg.size
            if has_backing and cfg.compat == "0.10":
                continue  # v2 cannot hide backing data: discard does nothing
            if end > start:
                model[start:end] = bytes(end - start)


def check_against_qemu(cfg: Config, path: Path, model: bytearray, directory: Path) -> None:
    qemu_check_clean(path)
    assert qemu_read_raw(path, directory, "qcow2") == bytes(model)
    with open_image(str(path)) as img:
        assert img.read(0, cfg.size) == bytes(model)
    if cfg.data_file == "raw":
        # data_file_raw: the data file itself is a raw image of the guest.
        raw = (directory / "disk.data").read_bytes()
        assert raw.ljust(cfg.size, b"\0")[: cfg.size] == bytes(model)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.id)
def test_random_writes_read_back_through_qemu_img(cfg: Config, qemu_img) -> None:
    @settings(
        max_examples=10,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(ops=ops_for(cfg))
    def prop(ops) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            backing, content = (None, b"")
            if cfg.backing:
                backing, content = make_backing(cfg, directory)
            path = make_image(cfg, directory, backing)
            model = bytearray(cfg.size)
            model[: len(content)] = content
            with open_image(str(path), writable=True) as img:
                apply(img, model, ops, cfg, backing is not None)
            check_against_qemu(cfg, path, model, directory)

    prop()


@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[11]], ids=lambda c: c.id)
def test_long_sequence_reopening_between_batches(cfg: Config, qemu_img, tmp_path) -> None:
    """Many operations over several open/close cycles, checked at the end:
    reuse of freed clusters, table growth and cache eviction all happen."""
    backing, content = (None, b"")
    if cfg.backing:
        backing, content = make_backing(cfg, tmp_path)
    path = make_image(cfg, tmp_path, backing)
    model = bytearray(cfg.size)
    model[: len(content)] = content
    rnd = random.Random(42)
    for _batch in range(4):
        ops = []
        for _ in range(40):
            offset = rnd.randrange(cfg.size)
            ops.append((rnd.choice(OPS), offset, rnd.randrange(1, cfg.max_len)))
        with open_image(str(path), writable=True) as img:
            apply(img, model, ops, cfg, backing is not None)
    check_against_qemu(cfg, path, model, tmp_path)


def test_refcount_table_grows_many_times(qemu_img, tmp_path) -> None:
    """512-byte clusters with 64-bit refcounts: a refcount block covers 64
    clusters and a table cluster 64 blocks, so filling 12 MiB in shuffled
    chunks grows the refcount table several times."""
    cfg = Config(512, 64, size=12 * MiB)
    path = make_image(cfg, tmp_path, None)
    model = bytearray(cfg.size)
    chunks = list(range(0, cfg.size, 384 * KiB))
    random.Random(3).shuffle(chunks)
    with open_image(str(path), writable=True) as img:
        first_table = img.refcounts.table_offset
        for offset in chunks:
            data = random.Random(offset).randbytes(384 * KiB)
            img.write(offset, data)
            model[offset : offset + len(data)] = data
        assert img.refcounts.table_offset != first_table
    check_against_qemu(cfg, path, model, tmp_path)


def test_extended_l2_write_stores_only_the_subclusters_it_touches(qemu_img, tmp_path) -> None:
    """As QEMU: a 4 KiB write into a new 64 KiB cluster (2 KiB subclusters)
    writes 4 KiB to the host file; a later write to other subclusters of
    that cluster writes only those; the rest stays a hole."""
    paths = {}
    for tool in ("qemu", "qimg"):
        path = tmp_path / f"{tool}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(path), "1M"])
        writes = [(b"\x01" * 4096, 0), (b"\x02" * 8192, 40 * KiB), (b"\x03" * 3000, 200 * KiB)]
        if tool == "qemu":
            for data, off in writes:
                run(
                    [
                        "qemu-io",
                        "-f",
                        "qcow2",
                        "-c",
                        f"write -P {data[0]} {off} {len(data)}",
                        str(path),
                    ]
                )
        else:
            with open_image(str(path), "qcow2", writable=True) as img:
                for data, off in writes:
                    img.write(off, data)
        qemu_check_clean(path)
        paths[tool] = path

    assert host_data(paths["qimg"]) == host_data(paths["qemu"])
    assert qemu_read_raw(paths["qimg"], tmp_path) == qemu_read_raw(paths["qemu"], tmp_path)
