"""Qcow2Image: the qcow2 driver behind the common driver interface.

It ties the header, the refcounts, the cluster map, the codecs and the
backing chain together. Everything user-visible goes through the methods of
`qimg.driver.Driver`.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping

from qimg.driver import (
    COMPRESSED,
    DATA,
    UNALLOCATED,
    ZERO,
    Driver,
    DriverInfo,
    Extent,
    read_through_chain,
    run_bytes,
)
from qimg.errors import CorruptImageError, ImageIOError, InvalidImageError, QimgError
from qimg.formats.qcow2 import layout as L
from qimg.formats.qcow2.dataio import DataIO
from qimg.formats.qcow2.header import Geometry, Header
from qimg.storage import Storage, check_request

# Metadata regions named as QEMU's metadata_ol_names.
OL_NAMES = {
    "header": "qcow2_header",
    "l1": "active L1 table",
    "l2": "active L2 table",
    "refcount-table": "refcount table",
    "refcount-block": "refcount block",
    "snapshot-table": "snapshot table",
    "inactive-l1": "inactive L1 table",
    "bitmap-directory": "bitmap directory",
}


class Qcow2Image(Driver):
    format_name = "qcow2"
    has_snapshots = True
    maps_per_read = True

    def __init__(
        self,
        storage: Storage,
        *,
        backing: Driver | None = None,
        data_storage: Storage | None = None,
        header: Header | None = None,
        metadata_only: bool = False,
        secrets: Mapping[str, bytes] | None = None,
        encrypt: Mapping[str, str] | None = None,
    ):
        self.storage = storage
        self.filename = storage.path
        self.writable = storage.writable
        if header is None:
            first = storage.pread(0, 1 << L.MAX_CLUSTER_BITS)
            header = Header.parse(first[: max(0, min(len(first), storage.size()))], storage.size())
        self.header = header
        self.geo = Geometry.from_header(header)
        # QEMU counts the virtual size in 512-byte sectors, rounded down
        # (bs->total_sectors = size / BDRV_SECTOR_SIZE).
        self.size = header.size // L.BDRV_SECTOR_SIZE * L.BDRV_SECTOR_SIZE
        self.backing = backing
        self.data_storage = data_storage or storage
        # Every guest data read and write of a host cluster (dataio.py).
        self.dataio = DataIO(self)
        self._bitmaps = None  # bitmap.PersistentBitmaps, made on first write (or by convert)
        self._closed = False
        if header.crypt_method == L.QCOW_CRYPT_LUKS and header.crypto_ext is None:
            raise InvalidImageError("Missing CRYPTO header for crypt method 2")
        # `encrypt` holds the node's encrypt.* options (no prefix), checked
        # against the header; the data of an encrypted image is read and
        # written through the cipher its secret unlocks, except when opened
        # for metadata only (info), which needs no key.
        from qimg.formats.qcow2 import encryption

        self.luks_volume = None  # the unlocked LUKS volume (encryption.open_cipher)
        encryption.check_open_options(header.crypt_method, encrypt or {})
        if header.crypt_method != L.QCOW_CRYPT_NONE and not metadata_only:
            self.dataio.cipher = encryption.open_cipher(self, secrets or {}, encrypt or {})
        if self.writable and header.corrupt:
            raise CorruptImageError("qcow2: Image is corrupt; cannot be opened read/write")
        _check_table_reads(header)
        if header.nb_snapshots:
            # QEMU's qcow2_do_open reads the snapshot table and refuses an
            # image whose table is out of bounds; so do we.
            from qimg.formats.qcow2.snapshot import read_snapshots

            read_snapshots(self)
        if header.bitmaps_ext is not None:
            # QEMU loads the bitmaps on open: a directory it cannot load
            # refuses the image, whatever the command.
            from qimg.formats.qcow2.bitmap import open_bitmaps

            open_bitmaps(self)
        self._overlap_map = None  # see overlap_map; rewrite_header needs it
        if self.writable and header.autoclear_features & ~L.QCOW2_AUTOCLEAR_MASK:
            # Unknown autoclear bits describe data we would not keep up to
            # date: QEMU clears them on a read-write open, and so do we.
            self.rewrite_header()
        # The refcount table and the L1 table are read on first use (numpy
        # too), so that `info` opens an image by its header alone.
        self._refcounts = None
        self._clusters = None
        # Whether a read has met compressed clusters (convert reads such
        # sources in parallel: decompression, not copying, is the work);
        # decryption is such work from the first read on, where the cipher
        # is `parallel` (XTS; CBC's measured slower on reader threads).
        cipher = self.dataio.cipher
        self.read_compressed = cipher is not None and cipher.parallel
        # Whether one read spreads its clusters' decompression over the
        # decompressor's threads; a caller that already reads from several
        # threads (convert's readers) turns it off: nested hand-offs only
        # cost wake-ups there.
        self.split_decompression = True
        # Whether allocated_extents asks the host file where data clusters
        # are holes, reporting them as zeros (QEMU's block status with
        # want_zero); off, they are data (its bdrv_is_allocated, which
        # commit asks).
        self.want_zero = True
        self._decompressor = None  # ClusterDecompressor, made on first use
        self._compressed_bufs: list[bytearray] = []  # reused by _read_compressed
        # readinto may run in several threads at once (convert's readers):
        # metadata lookups and the shared read state above are taken under
        # this lock; data I/O and decompression run outside it.
        self._read_lock = threading.Lock()
        self._host_runs: list[tuple[int, int]] | None = None  # see _host_data_runs
        self._marked_dirty = False
        self._signaled_corruption = False  # see signal_corruption

    @property
    def cluster_bytes(self) -> int:
        return self.geo.cluster_size

    @property
    def grain_bytes(self) -> int:
        return self.geo.subcluster_size if self.geo.extended_l2 else self.geo.cluster_size

    @property
    def compression_type(self) -> int:
        """The header's compression_type (zlib or zstd) of compressed clusters."""
        return self.header.compression_type

    @property
    def refcounts(self):
        """The Refcounts of this image (refcount.py), loaded on first use."""
        if self._refcounts is None:
            from qimg.formats.qcow2.refcount import Refcounts

            h = self.header
            self._refcounts = Refcounts(
                self, self.geo, h.refcount_table_offset, h.refcount_table_clusters
            )
        return self._refcounts

    @refcounts.setter
    def refcounts(self, value) -> None:
        self._refcounts = value

    @property
    def clusters(self):
        """The ClusterMap (L1 and L2 cache, cluster.py), loaded on first use."""
        if self._clusters is None:
            from qimg.formats.qcow2.cluster import ClusterMap

            h = self.header
            self._clusters = ClusterMap(
                self, self.geo, h.l1_table_offset, h.l1_size, h.has_data_file
            )
        return self._clusters

    @clusters.setter
    def clusters(self, value) -> None:
        self._clusters = value

    def over_l1(self, l1_offset: int, l1_size: int) -> Qcow2Image:
        """This image mapped through another L1 table (an internal
        snapshot's, `l1_size` entries at `l1_offset`), read-only. The view
        shares this image's files, header and backing chain (QEMU's
        qcow2_snapshot_load_tmp: the virtual size stays the image's);
        closing it closes none of them."""
        return _L1View(self, l1_offset, l1_size)

    # --- metadata I/O (used by refcount.py and cluster.py) -----------------------

    def read_metadata(self, offset: int, length: int) -> bytes:
        """Metadata bytes as QEMU reads them: past the end of the file they
        are zeros (a truncated image opens and converts); `length` is
        bounded by the caller (a cluster, or a table within QEMU's limits)."""
        return self.storage.pread(offset, length)

    def write_metadata(self, offset: int, data: bytes, kind: str) -> None:
        """Every metadata write passes the overlap check first."""
        self.check_overlap(offset, len(data), kind)
        self.storage.pwrite(offset, data)

    def flush_file(self) -> None:
        """The flush between two ordered metadata updates (the storage's
        cache mode decides what it does: nothing under unsafe)."""
        self.storage.flush()

    def set_refcount_table(self, offset: int, clusters: int) -> None:
        """Point the header at a new refcount table (one write, then flush)."""
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        data = (offset.to_bytes(8, "big")) + clusters.to_bytes(4, "big")
        self.storage.pwrite(L.HEADER_OFF_REFCOUNT_TABLE_OFFSET, data)
        self.flush_file()

    def metadata_regions(self) -> list[tuple[int, int, str]]:
        """(offset, length, kind) of every metadata structure (QEMU's overlap list)."""
        h = self.header
        cs = self.geo.cluster_size
        regions = [(0, cs, "header")]
        if h.l1_size:
            regions.append((self.clusters.l1_offset, self.clusters.l1_size * 8, "l1"))
        regions.append(
            (self.refcounts.table_offset, self.refcounts.table_clusters * cs, "refcount-table")
        )
        if h.nb_snapshots:
            regions.append((h.snapshots_offset, self._snapshot_table_size(), "snapshot-table"))
        if h.bitmaps_ext is not None and h.bitmaps_ext[1]:
            regions.append((h.bitmaps_ext[2], h.bitmaps_ext[1], "bitmap-directory"))
        regions.extend(self._inactive_l1_regions())
        return regions

    def _inactive_l1_regions(self) -> list[tuple[int, int, str]]:
        """QEMU's QCOW2_OL_INACTIVE_L1: each snapshot's L1 table, l1_size
        entries long (none where the snapshot table cannot be read: such an
        image is refused at open)."""
        if not self.header.nb_snapshots:
            return []
        from qimg.formats.qcow2.snapshot import read_snapshots

        try:
            snapshots, _size = read_snapshots(self)
        except QimgError:
            return []
        return [
            (s.l1_table_offset, s.l1_size * L.L1_ENTRY_SIZE, "inactive-l1")
            for s in snapshots
            if s.l1_size
        ]

    def _snapshot_table_size(self) -> int:
        from qimg.formats.qcow2.snapshot import snapshot_table_size

        return snapshot_table_size(self)

    def check_overlap(self, offset: int, length: int, kind: str) -> None:
        """QEMU's qcow2_pre_write_overlap_check: refuse a write that would
        land on other metadata, marking the image corrupt.

        A write that misses every region in the metadata map
        (`overlap_map`, kept up to date as tables come and go) passes at
        once; a hit is confirmed in full against the live tables before the
        write is refused.
        """
        if length <= 0:
            return
        if not self.overlap_map.may_overlap(offset, length, kind):
            return
        self._check_overlap_full(offset, length, kind)

    @property
    def overlap_map(self):
        """The OverlapMap (overlap.py) of this image, made on first use."""
        if self._overlap_map is None:
            from qimg.formats.qcow2.overlap import OverlapMap

            self._overlap_map = OverlapMap(self)
        return self._overlap_map

    def _check_overlap_full(self, offset: int, length: int, kind: str) -> None:
        end = offset + length
        from qimg.formats.qcow2.overlap import ignored

        for r_off, r_len, r_kind in self.metadata_regions():
            if ignored(kind, r_kind) or not r_len:
                continue
            if offset < r_off + r_len and r_off < end:
                self._overlap(r_kind, offset)
        import numpy as np

        cb = self.geo.cluster_bits
        first, last = offset >> cb, (end - 1) >> cb
        if kind != "refcount-block":
            blocks = (self.refcounts.table & np.uint64(L.REFT_OFFSET_MASK)) >> np.uint64(cb)
            if np.any((blocks >= first) & (blocks <= last) & (blocks != 0)):
                self._overlap("refcount-block", offset)
        if kind != "l2":
            l2s = (self.clusters.l1 & np.uint64(L.L1E_OFFSET_MASK)) >> np.uint64(cb)
            if np.any((l2s >= first) & (l2s <= last) & (l2s != 0)):
                self._overlap("l2", offset)

    def _overlap(self, region: str, offset: int) -> None:
        self.mark_corrupt()
        raise CorruptImageError(
            f"Preventing invalid write on metadata (overlaps with {OL_NAMES[region]}); "
            f"image marked as corrupt",
            offset,
        )

    def signal_corruption(self, message: str) -> None:
        """QEMU's qcow2_signal_corruption: report a corruption found while
        mapping, once per image; a writable image is marked corrupt."""
        if self._signaled_corruption:
            return
        self._signaled_corruption = True
        from qimg.errors import notice

        if self.writable and self.header.version >= 3:
            notice(
                f"qcow2: Marking image as corrupt: {message}; "
                "further corruption events will be suppressed"
            )
            self.mark_corrupt()
        else:
            notice(
                f"qcow2: Image is corrupt: {message}; "
                "further non-fatal corruption events will be suppressed"
            )

    def mark_corrupt(self) -> None:
        if self.writable and self.header.version >= 3:
            self.header.incompatible_features |= L.QCOW2_INCOMPAT_CORRUPT
            self._write_incompatible_features()

    def rewrite_header(self) -> None:
        """Write the whole header cluster from self.header (Header.pack keeps
        unknown extensions and compatible bits, drops unknown autoclear bits).

        Ordering: everything the new header points at is already on disk; the
        header is one write inside cluster 0, flushed before returning.
        """
        h = self.header
        data = h.pack(self.geo.cluster_size)
        h.autoclear_features &= L.QCOW2_AUTOCLEAR_MASK
        if self._overlap_map is not None:
            self._overlap_map.invalidate_regions()  # the header may locate new regions
        self.storage.pwrite(0, data.ljust(self.geo.cluster_size, b"\0"))
        self.storage.flush()

    def _write_incompatible_features(self) -> None:
        data = self.header.incompatible_features.to_bytes(8, "big")
        self.storage.pwrite(L.HEADER_OFF_INCOMPATIBLE_FEATURES, data)
        self.storage.flush()

    # --- the driver interface ----------------------------------------------------

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        read_through_chain(self, offset, view)

    def read_layer(self, offset: int, view: memoryview) -> list[tuple[int, memoryview]]:
        """Read what this image holds of guest [offset, offset+len(view))
        into `view`; the (offset, part of view) runs left to its backing file."""
        if not len(view):
            return []
        compressed: list[Extent] = []
        pending: list[tuple[int, memoryview]] = []
        for ext in self._extents(offset, len(view)):
            dst = view[ext.offset - offset : ext.offset - offset + ext.length]
            if ext.kind == DATA:
                self.dataio.read(ext.offset, ext.host, dst)
            elif ext.kind == ZERO:
                dst[:] = bytes(ext.length)
            elif ext.kind == UNALLOCATED:
                pending.append((ext.offset, dst))
            else:
                compressed.append(ext)
        if compressed:
            self._read_compressed(offset, view, compressed)
        return pending

    def _read_compressed(self, offset: int, view: memoryview, exts: list[Extent]) -> None:
        """Fill the parts of `view` (guest bytes from `offset`) that `exts`,
        compressed clusters, cover. Each worker decompresses a share of them
        straight into `view` (the calling thread takes one share)."""
        cs = self.geo.cluster_size
        spans = self._compressed_spans([ext.host for ext in exts])
        runs = _compressed_runs(spans)
        need = sum(hi - lo for lo, hi, _i, _j in runs)
        # Buffers kept between reads: fresh memory costs a page fault per
        # page. One is taken off the image while in use, so no two reads
        # share it.
        with self._read_lock:
            bufs = self._compressed_bufs
            buf = next((b for b in bufs if len(b) >= need), None)
            if buf is not None:
                bufs.remove(buf)
            decompressor = self._decompressor_for_reads()
            self.read_compressed = True
        if buf is None:
            buf = bytearray(need)
        try:
            raws = self._read_runs(memoryview(buf), spans, runs)
            jobs = []
            for ext, raw in zip(exts, raws):
                dst = view[ext.offset - offset : ext.offset - offset + ext.length]
                jobs.append((raw, dst, ext.offset & (cs - 1)))
            try:
                decompressor.decompress_into(jobs, split=self.split_decompression)
            except CorruptImageError:
                # qcow2_co_preadv_compressed: any decompression failure is EIO.
                raise ImageIOError("Input/output error") from None
            del raws, jobs
        finally:
            if len(buf) <= _COMPRESSED_BUF_KEEP:
                with self._read_lock:
                    if len(self._compressed_bufs) < _COMPRESSED_BUFS_KEPT:
                        self._compressed_bufs.append(buf)

    def _decompressor_for_reads(self):
        """One ClusterDecompressor for the image's life (closed in close())."""
        if self._decompressor is None:
            from qimg.formats.qcow2.compress import ClusterDecompressor

            self._decompressor = ClusterDecompressor(
                self.header.compression_type, self.geo.cluster_size
            )
        return self._decompressor

    def _compressed_spans(self, entries: list[int]) -> list[tuple[int, int]]:
        """[start, end) host bytes of each compressed cluster descriptor
        (QEMU's qcow2_parse_compressed_l2_entry). Not clamped to the end of
        the file: QEMU decompresses what lies there as zeros, and a stream
        cut short may still fill its cluster from them."""
        from qimg.formats.qcow2.entries import compressed_span

        return [compressed_span(entry, self.geo) for entry in entries]

    def _read_runs(self, buf: memoryview, spans: list, runs: list) -> list[memoryview]:
        """Each span's bytes as a view into `buf`, filled with one read per run."""
        out: list[memoryview] = []
        pos = 0
        for lo, hi, i, j in runs:
            piece = buf[pos : pos + hi - lo]
            self.dataio.read_compressed(lo, piece)  # past the end of file: zeros
            out.extend(piece[a - lo : b - lo] for a, b in spans[i:j])
            pos += hi - lo
        return out

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(view))
        if len(view):
            self._mark_dirty()
            self._bitmaps_written(offset, len(view))
            self.clusters.write(offset, view)

    def write_runs(self, runs: list[tuple[int, object]]) -> None:
        """Driver.write_runs: runs of whole clusters that no cluster of the
        image maps yet are placed together (ClusterMap.place_runs: one
        allocation and one L2 update per table, the data written run by
        run, _put_runs); the other runs go through write."""
        if not self._places_runs:
            super().write_runs(runs)
            return
        self._begin_runs(runs)
        for group in self.clusters.table_groups(runs):
            for offset, data in self.clusters.place_runs(group, self._put_runs):
                self.clusters.write(offset, memoryview(data).cast("B"))

    def _begin_runs(self, runs: list[tuple]) -> None:
        """The checks and marks of write() for each (offset, data, ...) run
        (data: bytes or their length, driver.run_bytes)."""
        self._check_writable()
        for offset, data, *_rest in runs:
            self._check_range(offset, run_bytes(data))
        self._mark_dirty()
        for offset, data, *_rest in runs:
            self._bitmaps_written(offset, run_bytes(data))

    @property
    def _places_runs(self) -> bool:
        """Whether runs of fresh clusters go to the host as they are, placed
        together (ClusterMap.place_runs): not through a cipher."""
        return self.dataio.cipher is None and self.clusters.can_place_runs

    def copies_from(self, source: Storage) -> bool:
        """Runs of fresh clusters are copied host to host (copy_runs)."""
        return self._places_runs and self.data_storage.can_copy_from(source)

    def copy_runs(self, runs: list[tuple[int, int, Storage, int]], scratch: memoryview) -> None:
        """Driver.copy_runs: runs of whole clusters that no cluster of the
        image maps yet are placed together (ClusterMap.place_shared), their
        bytes copied host to host (Storage.copy_from) before the L2 entries
        point at them; the other runs are read into `scratch` and go
        through write."""
        if not self._places_runs:
            super().copy_runs(runs, scratch)
            return
        self._begin_runs(runs)
        for group in self.clusters.table_groups(runs):
            rest = self.clusters.place_shared(group, self._copy_run)
            super().copy_runs(rest, scratch)

    def _copy_run(self, host: int, lengths: list[int], source: Storage, source_offset: int) -> None:
        """place_shared's put: the bytes `source` holds at `source_offset`
        to the new host clusters at `host` (overlap checked there)."""
        self.data_storage.copy_from(source, source_offset, host, sum(lengths))

    def _put_runs(self, host: int, runs: list[tuple[int, object]]) -> None:
        """The runs' data, one after another, to the new host clusters at
        `host` (overlap checked by place_runs): one write per run, as long
        as write() would make it. (One gathered pwritev of 4 MiB measured
        2-4x the system time of 1 MiB writes into ext4 on these VMs, in 4
        of 6 runs of convert's qcow2->qcow2: longer writes take larger page
        cache folios, which come from free memory the VM gave back to its
        host.)"""
        for _offset, data in runs:
            self.data_storage.pwrite(host, data)
            host += memoryview(data).nbytes

    def write_shared(self, offset: int, data, source: Storage, source_offset: int) -> bool | None:
        """write(), the data clusters it places whole (not widened by a
        copy-on-write) shared from `source` where the data file can."""
        io = self.dataio
        if io.shared is not False:
            io.shared = None
        io.share = (offset, len(memoryview(data).cast("B")), source, source_offset)
        try:
            self.write(offset, data)
        finally:
            io.share = None
        return io.shared

    def write_shared_runs(self, runs: list[tuple[int, object, Storage, int]]) -> bool | None:
        """Driver.write_shared_runs: runs of whole clusters that no cluster
        of the image maps yet are placed together (ClusterMap.place_shared:
        one allocation and one L2 update per table); any other run goes
        through write_shared."""
        io = self.dataio
        if io.shared is False or not self._places_runs:
            return super().write_shared_runs(runs)
        self._begin_runs(runs)
        io.shared = None
        for group in self.clusters.table_groups(runs):
            for offset, data, source, host in self.clusters.place_shared(group, self._share_run):
                before = io.shared
                if self.write_shared(offset, data, source, host) is not False and before:
                    io.shared = True
        return io.shared

    def _share_run(self, host: int, pieces: list, source: Storage, source_offset: int) -> None:
        """Guest bytes (`pieces` one after another, which `source` holds at
        `source_offset`) to the new host clusters at `host`: shared (with
        one clone for all where it can), or written where the data file
        cannot share (it is then not asked again)."""
        io = self.dataio
        storage = self.data_storage
        if len(pieces) > 1 and io.shared is not False:
            total = sum(memoryview(p).nbytes for p in pieces)
            shared = storage.clone_from(source, source_offset, host, total)
            if shared is not None:
                io.shared = shared
            if shared:
                return
        for data in pieces:
            n = memoryview(data).nbytes
            shared = None
            if io.shared is not False:
                shared = storage.share_from(source, source_offset, host, data)
                if shared is not None:
                    io.shared = shared
            if not shared:
                storage.pwrite(host, data)
            host += n
            source_offset += n

    def host_extents(self, offset: int, length: int) -> list[tuple[int, int, Storage, int]]:
        """Plain data clusters, through the backing chain (walked image by
        image); none of an encrypted image."""
        self._check_range(offset, length)
        out = self._down_chain(
            offset, length, Qcow2Image._host_layer, lambda node, off, n: node.host_extents(off, n)
        )
        if self.backing is not None:
            out.sort(key=lambda run: run[0])
        return out

    def _host_layer(self, offset: int, length: int) -> tuple[list, list[tuple[int, int]]]:
        """This image's host_extents runs, and the (offset, length) runs it
        leaves to its backing file."""
        if self.dataio.cipher is not None:
            return [], []
        out, pending = [], []
        for ext in self._extents(offset, length):
            if ext.kind == DATA:
                out.append((ext.offset, ext.length, self.data_storage, ext.host))
            elif ext.kind == UNALLOCATED:
                pending.append((ext.offset, ext.length))
        return out, pending

    def write_compressed(self, offset: int, compressed: bytes) -> None:
        """Store an already compressed cluster (see compress.compress_cluster)
        at the cluster-aligned guest `offset`, which must be unallocated."""
        self.write_compressed_many(offset, [compressed])

    def write_compressed_many(self, offset: int, compressed: list[bytes]) -> None:
        """Store already compressed clusters for consecutive guest clusters
        from the cluster-aligned `offset` on (all unallocated), packed as
        QEMU packs them one by one, with one data write per host run."""
        if not compressed:
            return
        self._check_writable()
        cs = self.geo.cluster_size
        self._check_range(offset + (len(compressed) - 1) * cs, 1)
        if offset % cs:
            raise QimgError("Compressed writes must be cluster aligned")
        if self.header.crypt_method:
            from qimg.formats.qcow2.encryption import refuse_compressed

            refuse_compressed(self)
        self._mark_dirty()
        self._bitmaps_written(offset, min(len(compressed) * cs, self.size - offset))
        self.clusters.write_compressed_many(offset, compressed)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if not length:
            return
        self._mark_dirty()
        self._bitmaps_written(offset, length)
        cs = self.geo.cluster_size
        head_end = min(offset + length, -(-offset // cs) * cs)
        tail_start = max(head_end, (offset + length) // cs * cs)
        if self.header.version < 3:
            self._write_zero_bytes(offset, length)
            return
        if head_end > offset:
            self._write_zero_bytes(offset, head_end - offset)
        if tail_start > head_end:
            self.clusters.zero_clusters(
                head_end, tail_start - head_end, unmap, self.backing is not None
            )
            self._zero_raw_data_file(head_end, tail_start)
        if offset + length > tail_start:
            self._write_zero_bytes(tail_start, offset + length - tail_start)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        chunk = 1 << 22
        zeros = bytes(min(length, chunk))
        while length:
            n = min(length, chunk)
            self.clusters.write(offset, zeros[:n])
            offset += n
            length -= n

    def discard(self, offset: int, length: int) -> None:
        """Release whole clusters in the range (QEMU's discard: partial
        clusters are left alone)."""
        self._check_writable()
        self._check_range(offset, length)
        if length:
            self._bitmaps_written(offset, length)  # QEMU marks the whole request
        cs = self.geo.cluster_size
        start = -(-offset // cs) * cs
        end = (offset + length) // cs * cs
        if offset + length == self.size:
            end = -(-self.size // cs) * cs
        if end <= start:
            return
        if self.header.version < 3 and self.backing is not None:
            return  # a v2 image cannot hide backing data without zero clusters
        self._mark_dirty()
        self.clusters.discard_clusters(start, end - start, self.backing is not None)
        self._zero_raw_data_file(start, end)

    def _zero_raw_data_file(self, start: int, end: int) -> None:
        """data_file_raw: the data file stays a raw image of the guest disk,
        so clusters that now read as zeros are zeroed there too (as QEMU
        passes zero writes and discards through to the data file)."""
        if not self.header.data_file_raw:
            return
        end = min(end, self.data_storage.size())
        if end > start:
            self.data_storage.punch_hole(start, end - start)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_range(offset, length)
        return self._extents(offset, length)

    def _extents(self, offset: int, length: int) -> list[Extent]:
        with self._read_lock:
            return self.clusters.extents(offset, length)

    def allocated_extents(self, offset: int, length: int) -> list[tuple[int, int, bool, bool]]:
        """(offset, length, is_data, is_zero) runs, with backing resolved.

        As QEMU's block status does, a data cluster's bytes that are a hole
        in the host file read as zeros without being read (qemu-img convert
        then leaves them sparse too). The backing chain is walked image by
        image, not recursively."""
        out = self._down_chain(
            offset,
            length,
            Qcow2Image._allocated_layer,
            lambda node, off, n: node.allocated_extents(off, n),
            past_end=lambda off, n: (off, n, False, True),
        )
        if self.backing is not None:
            out.sort()
        return out

    def _down_chain(self, offset: int, length: int, layer, whole, past_end=None) -> list:
        """The runs of `layer` (a method of a qcow2 image giving its own
        runs and the (offset, length) runs it leaves to its backing file)
        down the backing chain, image by image (no recursion); an image of
        another format answers with `whole(image, offset, length)` for all
        it is asked. What lies past the end of the chain (or of a shorter
        backing file) gives `past_end(offset, length)`'s run, or nothing."""
        out, pending = layer(self, offset, length)
        node = self.backing
        while pending:
            below: list[tuple[int, int]] = []
            for off, n in pending:
                avail = 0 if node is None else max(0, min(n, node.size - off))
                if avail < n and past_end is not None:
                    out.append(past_end(off + avail, n - avail))
                if not avail:
                    continue
                if isinstance(node, Qcow2Image):
                    got, rest = layer(node, off, avail)
                    out += got
                    below += rest
                else:
                    out += whole(node, off, avail)
            pending = below
            node = node.backing if isinstance(node, Qcow2Image) else None
        return out

    def _allocated_layer(self, offset: int, length: int) -> tuple[list, list[tuple[int, int]]]:
        """This image's allocated_extents runs, and the (offset, length)
        runs it leaves to its backing file."""
        out = []
        pending = []
        exts = self._extents(offset, length)
        data = [ext for ext in exts if ext.kind == DATA]
        runs = None
        if data and self.want_zero and self.dataio.host_holes_read_as_zeros:
            runs = self._host_data_runs(data)
        for ext in exts:
            if ext.kind == DATA and runs is not None:
                out.extend(_split_by_runs(ext, runs))
            elif ext.kind in (DATA, COMPRESSED):
                out.append((ext.offset, ext.length, True, False))
            elif ext.kind == ZERO:
                out.append((ext.offset, ext.length, False, True))
            elif self.backing is not None:
                pending.append((ext.offset, ext.length))
            else:
                out.append((ext.offset, ext.length, False, True))
        return out, pending

    def _host_data_runs(self, data: list[Extent]) -> list[tuple[int, int]] | None:
        """[start, end) runs of data in the host file, at least across the
        span that `data` extents map to; None if the file has no holes.
        One scan (SEEK_DATA / SEEK_HOLE) costs as much as the data it passes
        on tmpfs, so a read-only image scans its whole file once and keeps
        the runs (its file does not change: no writer can hold it); a
        writable one scans the span."""
        if not self.writable:
            with self._read_lock:
                if self._host_runs is None:
                    size = self.data_storage.size()
                    self._host_runs = self._scan_host(0, size) if self._host_has_holes() else []
                return self._host_runs or None
        if not self._host_has_holes():
            return None
        lo = min(ext.host for ext in data)
        hi = max(ext.host + ext.length for ext in data)
        return self._scan_host(lo, hi)

    def _scan_host(self, lo: int, hi: int) -> list[tuple[int, int]]:
        return [
            (start, start + n)
            for start, n, is_data in self.data_storage.data_extents(lo, hi - lo)
            if is_data
        ]

    def _host_has_holes(self) -> bool:
        """Whether the file holding data may have holes (fewer bytes
        allocated than its size); if not, no data cluster needs a look."""
        storage = self.data_storage
        try:
            return storage.allocated_size() < storage.size()
        except (OSError, QimgError):
            return False

    def start_writeback(self) -> None:
        """Guest data only (the tables stay in their caches until flush)."""
        self.data_storage.start_writeback()

    def stream_writes(self) -> None:
        """Guest data only: the tables go through the page cache."""
        self.data_storage.stream_writes()

    def flush(self) -> None:
        """Write every dirty table and make the file durable.

        Ordering: each cache writes the cache it depends on first (see
        cache.py); the L2 cache is flushed again because flushing refcounts
        may have dirtied nothing but may depend on L2 (a free). Only after
        the file is durable may freed clusters be reused.
        """
        if not self.writable:
            return
        clusters, refcounts = self._clusters, self._refcounts  # None: never loaded
        if clusters is not None:
            clusters.l2_cache.flush()
        if refcounts is not None:
            refcounts.blocks.flush()
        if clusters is not None:
            clusters.l2_cache.flush()
        self.storage.flush()
        if self.data_storage is not self.storage:
            self.data_storage.flush()
        if refcounts is not None:
            refcounts.frees_committed()

    def commit_frees(self) -> None:
        """Refcounts' request: make dropped references durable (a flush)."""
        self.flush()

    def close(self) -> None:
        if self._closed:
            return
        if self._decompressor is not None:
            self._decompressor.close()
            self._decompressor = None
        try:
            if self.writable:
                try:
                    if self._bitmaps is not None:
                        self._bitmaps.store()  # persistent bitmaps back, in-use cleared
                finally:
                    self.flush()
                if self._marked_dirty:
                    self.header.incompatible_features &= ~L.QCOW2_INCOMPAT_DIRTY
                    self._write_incompatible_features()
        finally:
            self._closed = True
            try:
                if self.data_storage is not self.storage:
                    self.data_storage.close()
                self.storage.close()
            finally:
                _close_chain(self.backing)

    # --- helpers -------------------------------------------------------------------

    def _bitmaps_written(self, offset: int, length: int) -> None:
        """Persistent dirty bitmaps (bitmap.py): mark the guest range
        [offset, offset + length) in enabled bitmaps before the write lands."""
        if self._bitmaps is None:
            if self.header.bitmaps_ext is None:
                return
            from qimg.formats.qcow2.bitmap import PersistentBitmaps

            self._bitmaps = PersistentBitmaps(self)
        self._bitmaps.mark_dirty(offset, length)

    def _mark_dirty(self) -> None:
        """Lazy refcounts: the dirty bit is set before the first write."""
        if self._marked_dirty or not self.header.lazy_refcounts:
            return
        self.header.incompatible_features |= L.QCOW2_INCOMPAT_DIRTY
        self._write_incompatible_features()
        self._marked_dirty = True

    @property
    def dirty(self) -> bool:
        return bool(self.header.dirty)

    def info(self) -> DriverInfo:
        from qimg.formats.qcow2.info import qcow2_info

        return qcow2_info(self)


def _check_table_reads(h: Header) -> None:
    """qcow2_do_open reads the L1 table, then the refcount table (qimg
    reads them on first use): fail the open where QEMU's block layer
    refuses those reads. Past the end of the file they read as zeros."""
    try:
        if h.l1_size:
            check_request(h.l1_table_offset, h.l1_size * L.L1_ENTRY_SIZE)
    except ImageIOError as exc:
        raise ImageIOError(f"Could not read L1 table: {exc}") from None
    try:
        if h.refcount_table_clusters:
            check_request(h.refcount_table_offset, h.refcount_table_clusters * h.cluster_size)
    except ImageIOError as exc:
        raise ImageIOError(f"Could not initialize refcount handling: {exc}") from None


# Largest read buffer _read_compressed keeps between reads (convert reads at
# most 2 MiB of guest data at a time, so its compressed bytes fit), and how
# many it keeps (one per reader thread of convert's, and spares).
_COMPRESSED_BUF_KEEP = 16 << 20
_COMPRESSED_BUFS_KEPT = 4


def _close_chain(node: Driver | None) -> None:
    """Close a backing chain image by image, not recursively: each qcow2
    image is detached from its backing file before it is closed."""
    error: BaseException | None = None
    while node is not None:
        below = node.backing if isinstance(node, Qcow2Image) else None
        if isinstance(node, Qcow2Image):
            node.backing = None
        try:
            node.close()
        except BaseException as exc:  # the rest of the chain is closed first
            error = error or exc
        node = below
    if error is not None:
        raise error


def _split_by_runs(ext: Extent, runs: list[tuple[int, int]]) -> list[tuple[int, int, bool, bool]]:
    """A data extent as (offset, length, is_data, is_zero) pieces: its host
    bytes inside `runs` (sorted [start, end) data runs) are data, the
    others a hole that reads as zeros."""
    out = []
    pos, end = ext.host, ext.host + ext.length
    i = bisect.bisect_right(runs, (pos, float("inf"))) - 1
    i = max(i, 0)
    while pos < end:
        while i < len(runs) and runs[i][1] <= pos:
            i += 1
        if i == len(runs) or runs[i][0] >= end:
            out.append((ext.offset + pos - ext.host, end - pos, False, True))
            break
        start, stop = runs[i]
        if start > pos:
            out.append((ext.offset + pos - ext.host, start - pos, False, True))
            pos = start
        n = min(stop, end) - pos
        out.append((ext.offset + pos - ext.host, n, True, False))
        pos += n
    return out


def _compressed_runs(spans: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(lo, hi, i, j): host ranges to read, one per run of nearby spans
    spans[i:j] (QEMU packs compressed clusters back to back)."""
    runs = []
    i = 0
    while i < len(spans):
        lo, hi = spans[i]
        j = i + 1
        # Extend the run while the next descriptor starts at or near the
        # end of this one, in increasing order, within 8 MiB.
        while (
            j < len(spans)
            and hi - 4096 <= spans[j][0] <= hi + 4096
            and spans[j][0] >= lo
            and max(hi, spans[j][1]) - lo <= 8 << 20
        ):
            hi = max(hi, spans[j][1])
            j += 1
        runs.append((lo, hi, i, j))
        i = j
    return runs


class _L1View(Qcow2Image):
    """See Qcow2Image.over_l1."""

    def __init__(self, image: Qcow2Image, l1_offset: int, l1_size: int):
        super().__init__(
            image.storage,
            backing=image.backing,
            data_storage=image.data_storage,
            header=image.header.copy(),
            metadata_only=True,
        )
        self.dataio.cipher = image.dataio.cipher  # the same key, another L1
        self.writable = False
        from qimg.formats.qcow2.cluster import ClusterMap

        self.clusters = ClusterMap(self, self.geo, l1_offset, l1_size, self.header.has_data_file)

    def close(self) -> None:
        # The files and the backing chain belong to the image viewed.
        if self._decompressor is not None:
            self._decompressor.close()
            self._decompressor = None
        self._closed = True
