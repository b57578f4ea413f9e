"""A bounded write-back cache of metadata tables (L2 tables, refcount blocks).

Tables are held decoded, as numpy arrays, keyed by host offset. Write
ordering lives here, as in QEMU's qcow2-cache.c: a cache may depend on
another, and then every dirty table of the other cache is written (and the
file flushed) before any of ours is written. Callers declare the dependency
instead of sequencing flushes:

- linking a new cluster into an L2 table: L2 depends on refcounts (the
  refcount must be durable before the pointer, so a crash can only leak);
- dropping a reference: refcounts depend on L2 (the pointer must be gone
  before the refcount falls, so a crash never frees a cluster in use).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np


class TableCache:
    """Tables of `table_bytes` bytes each, at most `max_bytes` held at once."""

    def __init__(
        self,
        name: str,
        table_bytes: int,
        read: Callable[[int], np.ndarray],
        write: Callable[[int, np.ndarray], None],
        flush_file: Callable[[], None],
        max_bytes: int = 32 << 20,
    ):
        self.name = name
        self.table_bytes = table_bytes
        self._read = read
        self._write = write
        self._flush_file = flush_file
        self.capacity = max(4, max_bytes // table_bytes)
        self.tables: OrderedDict[int, np.ndarray] = OrderedDict()
        self.dirty: set[int] = set()
        self.depends: TableCache | None = None
        # Tables written since this cache last had the file flushed behind
        # them (see _flush_dependency); may stay True after a flush made
        # elsewhere, which costs at most one extra flush.
        self.written = False

    def get(self, offset: int) -> np.ndarray:
        """The table at host `offset`, read from disk on a miss."""
        table = self.tables.get(offset)
        if table is not None:
            self.tables.move_to_end(offset)
            return table
        table = self._read(offset)
        self._insert(offset, table)
        return table

    def put_new(self, offset: int, table: np.ndarray) -> np.ndarray:
        """Install a table that exists only in memory so far; it is dirty."""
        self._insert(offset, table)
        self.dirty.add(offset)
        return table

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def set_dependency(self, other: TableCache) -> None:
        """`other` must be written out before any table of this cache.

        QEMU's qcow2_cache_set_dependency: dependencies never form a cycle.
        If `other` itself waits on a cache (typically on us: L2 waits on
        refcounts, and now refcounts are to wait on L2), that wait is
        settled first by writing and flushing what it waits on; a previous
        dependency of ours on a different cache is settled the same way.
        """
        if other.depends is not None:
            other._flush_dependency()
        if self.depends is not None and self.depends is not other:
            self._flush_dependency()
        self.depends = other

    def drop(self, offset: int) -> None:
        """Forget a table whose cluster was freed; it is never written."""
        self.tables.pop(offset, None)
        self.dirty.discard(offset)

    def flush(self) -> None:
        """Write every dirty table, after the tables this cache depends on."""
        self._flush_dependency()
        for offset in sorted(self.dirty):
            self._write(offset, self.tables[offset])
            self.written = True
        self.dirty.clear()

    def invalidate(self) -> None:
        """Drop every clean and dirty table (after a rewrite behind the cache)."""
        self.tables.clear()
        self.dirty.clear()

    def _flush_dependency(self) -> None:
        dep = self.depends
        if dep is not None:
            self.depends = None
            if dep.dirty:
                dep.flush()
            if dep.written:
                # Ordering: the tables we depend on must be durable first,
                # also when they were written before (by their own flush or
                # an eviction) with no file flush since: as in QEMU's
                # qcow2_cache_flush_dependency, which always flushes the file.
                # Without it, Qcow2Image.flush wrote L2 tables and then the
                # refcount blocks that depend on them in one flush window,
                # and power loss could keep a lowered refcount but lose the
                # L2 entry that stopped pointing at the cluster.
                self._flush_file()
                dep.written = False

    def _insert(self, offset: int, table: np.ndarray) -> None:
        self.tables[offset] = table
        self.tables.move_to_end(offset)
        while len(self.tables) > self.capacity:
            victim = next(iter(self.tables))
            if victim in self.dirty:
                self._flush_dependency()
                self._write(victim, self.tables[victim])
                self.written = True
                self.dirty.discard(victim)
            del self.tables[victim]
