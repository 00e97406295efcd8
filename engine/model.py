"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache.

Our own model code because attention must read and write the paged cache. Inputs are flat: all
new tokens of all sequences of a step in one ``[T]`` tensor with their positions; the
``AttentionMetadata`` says which sequence each belongs to. q/k/v and gate/up projections are
fused into one matmul each (fewer, larger kernels); the loader maps checkpoint names onto them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from mini_vllm.engine.attention import AttentionMetadata, paged_attention_reference, store_kv_reference
from mini_vllm.engine.config import ModelConfig
from mini_vllm.engine.parallel import TensorParallel

# (query, k_cache, v_cache, meta, scale) -> output; (key, value, k_cache, v_cache, slot_mapping) -> None
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]
StoreKvFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


# A fused implementation (x, weight, eps, residual) -> (normed, sum); the GPU runner installs one.
FusedNorm = Callable[[torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], tuple[torch.Tensor, "torch.Tensor | None"]]


FusedRotary = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]
FusedSiluMul = Callable[[torch.Tensor, int], torch.Tensor]  # ([gate | up], intermediate) -> silu(gate) * up


class FusedQkvPrologue(Protocol):
    """Everything between the qkv projection and attention in one kernel (the GPU runner installs
    ``triton_qkv.qkv_prologue_triton``): q/k norms when weights are given, rotary, the KV cache
    write; returns q ``[T, heads, head_dim]``."""

    def __call__(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        *,
        num_heads: int,
        q_norm: torch.Tensor | None = None,
        k_norm: torch.Tensor | None = None,
        eps: float | None = None,
    ) -> torch.Tensor: ...


