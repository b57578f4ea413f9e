"""Opening images: probe the format, open the storage, read the header,
resolve and open backing chains and data files.

Below qimg.api (which adds the repair of a dirty image opened read-write)
and beside it for the library's own users (create, check, info), so that
nothing here imports back up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from qimg.driver import Driver
from qimg.errors import BackingChainError, BadOptionError, QimgError
from qimg.formats.qcow2 import layout as L
from qimg.storage import Storage, open_storage

FORMATS = ("qcow2", "raw", "qcow", "luks")


def probe_format(path: str) -> str:
    """'qcow' where the file starts with the qcow magic and version 1
    (QEMU's older format), 'qcow2' where it starts with the same magic and
    another version but 0, else 'raw'."""
    storage = open_storage(path, lock=False)
    try:
        return _probe(storage)
    finally:
        storage.close()


def _probe(storage: Storage) -> str:
    head = storage.pread(0, 8) if storage.size() >= 8 else b""
    if head == b"LUKS\xba\xbe\0\x01":  # block_crypto_probe_luks: LUKS version 1
        return "luks"
    if int.from_bytes(head[:4], "big") != L.QCOW_MAGIC:
        return "raw"
    # QEMU's qcow2_probe wants version >= 2 and qcow_probe version 1; with
    # version 0 no driver claims the file and it is raw.
    version = int.from_bytes(head[4:], "big")
    return "raw" if version == 0 else "qcow" if version == 1 else "qcow2"


def probed_raw_warning(path: str) -> str | None:
    """QEMU's warning on opening a probed raw image read-write; None where
    the file is not raw or cannot be probed (the open then fails in its own
    words)."""
    try:
        probed = probe_format(path)
    except QimgError:
        return None
    return probed_raw_text(path) if probed == "raw" else None


def probed_raw_text(name: str) -> str:
    """The words of that warning (printed as they are, whatever the
    program's name, even with -q)."""
    return (
        f"WARNING: Image format was not specified for '{name}' and probing guessed raw.\n"
        "         Automatically detecting the format is dangerous for raw images, "
        "write operations on block 0 will be restricted.\n"
        "         Specify the 'raw' format explicitly to remove the restrictions.\n"
    )


def resolve_backing_path(image_path: str, backing: str) -> str:
    """QEMU's bdrv_get_full_backing_filename: a relative backing file name
    is relative to the directory of the image that names it (`json:` and
    `file:` names are taken as they are; see qimg.filenames)."""
    from qimg.filenames import full_backing_filename, parse_filename

    return full_backing_filename(parse_filename(image_path).path, backing)


def open_image(
    path: str,
    fmt: str | None = None,
    *,
    writable: bool = False,
    force_share: bool = False,
    backing: bool = True,
    cache_unsafe: bool = False,
    lock: bool = True,
    data_file: bool = True,
    storage_wrapper: Callable[[Storage], Storage] | None = None,
    secrets: Mapping[str, bytes] | None = None,
) -> Driver:
    """Open an image; with `backing`, its whole backing chain too.

    `path` is a file name as qemu-img takes it: a path, `file:PATH`, or a
    `json:{...}` pseudo-filename (qimg.filenames), whose node options
    (encrypt.key-secret, ...) name secrets in `secrets` (by id, as
    qimg.secrets.parse_objects gives them); so are backing file
    names read from images. Raises a QimgError subclass with qemu-img's wording on failure.
    `data_file=False` opens for metadata only (QEMU's BDRV_O_NO_IO, as
    `info` does): an external data file is not opened.
    `storage_wrapper`, when given, wraps this image's own storage (not its
    backing files or data file) before the driver sees it: the place to
    inject crashes (qimg.faults.FaultyStorage) or observe I/O.

    A dirty qcow2 image (lazy refcounts) opened writable is returned as it
    is: qimg.api.open_image repairs it, as QEMU's open does; qemu-img check
    opens it unrepaired.
    """
    if fmt is not None and fmt not in FORMATS:
        raise BadOptionError(f"Unknown driver '{fmt}'")
    node = _open_node(
        path, fmt, writable, force_share, lock, data_file, storage_wrapper, backing, secrets
    )
    try:
        below = None
        if backing and node.open_backing and node.header is not None:
            below = open_backing_chain(
                node.path,
                node.header,
                writable=writable,
                force_share=force_share,
                cache_unsafe=cache_unsafe,
                lock=lock,
                data_file=data_file,
                secrets=secrets,
                options=node.backing_options,
            )
        return node.build(below, cache_unsafe)
    except BaseException:
        node.close()
        raise


def open_backing_chain(
    image_path: str,
    header,
    *,
    writable: bool = False,
    force_share: bool = False,
    cache_unsafe: bool = False,
    lock: bool = True,
    data_file: bool = True,
    secrets: Mapping[str, bytes] | None = None,
    options: Mapping[str, object] | None = None,
) -> Driver | None:
    """Open the backing chain below the qcow2 image at `image_path` whose
    header is `header`; None if it names no backing file. `options` are
    the node options the image's opener gave its backing file (its
    `backing.KEY` options, prefix dropped), `secrets` the secrets they
    and json: backing names may name.

    The chain is walked iteratively (no recursion per element: qemu-img
    opens chains of thousands), then built bottom-up. An error opening the
    image k levels down reads as qemu-img's does: k times "Could not open
    backing file: " before what went wrong there. A qcow2 image met twice
    in the chain is a loop, refused with qemu-img info --backing-chain's
    words (qemu-img check and convert recurse until memory runs out).
    """
    from qimg.filenames import parse_filename

    nodes: list[_Node] = []
    seen = {os.path.realpath(parse_filename(image_path).path)}
    parent_path, parent = image_path, header
    # Backing files are opened read-only and shared, as QEMU's
    # bdrv_backing_options does, unless the top is opened with -U anyway.
    share = True if not writable else force_share
    given = dict(options or {})
    try:
        while parent is not None and parent.backing_file:
            depth = len(nodes) + 1
            path = resolve_backing_path(parent_path, parent.backing_file)
            try:
                node = _open_node(
                    path, parent.backing_format, False, share, lock, data_file,
                    secrets=secrets, given=given,
                )  # fmt: skip
            except QimgError as exc:
                raise BackingChainError(_backing_prefix(depth) + str(exc)) from None
            nodes.append(node)
            if node.header is not None:
                real = os.path.realpath(node.path)
                if real in seen:
                    raise BackingChainError(
                        _backing_prefix(depth - 1)
                        + f"Backing file '{path}' creates an infinite loop."
                    )
                seen.add(real)
            parent_path, parent = node.path, node.header if node.open_backing else None
            given = node.backing_options
        below = None
        while nodes:
            try:
                below = nodes[-1].build(below, cache_unsafe)
            except QimgError as exc:
                # e.g. an encrypted backing file unlocked as it is built
                raise BackingChainError(_backing_prefix(len(nodes)) + str(exc)) from None
            nodes.pop()
        return below
    except BaseException:
        for node in nodes:
            node.close()
        raise


def node_encrypt_options(options: Mapping[str, object]) -> dict[str, object]:
    """The `encrypt.*` options of a node's options, prefix dropped."""
    n = len("encrypt.")
    return {k[n:]: v for k, v in options.items() if k.startswith("encrypt.")}


def _backing_prefix(depth: int) -> str:
    return "Could not open backing file: " * depth


class _Node:
    """One image of a chain, opened but not yet tied to its backing file:
    its storage, its qcow2 header (None for raw) and its data file."""

    def __init__(
        self, path: str, fmt: str, storage: Storage, header, data_storage, open_backing=True
    ):
        self.path = path  # the host file (a json: or file: name resolved)
        self.open_backing = open_backing  # false where a json: name says "backing": null
        self.fmt = fmt
        self.storage = storage
        self.header = header
        self.data_storage = data_storage
        # Opened for metadata only (QEMU's BDRV_O_NO_IO, as info opens):
        # no data file, and an encrypted image opens without its key.
        self.metadata_only = False
        # The node's own options (qimg.filenames.NODE_OPTIONS: the
        # encryption ones, e.g. {"encrypt.key-secret": "s"}), the secrets
        # they name, and the options given for its backing file.
        self.options: dict[str, object] = {}
        self.secrets: Mapping[str, bytes] = {}
        self.backing_options: dict[str, object] = {}
        # The json: name QEMU gives a node opened with a key-secret.
        self.filename: str | None = None

    def encrypt_options(self) -> dict[str, object]:
        """A qcow2 node's `encrypt.*` options, prefix dropped
        ({"key-secret": "s", "format": "luks"})."""
        return node_encrypt_options(self.options)

    def build(self, backing: Driver | None, cache_unsafe: bool) -> Driver:
        """The driver over this node, reading through `backing`, named as
        QEMU names it. On failure `backing` is closed (the caller closes
        this node)."""
        image = self._build(backing, cache_unsafe)
        if self.filename is not None:
            image.filename = self.filename
        return image

    def _build(self, backing: Driver | None, cache_unsafe: bool) -> Driver:
        try:
            if self.fmt == "luks":
                from qimg.formats.luks import open_luks

                return open_luks(
                    self.storage, self.options, self.secrets, metadata_only=self.metadata_only
                )
            if self.header is None:
                from qimg.formats.raw import RawImage

                return RawImage(self.storage)
            if self.fmt == "qcow":
                from qimg.formats.qcow import QcowImage

                return QcowImage(
                    self.storage,
                    self.header,
                    backing,
                    metadata_only=self.metadata_only,
                    secrets=self.secrets,
                    encrypt=self.encrypt_options(),
                )
            from qimg.formats.qcow2.image import Qcow2Image

            image = Qcow2Image(
                self.storage,
                backing=backing,
                data_storage=self.data_storage,
                header=self.header,
                cache_unsafe=cache_unsafe,
                metadata_only=self.metadata_only,
                secrets=self.secrets,
                encrypt=self.encrypt_options(),
            )
            if self.metadata_only and self.header.crypt_method:
                # qcrypto_block_open's header checks (QCRYPTO_BLOCK_OPEN_NO_IO)
                # are part of the open, key or not.
                from qimg.formats.qcow2.info import encrypt_info

                encrypt_info(image)
            return image
        except BaseException:
            if backing is not None:
                backing.close()
            raise

    def close(self) -> None:
        if self.data_storage is not None:
            self.data_storage.close()
        self.storage.close()


def _open_node(
    path: str,
    fmt: str | None,
    writable: bool,
    force_share: bool,
    lock: bool,
    data_file: bool,
    storage_wrapper: Callable[[Storage], Storage] | None = None,
    opens_backing: bool = True,
    secrets: Mapping[str, bytes] | None = None,
    given: Mapping[str, object] | None = None,
) -> _Node:
    """Open one image file (and its data file), not its backing file.
    `path` may be a `file:` or `json:` name (qimg.filenames); `given`
    are node options its parent gave it (they override the name's)."""
    name = _named_node(path, given)
    node = _open_file_node(
        name, fmt or name.fmt, writable, force_share, lock, data_file, storage_wrapper
    )
    try:
        _take_options(node, name, opens_backing, secrets)
    except BaseException:
        node.close()
        raise
    return node


def _named_node(path: str, given: Mapping[str, object] | None):
    from qimg.filenames import parse_filename

    name = parse_filename(path)
    if given:
        name = name._replace(options={**name.options, **given})
    return name


def _take_options(node: _Node, name, opens_backing: bool, secrets) -> None:
    """Give the node its options, once its format is known (a probed
    format's options are checked here), and the secrets they name."""
    from qimg.filenames import check_node_options, node_filename

    own = name.own_options()
    backing_opened = opens_backing and node.open_backing and node.header is not None
    check_node_options(node.fmt, name.options, backing_opened)
    if node.fmt == "qcow2":
        # As qcow2_open, before the backing file is opened.
        from qimg.formats.qcow2.encryption import check_open_options

        check_open_options(node.header.crypt_method, node_encrypt_options(own))
    node.options = own
    node.backing_options = name.backing_options()
    node.secrets = secrets if secrets is not None else {}
    node.filename = node_filename(name, node.fmt)


def check_qcow2_options(header, name, backing_opened: bool) -> None:
    """The checks of a qcow2 node's options (qimg.filenames.ImageName)
    that opening makes, for an opener that builds the image itself
    (qemu-img check's)."""
    from qimg.filenames import check_node_options
    from qimg.formats.qcow2.encryption import check_open_options

    check_node_options("qcow2", name.options, backing_opened)
    check_open_options(header.crypt_method, node_encrypt_options(name.own_options()))


def _open_file_node(
    name,
    fmt: str | None,
    writable: bool,
    force_share: bool,
    lock: bool,
    data_file: bool,
    storage_wrapper: Callable[[Storage], Storage] | None,
) -> _Node:
    path = name.path
    if fmt is not None and fmt not in FORMATS:
        # A backing format read from an image, or one a json: name gives.
        raise BadOptionError(f"Unknown driver '{fmt}'")
    masks = _lock_masks(fmt, writable, force_share) if fmt else None
    # QEMU's order: the file opened (read-write if asked), its format
    # probed, then the permissions locked.
    storage = open_storage(path, writable, lock=False)
    try:
        fmt = fmt or _probe(storage)
        if lock:
            storage.lock(writable, force_share, *(masks or _lock_masks(fmt, writable, force_share)))
    except BaseException:
        storage.close()
        raise
    if storage_wrapper is not None:
        storage = storage_wrapper(storage)
    if fmt in ("raw", "luks"):
        node = _Node(path, fmt, storage, None, None, name.open_backing)
        node.metadata_only = not data_file  # luks: the header, without a key
        return node
    if fmt == "qcow":
        node = _qcow_node(path, storage, name.open_backing, not data_file)
        node.metadata_only = not data_file
        return node
    try:
        header = _read_header(storage)
        data_storage = open_data_file(header, writable, force_share, lock) if data_file else None
    except BaseException:
        storage.close()
        raise
    node = _Node(path, fmt, storage, header, data_storage, name.open_backing)
    node.metadata_only = not data_file
    return node


def _qcow_node(path: str, storage: Storage, open_backing: bool, metadata_only: bool) -> _Node:
    """A qcow (version 1) image: no data file; qimg reads it only (opened
    writable, as check -r opens it, its driver refuses writes)."""
    from qimg.formats.qcow import QcowHeader

    try:
        header = QcowHeader.read(storage, metadata_only)
    except BaseException:
        storage.close()
        raise
    return _Node(path, "qcow", storage, header, None, open_backing)


def _read_header(storage: Storage):
    from qimg.formats.qcow2.header import Header

    size = storage.size()
    first = storage.pread(0, min(size, 1 << L.MAX_CLUSTER_BITS))
    return Header.parse(first, size)


def open_data_file(
    header, writable: bool = False, force_share: bool = False, lock: bool = True
) -> Storage | None:
    """The external data file a qcow2 header names, opened; None if none.

    QEMU opens the data file by the name as written (relative to the
    working directory, not to the image)."""
    if not header.has_data_file:
        if header.data_file_raw:
            raise QimgError("data-file-raw requires a data file")
        return None
    if header.data_file is None:
        raise QimgError("'data-file' is required for this image")
    if not header.data_file:
        raise QimgError("The 'file' block driver requires a file name")
    return open_storage(header.data_file, writable, force_share=force_share, lock=lock)


def _lock_masks(fmt: str, writable: bool, force_share: bool) -> tuple[int | None, int | None]:
    """The (perm, shared) masks to lock for a format: raw passes qemu-img's
    own through; None for a format with metadata (the default masks)."""
    if fmt != "raw":
        return None, None
    from qimg.locking import image_perms

    return image_perms(writable, force_share, metadata=False)
