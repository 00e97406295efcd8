"""Paged attention: the plain-torch reference path.

The KV cache of one layer is two tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``.
A sequence's tokens live in the blocks its block table lists, in order; token ``i`` of a
sequence sits in block ``table[i // block_size]`` at offset ``i % block_size``.

One batch mixes prefills (many new tokens, maybe after a cached prefix) and decodes (one new
token). Every sequence is described the same way: its new tokens are the last ``q_len`` of its
``seq_len`` tokens, so a query at position ``p`` attends to keys ``0..p`` (causal). Decode is just
``q_len == 1``. This is the obviously-correct version the Triton kernels are tested against.
"""

from __future__ import annotations

import attrs
import torch

from mini_vllm.engine.errors import ConfigError


@attrs.frozen
class AttentionMetadata:
    """Where each new token goes and what each sequence attends to, for one step.

    ``query_start_loc`` and ``seq_lens`` are also kept as Python lists (``*_list``) so the
    reference path need not read device tensors element by element.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) per new token
    query_start_loc: torch.Tensor  # [B + 1] int32: prefix sums of new tokens per sequence
    seq_lens: torch.Tensor  # [B] int32: tokens in context after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    query_start_loc_list: list[int]
    seq_lens_list: list[int]
    # [B] int32, decode steps only: the rows longest context first, the order in which the
    # decode kernel starts them (changes no result); None: row order
    decode_order: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def store_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys/values ``[T, kv_heads, head_dim]`` into their slots; slot < 0 is padding."""
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    flat_k = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    flat_v = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    flat_k[slots] = key[valid].to(k_cache.dtype)
    flat_v[slots] = value[valid].to(v_cache.dtype)


def gather_sequence_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first ``seq_len`` cached entries of one sequence, ``[seq_len, kv_heads, head_dim]``."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of new queries ``[T, heads, head_dim]`` over the paged cache.

    The new tokens' keys/values must already be in the cache (``store_kv_reference``).
    Computes in float32 and returns ``query``'s dtype.
    """
    num_heads = query.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = meta.query_start_loc_list
    for i, seq_len in enumerate(meta.seq_lens_list):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        table = meta.block_tables[i]
        k = gather_sequence_kv(k_cache, table, seq_len).float()
        v = gather_sequence_kv(v_cache, table, seq_len).float()
        # GQA: each kv head serves ``group`` consecutive query heads.
        k = k.repeat_interleave(group, dim=1)  # [S, H, D]
        v = v.repeat_interleave(group, dim=1)
        q = query[q_start:q_end].float()  # [L, H, D]
        scores = torch.einsum("lhd,shd->hls", q, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device).unsqueeze(1)
        k_pos = torch.arange(seq_len, device=query.device).unsqueeze(0)
        scores = scores.masked_fill((k_pos > q_pos).unsqueeze(0), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hls,shd->lhd", probs, v).to(query.dtype)
    return out


def build_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    slot_mapping: list[int],
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata from plain lists (tests and the CPU path use this)."""
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    width = max((len(t) for t in block_tables), default=0) or 1
    tables = torch.zeros((len(block_tables), width), dtype=torch.int32)
    for i, t in enumerate(block_tables):
        if t:
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
        query_start_loc_list=starts,
        seq_lens_list=list(seq_lens),
    )


# The largest head the GPU's Triton attention kernels take (engine/triton_attention.py). They walk
# a head in a power-of-two number of lanes, at least 16, masking the padding, so any size up to
# this one works. Past it a head takes 512 lanes, and the fp32 prefill tiles then need 264 KiB of
# shared memory, more than an H100/H200 block may have (227 KiB; ptxas for sm_90). Kept here so
# that a CPU install, which may lack triton, can check it too (this module needs no triton).
GPU_MAX_HEAD_DIM = 256


def check_gpu_head_dim(head_dim: int) -> None:
    """Refuse at load, before any weight moves, a head size the GPU kernels cannot run (rather
    than a compile error or a wrong rotary at the first step)."""
    if head_dim < 2 or head_dim % 2:
        raise ConfigError(
            f"this model's head_dim is {head_dim}, and rotary embeddings rotate the two halves of each "
            "head: head_dim must be an even number >= 2"
        )
    if head_dim > GPU_MAX_HEAD_DIM:
        raise ConfigError(
            f"this model's head_dim is {head_dim}, and the GPU attention kernels support head_dim up to "
            f"{GPU_MAX_HEAD_DIM}: run it with --device cpu (exact, slower)"
        )
