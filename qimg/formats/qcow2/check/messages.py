"""The check's messages, in the order QEMU's entry-by-entry walk prints them.

The L1/L2 walk handles whole tables (by kind of problem, each shared L2
table once), so its messages are collected with a sort key and printed in
QEMU's order once the walk ends:
  (w, -3) data file with snapshots   (w, -2) snapshot entry unusable
  (w, -1) the L1 table itself        (w, l1_index, k) L1 entry, k 0..2
  (w, l1_index, 3, l2_index, check)  L2 entry, checks in QEMU's order
where w is the walk (0 active, i + 1 snapshot i). Python's sort is stable:
messages with equal keys keep the order they were made in.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from qimg.formats.qcow2.check.result import CheckResult

# The checks of one L2 entry, in check_refcounts_l2's order.
L2_RESERVED, L2_FLAGS, L2_LAYOUT, L2_PAST_END, L2_UNALLOC = range(5)


class Namings(Protocol):
    def __call__(self, table: int) -> tuple[np.ndarray, np.ndarray]:
        """(walks, L1 indices) of the L1 entries naming distinct L2 table
        `table`, in QEMU's walk order."""
        ...


class Messages:
    """Where the check's lines go: straight to the result, or (during the
    walk) keyed for sorting."""

    def __init__(self, res: CheckResult):
        self.res = res
        # The walk's keyed messages; None outside a walk.
        self.walk: list[tuple[tuple, str]] | None = None
        # Messages about L2 entries of the current batch, (table, l2 index,
        # check, line, once), keyed by their namings when the batch ends;
        # `once` (repairs) for the first L1 entry naming the table only.
        self.tables: list[tuple[int, int, int, str, bool]] = []
        self.namings: Namings | None = None

    def say(self, line: str) -> None:
        self.res.messages.append(line)

    def say_at(self, key: tuple | None, line: str) -> None:
        if self.walk is None or key is None:
            self.say(line)
        else:
            self.walk.append((key, line))

    def begin_walk(self) -> None:
        self.walk = []

    def table_message(self, table: int, i: int, check: int, line: str, once: bool = False) -> None:
        """A message about entry i of distinct L2 table `table`, printed
        once per L1 entry naming the table (`once`: at the first only)."""
        self.tables.append((table, i, check, line, once))

    def expand_table_messages(self) -> None:
        """Key the table messages by the L1 entries naming each table, as
        QEMU walks a table once per naming."""
        pending, self.tables = self.tables, []
        if self.walk is None:
            self.res.messages.extend(m[3] for m in pending)
            return
        for table, i, check, line, once in pending:
            walks, indices = self.namings(table)
            for w, l1i in zip(walks.tolist(), indices.tolist()):
                self.walk.append(((w, l1i, 3, i, check), line))
                if once:
                    break

    def end_walk(self) -> None:
        """Print the walk's messages in QEMU's order (also on failure)."""
        self.expand_table_messages()
        pending, self.walk = self.walk, None
        if pending:
            pending.sort(key=lambda m: m[0])
            self.res.messages.extend(line for _key, line in pending)
