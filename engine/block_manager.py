"""The block allocator: ref-counted KV blocks, automatic prefix caching, copy-on-write forks.

A pure policy over block *ids*; it never touches the KV tensors. The model runner performs the
copies it asks for (copy-on-write) before the step that needs them.

Prefix caching: a full block is identified by a chained hash of (namespace, parent block's hash,
the block's token ids), so equal hashes mean equal whole prefixes. A block whose last holder is
gone keeps its contents and its hash and waits in an LRU queue; a later request with the same
prefix takes it back instead of recomputing it, and allocation evicts the least recently used
such block only when no never-used block is left. Every hit is verified against the stored tokens
and parent, so a hash collision can only cost a miss, never wrong output.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import attrs

from mini_vllm.engine.errors import ConfigError


@attrs.frozen
class BlockStats:
    num_blocks: int
    block_size: int
    free_blocks: int  # never used or evicted: hold nothing
    cached_blocks: int  # unreferenced but holding a reusable prefix (evictable)
    used_blocks: int  # referenced by at least one sequence
    prefix_queries: int  # full prompt blocks looked up
    prefix_hits: int  # of which found in the cache
    evictions: int

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


@attrs.define
class _CachedBlock:
    parent: int | None
    tokens: tuple[int, ...]


class BlockManager:
    """Owns the block ids of one model's KV cache. Sequences are named by integer ids."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, namespace: str) -> None:
        if num_blocks < 1:
            raise ConfigError(f"the KV cache needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._namespace = hash(namespace)
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._block_hash: list[int | None] = [None] * num_blocks
        self._content: dict[int, _CachedBlock] = {}  # block id -> what its hash stands for
        self._by_hash: dict[int, int] = {}  # hash -> block id
        self.tables: dict[int, list[int]] = {}  # seq id -> block ids, in order
        self._hashes: dict[int, list[int]] = {}  # seq id -> hashes of its leading full blocks
        self._queries = 0
        self._hits = 0
        # A lookup counts once its sequence is admitted (allocation succeeds); a lookup undone by
        # a failed admission and retried later would otherwise count its hits again and again.
        self._pending_lookup: dict[int, tuple[int, int]] = {}
        self._evictions = 0

    # ---- queries -------------------------------------------------------------------------------
    def statistics(self) -> BlockStats:
        return BlockStats(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            free_blocks=len(self._free),
            cached_blocks=len(self._evictable),
            used_blocks=self.num_blocks - len(self._free) - len(self._evictable),
            prefix_queries=self._queries,
            prefix_hits=self._hits,
            evictions=self._evictions,
        )

    @property
    def num_available(self) -> int:
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """New blocks ``seq_id`` needs to hold ``num_tokens`` tokens, copy-on-write included."""
        table = self.tables.get(seq_id, [])
        need = max(0, -(-num_tokens // self.block_size) - len(table))
        return need + (1 if self._needs_cow(seq_id, num_tokens) else 0)

    def _needs_cow(self, seq_id: int, num_tokens: int) -> bool:
        # The block that the next write lands in is shared (after a fork): it must be copied.
        table = self.tables.get(seq_id)
        if not table:
            return False
        return self._ref[table[-1]] > 1 and num_tokens > (len(table) - 1) * self.block_size and self._last_is_partial(seq_id)

    def _last_is_partial(self, seq_id: int) -> bool:
        return len(self._hashes.get(seq_id, ())) < len(self.tables[seq_id])

    # ---- allocation ----------------------------------------------------------------------------
    def _take_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self._evictions += 1
        self._ref[block] = 1
        return block

    def _forget(self, block: int) -> None:
        h = self._block_hash[block]
        if h is not None:
            self._block_hash[block] = None
            self._content.pop(block, None)
            if self._by_hash.get(h) == block:
                del self._by_hash[h]

    def _chain(self, parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((self._namespace, parent, tokens))

    def match_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Attach cached blocks of a new sequence's longest cached prefix; returns tokens covered.

        The last token is never taken from the cache: its logits are needed to sample.
        """
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        self.tables[seq_id] = []
        self._hashes[seq_id] = []
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        parent: int | None = None
        full_blocks = (len(token_ids) - 1) // bs
        for i in range(full_blocks):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = self._chain(parent, tokens)
            block = self._by_hash.get(h)
            content = self._content.get(block) if block is not None else None
            if content is None or content.tokens != tokens or content.parent != parent:
                break
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
            self.tables[seq_id].append(block)
            self._hashes[seq_id].append(h)
            parent = h
        # Every full prompt block is one query (the hit rate is per block); the rest are misses.
        self._pending_lookup[seq_id] = (full_blocks, len(self.tables[seq_id]))
        return len(self.tables[seq_id]) * bs

    def fits(self, seq_id: int, num_tokens: int) -> bool:
        """``seq_id``'s blocks already hold ``num_tokens`` and its next write needs no copy, so
        ``allocate`` would change nothing: the common decode step, which needs no list of copies."""
        table = self.tables.get(seq_id)
        if not table or num_tokens > len(table) * self.block_size:
            return False
        # A shared last block (after a fork) may need copying; a pending prefix lookup is counted by allocate.
        return self._ref[table[-1]] == 1 and seq_id not in self._pending_lookup

    def allocate(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]] | None:
        """Grow ``seq_id``'s table to hold ``num_tokens``; None (and no change) if blocks run out.

        Returns the (source, destination) block copies that copy-on-write requires.
        """
        table = self.tables.get(seq_id)
        if table is not None and num_tokens <= len(table) * self.block_size and not self._needs_cow(seq_id, num_tokens):
            self._commit_lookup(seq_id)
            return []  # fits in the blocks it has: the common decode step
        need = self.blocks_needed(seq_id, num_tokens)
        if need > self.num_available:
            return None
        table = self.tables.setdefault(seq_id, [])
        self._hashes.setdefault(seq_id, [])
        copies: list[tuple[int, int]] = []
        if self._needs_cow(seq_id, num_tokens):
            old = table[-1]
            new = self._take_block()
            self._ref[old] -= 1
            table[-1] = new
            copies.append((old, new))
        while len(table) * self.block_size < num_tokens:
            table.append(self._take_block())
        self._commit_lookup(seq_id)
        return copies

    def _commit_lookup(self, seq_id: int) -> None:
        lookup = self._pending_lookup.pop(seq_id, None)
        if lookup is not None:
            self._queries += lookup[0]
            self._hits += lookup[1]

    def cache_full_blocks(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Publish the hashes of blocks that are now full and computed, for later requests."""
        hashes = self._hashes[seq_id]
        table = self.tables[seq_id]
        bs = self.block_size
        while (len(hashes) + 1) * bs <= num_computed:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = self._chain(parent, tokens)
            hashes.append(h)
            block = table[i]
            if self.enable_prefix_caching and h not in self._by_hash and self._block_hash[block] is None:
                self._by_hash[h] = block
                self._block_hash[block] = h
                self._content[block] = _CachedBlock(parent, tokens)

    def fork(self, parent_id: int, child_id: int) -> None:
        """The child shares every block of the parent (copy-on-write on the first divergent write)."""
        if child_id in self.tables:
            raise ValueError(f"sequence {child_id} already has blocks")
        self.tables[child_id] = list(self.tables[parent_id])
        self._hashes[child_id] = list(self._hashes[parent_id])
        for block in self.tables[child_id]:
            self._ref[block] += 1

    def free(self, seq_id: int) -> None:
        """Drop a sequence's hold on its blocks (finished, aborted or preempted)."""
        table = self.tables.pop(seq_id, None)
        self._hashes.pop(seq_id, None)
        self._pending_lookup.pop(seq_id, None)
        if table is None:
            return
        # Reverse order: the tail of a prefix is the least likely to be shared, so evict it first.
        for block in reversed(table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._block_hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ---- for tests: the invariants ---------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError-free, explicit errors if the bookkeeping is inconsistent."""
        holders = [0] * self.num_blocks
        for table in self.tables.values():
            for block in table:
                holders[block] += 1
        if holders != self._ref:
            raise RuntimeError("ref counts differ from the number of holders")
        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free) or free & evictable:
            raise RuntimeError("a block is free twice")
        for b in range(self.num_blocks):
            in_pool = b in free or b in evictable
            if in_pool == (self._ref[b] > 0):
                raise RuntimeError(f"block {b}: ref {self._ref[b]} but in_pool={in_pool}")
            if b in evictable and self._block_hash[b] is None:
                raise RuntimeError(f"block {b} is evictable without a hash")
