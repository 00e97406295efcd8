"""The GPU runner's persistent block tables: rows kept on the device, sent as diffs.

Copying every sequence's whole block table to the device each step costs the host a Python loop
over every block of the batch (~0.4 ms at 256 sequences of 40 blocks). The tables barely change
between steps: a decode step adds one block to a sixteenth of its sequences. So the device keeps
one row per live table, and each step the host sends only the entries the device lacks, plus
which row each of the step's sequences reads (a gather on the device builds the step's table).

A table is known by its identity: the block manager appends to a sequence's list as it grows,
may replace the list's last entry (copy-on-write of a shared last block), and makes a new list
when a sequence gets blocks afresh (admission, a prefix hit, after preemption, a fork's copy).
So a row remembers how many entries it sent and the last one: an entry past them is new, and a
changed last entry was copied on write. Rows hold a reference to their list, so that its
identity cannot be reused while the row lives; a row not used by a step is reclaimed only when
free rows run out.
"""

from __future__ import annotations

import attrs
import numpy as np


@attrs.define(slots=True)
class _Row:
    table: list[int]  # the block manager's list (held: its id() stays unique while the row lives)
    index: int  # the row on the device
    synced: int  # entries the device has
    last: int  # the device's copy of entry synced - 1
    step: int  # the last step that used the row


class BlockTableRows:
    """Host bookkeeping of ``num_rows`` device rows of ``max_blocks`` entries each."""

    def __init__(self, num_rows: int, max_blocks: int) -> None:
        if num_rows < 1 or max_blocks < 1:
            raise ValueError(f"need at least one row and one block per row, got {num_rows} x {max_blocks}")
        self.num_rows, self.max_blocks = num_rows, max_blocks
        self._rows: dict[int, _Row] = {}  # id(table) -> its row
        self._free = list(range(num_rows - 1, -1, -1))
        self._step = 0

    def sync(self, tables: list[list[int]], rows: np.ndarray, flat_index: np.ndarray, values: np.ndarray) -> int:
        """For the step's ``tables`` (at most ``num_rows``), write each one's device row into
        ``rows[i]`` and the entries the device lacks into ``flat_index`` (row * max_blocks +
        column) and ``values``; returns how many entries were written there."""
        if len(tables) > self.num_rows:
            raise ValueError(f"a step of {len(tables)} sequences exceeds the {self.num_rows} table rows")
        self._step += 1
        step, width, known = self._step, self.max_blocks, self._rows
        n = 0
        for i, table in enumerate(tables):
            row = known.get(id(table))
            if row is None:
                row = self._new_row(table)
            size = len(table)
            if size > width:
                raise ValueError(f"a block table of {size} blocks exceeds the {width} a row holds")
            start = row.synced
            if start > size:  # lists only grow; re-send a list that did not, whole
                start = 0
            elif start and table[start - 1] != row.last:  # the last entry was copied on write
                start -= 1
            if start < size:
                base = row.index * width
                end = n + size - start
                flat_index[n:end] = range(base + start, base + size)
                values[n:end] = table[start:size]
                n = end
                row.synced, row.last = size, table[size - 1]
            row.step = step
            rows[i] = row.index
        return n

    def _new_row(self, table: list[int]) -> _Row:
        if not self._free:
            self._reclaim()
        row = _Row(table, self._free.pop(), 0, -1, self._step)
        self._rows[id(table)] = row
        return row

    def _reclaim(self) -> None:
        """Free every row the current step has not used (their sequences left, or sit out)."""
        for key, row in list(self._rows.items()):
            if row.step != self._step:
                del self._rows[key]
                self._free.append(row.index)
        if not self._free:
            raise RuntimeError("every table row is in use by this step")  # sync's size check prevents it

    def clear(self) -> None:
        self._rows.clear()
        self._free = list(range(self.num_rows - 1, -1, -1))