class SkinnyLinear(Protocol):
    """A projection of a few rows without cuBLAS's split-K reduction, with the SiLU-multiply after
    gate_up (the GPU runner installs ``triton_skinny.skinny_linear_triton``); see that module."""

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, *, silu_intermediate: int | None = None
    ) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused: FusedNorm | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x, self.weight, self.eps, None)[0]
        # Same op order as transformers (normalize in fp32, cast back, then scale) for exactness.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(residual + x), residual + x)``: the residual stream's add fused with the norm."""
        if self.fused is not None:
            normed, total = self.fused(x, self.weight, self.eps, residual)
            if total is not None:
                return normed, total
        total = residual + x
        return self(total), total


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's frequency-dependent scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table indexed by position."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config)
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.fused: FusedRotary | None = None  # the GPU runner installs a one-kernel version

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None:
            return self.fused(positions, q, k, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """With ``tp``: ``config`` is this rank's (``parallel.local_config``: its heads and KV heads);
    o_proj is row-parallel and its partial output is summed over the ranks."""

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.prologue: FusedQkvPrologue | None = None  # replaces the q/k norms, rotary and store_kv_fn
        self.skinny: SkinnyLinear | None = None  # o_proj for steps of at most skinny_rows tokens
        self.skinny_rows = 0

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        rotary: RotaryEmbedding,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        attention_fn: AttentionFn,
        store_kv_fn: StoreKvFn,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        if self.prologue is not None:
            q = self._fused_prologue(self.prologue, positions, qkv, rotary, k_cache, v_cache, meta.slot_mapping)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(-1, self.num_heads, self.head_dim)
            k = k.view(-1, self.num_kv_heads, self.head_dim)
            v = v.view(-1, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotary(positions, q, k)
            store_kv_fn(k, v, k_cache, v_cache, meta.slot_mapping)
        out = attention_fn(q, k_cache, v_cache, meta, self.scale).reshape(-1, self.q_size)
        if self.skinny is not None and out.shape[0] <= self.skinny_rows:
            out = self.skinny(out, self.o_proj.weight)
        else:
            out = self.o_proj(out)
        return out if self.tp is None else self.tp.all_reduce(out)

    def _fused_prologue(
        self,
        prologue: FusedQkvPrologue,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        rotary: RotaryEmbedding,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        args = (qkv, positions, rotary.cos, rotary.sin, k_cache, v_cache, slot_mapping)
        if self.q_norm is not None and self.k_norm is not None:
            # One eps for both: the two norms are built from the same config.rms_norm_eps.
            return prologue(
                *args, num_heads=self.num_heads, q_norm=self.q_norm.weight, k_norm=self.k_norm.weight, eps=self.q_norm.eps
            )
        return prologue(*args, num_heads=self.num_heads)


class MLP(nn.Module):
    """With ``tp``: this rank's ``intermediate_size`` rows; down_proj's output summed over the ranks."""

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.intermediate = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused: FusedSiluMul | None = None  # the GPU runner installs a one-kernel version
        self.skinny: SkinnyLinear | None = None  # both projections for steps of at most skinny_rows tokens
        self.skinny_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny is not None and x.shape[0] <= self.skinny_rows:
            act = self.skinny(x, self.gate_up_proj.weight, silu_intermediate=self.intermediate)
            out = self.skinny(act, self.down_proj.weight)
        elif self.fused is not None:
            out = self.down_proj(self.fused(self.gate_up_proj(x), self.intermediate))
        else:
            gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
            out = self.down_proj(nn.functional.silu(gate) * up)
        return out if self.tp is None else self.tp.all_reduce(out)


class VocabParallelEmbedding(nn.Module):
    """This rank's contiguous range of the embedding rows; ids outside it give zeros, and the sum
    over the ranks is the full lookup."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.start, self.rows = tp.vocab_shard(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(nn.Module):
    """This rank's vocabulary range of the LM head: local logits, gathered to the full vocabulary
    on every rank (only rank 0 samples; the padding's logits are cut off)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.start, self.rows = tp.vocab_shard(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_last(nn.functional.linear(hidden, self.weight))[..., : self.vocab_size]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(config, tp)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head; names match HF checkpoints.

    With ``tp`` this is one rank's shard: ``config`` is the rank's (``parallel.local_config``), the
    embedding and LM head hold its vocabulary range, norms are whole on every rank.
    """

    def __init__(self, config: ModelConfig, max_positions: int, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        # Modules are made in the same order with and without tp: dummy weights are drawn in
        # registration order, so a one-rank model keeps the weights it always had.
        self.embed_tokens: nn.Embedding | VocabParallelEmbedding
        self.lm_head: nn.Linear | ParallelLMHead
        if tp is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, max_positions)
        if tp is None:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attention_fn: AttentionFn = paged_attention_reference,
        store_kv_fn: StoreKvFn = store_kv_reference,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of the new tokens; ``kv_cache`` is ``[L, 2, blocks, ...]``."""
        hidden = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                residual = hidden
                hidden = layer.input_layernorm(hidden)
            else:
                hidden, residual = layer.input_layernorm.add_forward(hidden, residual)
            hidden = layer.self_attn(
                positions, hidden, self.rotary, kv_cache[i, 0], kv_cache[i, 1], meta, attention_fn, store_kv_fn
            )
            hidden, residual = layer.post_attention_layernorm.add_forward(hidden, residual)
            hidden = layer.mlp(hidden)
        if residual is None:
            return self.norm(hidden)
        return self.norm.add_forward(hidden, residual)[0]

    def use_skinny_linear(self, linear: SkinnyLinear, max_rows: int) -> None:
        """Steps of at most ``max_rows`` tokens take ``linear`` for o_proj, gate_up (with the
        SiLU-multiply) and down_proj; ``max_rows`` 0 takes it out again."""
        for module in self.modules():
            if isinstance(module, Attention | MLP):
                module.skinny, module.skinny_rows = (linear, max_rows) if max_rows > 0 else (None, 0)

    def use_fused_kernels(
        self,
        norm: FusedNorm,
        rotary: FusedRotary,
        silu_mul: FusedSiluMul,
        *,
        qkv_prologue: FusedQkvPrologue | None = None,
    ) -> None:
        """Install the GPU's fused kernels; with ``qkv_prologue`` each layer's q/k norms, rotary and
        KV cache write are that one kernel instead (``norm``/``rotary`` and the model's
        ``store_kv_fn`` are then not called for them)."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.fused = norm
            elif isinstance(module, MLP):
                module.fused = silu_mul
            elif isinstance(module, Attention):
                module.prologue = qkv_prologue
        self.rotary.fused = rotary

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
