"""The persistent block tables' diffs against a real block manager: after every step the device
rows the step reads equal the block manager's tables, through growth, copy-on-write of a shared
last block, forks, prefix hits, frees and re-admission, and row reclaiming."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mini_vllm.engine.block_manager import BlockManager
from mini_vllm.engine.block_table_rows import BlockTableRows

MAX_BLOCKS = 12
BLOCK = 4


class Device:
    """The GPU side, in numpy: persistent rows, diffs applied by flat index, a gather per step."""

    def __init__(self, rows: BlockTableRows, max_seqs: int) -> None:
        self.host = rows
        self.table = np.full((rows.num_rows, MAX_BLOCKS), -7, dtype=np.int32)  # -7: never sent
        self.rows = np.zeros(max_seqs, dtype=np.int64)
        self.index = np.zeros(max_seqs * MAX_BLOCKS, dtype=np.int64)
        self.values = np.zeros(max_seqs * MAX_BLOCKS, dtype=np.int32)
        self.sent = 0

    def step(self, tables: list[list[int]]) -> None:
        n = self.host.sync(tables, self.rows, self.index, self.values)
        self.sent += n
        self.table.reshape(-1)[self.index[:n]] = self.values[:n]
        gathered = self.table[self.rows[: len(tables)]]
        for t, got in zip(tables, gathered, strict=True):
            assert got[: len(t)].tolist() == t


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_rows", [8, 24], ids=["rows-reclaimed", "rows-spare"])
def test_rows_follow_the_block_manager(seed: int, num_rows: int) -> None:
    rng = random.Random(seed)
    bm = BlockManager(400, BLOCK, enable_prefix_caching=True, namespace="m")
    max_seqs = 8
    device = Device(BlockTableRows(num_rows, MAX_BLOCKS), max_seqs)
    tokens: dict[int, list[int]] = {}  # live sequence -> its tokens
    computed: dict[int, int] = {}
    next_id = 0
    prompts = [[rng.randrange(5) for _ in range(rng.randrange(1, 20))] for _ in range(4)]  # shared: prefix hits
    for _ in range(300):
        op = rng.random()
        if op < 0.15 and len(tokens) < max_seqs:  # admit (maybe re-admit a freed prompt: prefix hit)
            seq = next_id
            next_id += 1
            tokens[seq] = list(rng.choice(prompts)) + [rng.randrange(5) for _ in range(rng.randrange(3))]
            computed[seq] = bm.match_prefix(seq, tokens[seq])
        elif op < 0.22 and tokens:  # finish or preempt: the list goes; re-admission makes a new one
            seq = rng.choice(sorted(tokens))
            bm.free(seq)
            del tokens[seq], computed[seq]
        elif op < 0.3 and tokens and len(tokens) < max_seqs:  # fork (n > 1): a copy sharing every block
            parent = rng.choice(sorted(tokens))
            if bm.tables.get(parent):
                child = next_id
                next_id += 1
                bm.fork(parent, child)
                tokens[child], computed[child] = list(tokens[parent]), computed[parent]
        # A step: a random subset in a random order grows by a token or a chunk.
        scheduled = [s for s in tokens if rng.random() < 0.8]
        rng.shuffle(scheduled)
        step_tables = []
        for seq in scheduled:
            grow = 1 if rng.random() < 0.7 else rng.randrange(2, 9)
            want = min(len(tokens[seq]) + grow, MAX_BLOCKS * BLOCK)
            if bm.allocate(seq, want) is None:
                continue
            tokens[seq] += [rng.randrange(5) for _ in range(want - len(tokens[seq]))]
            computed[seq] = want
            bm.cache_full_blocks(seq, tokens[seq], want)
            step_tables.append(bm.tables[seq])
        if step_tables:
            device.step(step_tables)
    bm.check_invariants()
    assert next_id > 10 and device.sent > 0


def test_a_steady_decode_step_sends_only_new_blocks() -> None:
    rows = BlockTableRows(4, MAX_BLOCKS)
    device = Device(rows, 4)
    tables = [[1, 2, 3], [4], [5, 6]]
    device.step(tables)
    assert device.sent == 6
    tables[1].append(7)  # one sequence crossed a block boundary
    device.step(tables)
    assert device.sent == 7
    device.step([tables[2], tables[0]])  # another order, a sequence sitting out: nothing to send
    assert device.sent == 7
    tables[2][-1] = 9  # copy-on-write of the last block
    device.step(tables)
    assert device.sent == 8


def test_bad_sizes_are_refused() -> None:
    rows = BlockTableRows(2, 3)
    buf = np.zeros(16, dtype=np.int64)
    with pytest.raises(ValueError, match="exceeds the 2 table rows"):
        rows.sync([[1], [2], [3]], buf, buf, buf.astype(np.int32))
    with pytest.raises(ValueError, match="exceeds the 3 a row holds"):
        rows.sync([[1, 2, 3, 4]], buf, buf, buf.astype(np.int32))
    with pytest.raises(ValueError, match="at least one row"):
        BlockTableRows(0, 3)
