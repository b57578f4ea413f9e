"""The luks format: a LUKS1 volume in a file, as QEMU's block/crypto.c
"luks" driver reads and writes it (qimg.crypto.luks1 for the volume).

The guest disk is the payload: guest offset g is file offset
payload_offset + g, encrypted in 512-byte sectors numbered from the
payload's start. The virtual size is the file's length (whole sectors)
less the payload offset. Invariants:
- every write to the file is whole sectors of ciphertext: an unaligned
  guest write reads, decrypts and merges the sectors it touches;
- nothing reads as zeros without being written: there is no zero-init
  (`has_zero_init` False), no unmap and no block status (all data), as
  QEMU's driver has none of them;
- a node opened for metadata only (info) checks the header without a key.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from qimg.crypto import luks1
from qimg.crypto.sectors import ciphertext
from qimg.driver import DATA, Driver, DriverInfo, Extent
from qimg.errors import ImageIOError, QimgError
from qimg.storage import Storage

SECTOR_SIZE = luks1.SECTOR_SIZE
_ZERO_CHUNK = 4 << 20  # zeros are encrypted and written this much at a time


def open_luks(
    storage: Storage,
    options: Mapping[str, object],
    secrets: Mapping[str, bytes],
    *,
    metadata_only: bool = False,
) -> LuksImage:
    """The luks node over `storage`: the header checked, then (unless for
    metadata only) unlocked with the secret its `key-secret` option names,
    as block_crypto_open_generic does; the length checked last, as QEMU's
    refresh of the node's size."""
    from qimg.secrets import lookup_secret

    read = _reader(storage)
    if metadata_only:
        info = luks1.header_info(read(0, luks1.HEADER_SIZE))
        volume = None
    else:
        secret_id = options.get("key-secret")
        password = lookup_secret(
            secrets, None if secret_id is None else str(secret_id), "key-secret"
        )
        volume = luks1.unlock(read, password)
        info = volume.info
    payload = info["payload-offset"]
    length = -(-storage.size() // SECTOR_SIZE) * SECTOR_SIZE
    if payload > length:
        raise ImageIOError("Could not refresh total sector count: Input/output error")
    return LuksImage(storage, info, volume)


def _reader(storage: Storage):
    def read(offset: int, length: int) -> bytes:
        return storage.pread(offset, length)

    return read


class LuksImage(Driver):
    format_name = "luks"
    has_zero_init = False

    def __init__(self, storage: Storage, info: dict, volume: luks1.LuksVolume | None):
        self.storage = storage
        self.filename = storage.path
        self.writable = storage.writable
        self.payload_offset = info["payload-offset"]
        # QCryptoBlockInfoLUKS as the luks format reports it (qcow2's
        # "format" key belongs to its encrypt block only).
        self._info = {k: v for k, v in info.items() if k != "format"}
        self._volume = volume  # None: opened for metadata only
        self._cipher = volume.cipher() if volume is not None else None
        self._local = threading.local()
        length = -(-storage.size() // SECTOR_SIZE) * SECTOR_SIZE
        self.size = length - self.payload_offset
        # As an encrypted qcow2 image: decryption is the work of a read, so
        # convert reads in parallel on its readers (read_compressed) where
        # the cipher decrypts on several cores at once (XTS), and
        # those turn off split_decompression: each decrypts its own reads
        # in its own thread instead of handing them to the cipher's pool.
        self.read_compressed = self._cipher is not None and self._cipher.parallel
        self.split_decompression = True

    def _need_key(self) -> None:
        if self._cipher is None:
            raise QimgError("Parameter 'key-secret' is required for cipher")

    # --- reads and writes ---------------------------------------------------------

    def readinto(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        if not len(view):
            return
        self._need_key()
        head = offset % SECTOR_SIZE
        if not head and not len(view) % SECTOR_SIZE:
            data = ciphertext(self.storage, self.payload_offset + offset, view)
            self._cipher.decrypt(
                offset // SECTOR_SIZE, data, out=view, split=self.split_decompression
            )
            return
        start = offset - head
        span = -(-(head + len(view)) // SECTOR_SIZE) * SECTOR_SIZE
        plain = self._read_sectors(start, span)
        view[:] = memoryview(plain)[head : head + len(view)]

    def _read_sectors(self, start: int, length: int):
        """Plaintext of whole sectors [start, start+length); past the end
        of the file the ciphertext reads as zeros (as QEMU reads it)."""
        raw = self.storage.pread(self.payload_offset + start, length)
        if len(raw) < length:
            raw = bytes(raw).ljust(length, b"\0")
        return self._cipher.decrypt(start // SECTOR_SIZE, raw, split=self.split_decompression)

    def write(self, offset: int, data) -> None:
        self._check_writable()
        data = memoryview(data).cast("B")
        self._check_range(offset, len(data))
        if not len(data):
            return
        self._need_key()
        head = offset % SECTOR_SIZE
        tail = -(offset + len(data)) % SECTOR_SIZE
        if head or tail:
            # Read-modify-write of the sectors the request touches.
            start = offset - head
            span = head + len(data) + tail
            plain = bytearray(span)
            plain[:SECTOR_SIZE] = self._read_sectors(start, SECTOR_SIZE)
            if span > SECTOR_SIZE:
                plain[-SECTOR_SIZE:] = self._read_sectors(start + span - SECTOR_SIZE, SECTOR_SIZE)
            plain[head : head + len(data)] = data
            offset, data = start, memoryview(plain)
        scratch = self._write_buffer(len(data))
        self._cipher.encrypt(offset // SECTOR_SIZE, data, out=scratch)
        self.storage.pwrite(self.payload_offset + offset, scratch)

    def _write_buffer(self, size: int) -> memoryview:
        """This thread's ciphertext buffer, reused from write to write."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = bytearray(size)
        return memoryview(buf)[:size]

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zeros encrypted like any data (QEMU's driver cannot unmap)."""
        self._check_writable()
        self._check_range(offset, length)
        zeros = bytes(min(length, _ZERO_CHUNK))
        while length:
            n = min(length, len(zeros))
            self.write(offset, memoryview(zeros)[:n])
            offset += n
            length -= n

    def discard(self, offset: int, length: int) -> None:
        """QEMU's luks driver has no discard: nothing is done."""
        self._check_writable()
        self._check_range(offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """All data, with no host offset to report (QEMU's default block
        status for a driver without one)."""
        self._check_range(offset, length)
        return [Extent(DATA, offset, length, -1)] if length else []

    def allocated_extents(self, offset: int, length: int) -> list[tuple[int, int, bool, bool]]:
        return [(offset, length, True, False)] if length else []

    def truncate(self, size: int) -> None:
        """block_crypto_co_truncate: the file is the payload offset longer."""
        self._check_writable()
        self.storage.truncate(self.payload_offset + size)
        self.size = size

    def info(self) -> DriverInfo:
        return DriverInfo(
            virtual_size=self.size,
            actual_size=self.storage.allocated_size(),
            encrypted=True,
            format_specific={"type": "luks", "data": self._info},
        )

    def flush(self) -> None:
        if self.writable:
            self.storage.flush()

    def close(self) -> None:
        self.storage.close()

    # --- key slots ------------------------------------------------------------------

    def amend_keyslots(self, amend: luks1.LuksAmend, secrets: Mapping[str, bytes], force: bool):
        """qemu-img amend of a luks image: its key slots (luks1.amend_keyslots),
        the secrets named by id looked up where QEMU looks them up."""
        from qimg.secrets import lookup_secret

        self._check_writable()
        self._need_key()

        def secret(option: str, secret_id: str | None):
            if secret_id is None:
                return None
            return lambda: lookup_secret(secrets, secret_id, option)

        luks1.amend_keyslots(
            _reader(self.storage),
            self.storage.pwrite,
            self._volume.master_key,
            new_secret=secret("new-secret", amend.new_secret),
            old_secret=secret("old-secret", amend.old_secret),
            keyslot=amend.keyslot,
            state=amend.state,
            iter_time_ms=amend.iter_time_ms,
            force=force,
        )
        self._info = {
            k: v
            for k, v in luks1.header_info(self.storage.pread(0, luks1.HEADER_SIZE)).items()
            if k != "format"
        }

    # --- creation ---------------------------------------------------------------------


def create_luks(path: str, values: dict, secrets: Mapping[str, bytes]) -> None:
    """qemu-img create -f luks (block_crypto_co_create_opts_luks): the
    options checked, the file made of the header and key material and the
    payload's size (preallocated at the file level, as QEMU does: the
    preallocated area is not encrypted zeros); on failure nothing is left
    of a file that did not exist."""
    from qimg.secrets import lookup_secret
    from qimg.storage import create_storage, delete_storage, storage_exists

    prealloc = values.get("preallocation", "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise QimgError(f"invalid parameter value: {prealloc}")
    params = luks1.parse_luks_options({k: str(v) for k, v in values.items()}, "")
    size = -(-values["size"] // SECTOR_SIZE) * SECTOR_SIZE
    password = lookup_secret(secrets, values.get("key-secret"), "key-secret")
    luks1.check_params(params)
    volume, _ = luks1.format_volume(password, params)
    if size > (1 << 63) - 1 - len(volume):
        raise QimgError("The requested file size is too large")
    existed = storage_exists(path)
    storage = create_storage(path)
    try:
        total = len(volume) + size
        # The unused key slots' material stays a hole, as in QEMU's file.
        storage.pwrite(0, volume[: len(volume.rstrip(b"\0"))])
        if prealloc == "falloc" and size:
            storage.fallocate(len(volume), size)
        elif prealloc == "full" and size:
            from qimg.formats.qcow2.create import write_zeros

            write_zeros(storage, len(volume), size)
        storage.truncate(total)
        storage.flush()
    except BaseException:
        storage.close()
        if not existed:
            delete_storage(path)
        raise
    storage.close()
