"""The fused qkv prologue (q/k norm + rotary + KV store, one launch) against the three kernels it
replaces, bit for bit, through Triton's CPU interpreter; and a model with it against one without.

Small token counts keep the interpreter quick. The same equality at real shapes, compiled, and
under CUDA-graph capture is ``test_triton_qkv_gpu.py`` (which must not run interpreted).
"""

from __future__ import annotations

import functools
import os
from typing import Any

# Must be set before triton is imported: @triton.jit picks the interpreter at decoration time.
os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

import torch
import triton
import triton.language as tl

from mini_vllm.engine import triton_attention, triton_norm, triton_qkv
from mini_vllm.engine.attention import build_metadata
from mini_vllm.engine.config import ModelConfig
from mini_vllm.engine.model import CausalLM, RotaryEmbedding
from mini_vllm.engine.triton_attention import paged_attention_triton, store_kv_triton
from mini_vllm.engine.triton_norm import rms_norm_triton, rotary_triton, silu_mul_triton
from mini_vllm.engine.triton_qkv import qkv_prologue_triton

_KERNELS = {
    "triton_qkv": triton_qkv._qkv_prologue_kernel,
    "triton_norm": triton_norm._rms_norm_kernel,
    "triton_attention": triton_attention._store_kv_kernel,
}
for _module, _kernel in _KERNELS.items():
    if isinstance(_kernel, triton.runtime.JITFunction):
        pytest.fail(
            f"mini_vllm.engine.{_module} was imported before TRITON_INTERPRET=1 was set, so its kernels are "
            "compiled for a GPU; set TRITON_INTERPRET in conftest.py or run this file on its own",
            pytrace=False,
        )

DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
MAX_POSITIONS = 64
BLOCK_SIZE = 4
EPS = 1e-6


def rope(head_dim: int) -> RotaryEmbedding:
    """Llama 3-style RoPE (frequency-scaled) tables for ``head_dim``, positions up to MAX_POSITIONS."""
    cfg = ModelConfig.from_dict(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 1,
         "num_key_value_heads": 1, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 10,
         "head_dim": head_dim, "rope_theta": 500000.0,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}},
        "test",
    )
    return RotaryEmbedding(cfg, MAX_POSITIONS)


class Case:
    """A qkv projection output, positions, q/k norm weights and paged caches with random contents;
    every third token is graph padding (slot -1), the others land in shuffled slots."""

    def __init__(
        self,
        tokens: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        *,
        cache_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        width = (num_heads + 2 * num_kv_heads) * head_dim
        # Spread over a few magnitudes: the norm's sum of squares and the rotary's roundings see
        # more than one exponent.
        scale = torch.exp2(torch.randint(-3, 4, (tokens, width), generator=gen).float())
        self.qkv = (torch.randn(tokens, width, generator=gen) * scale).to(dtype)
        self.positions = torch.randint(0, MAX_POSITIONS, (tokens,), generator=gen)
        self.rope = rope(head_dim)
        num_blocks = -(-tokens // BLOCK_SIZE) + 2  # spare blocks keep their random contents
        slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:tokens]
        slots[1::3] = -1
        self.slots = slots
        shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
        cache_dtype = cache_dtype or dtype
        self.k_cache = torch.randn(shape, generator=gen).to(cache_dtype)
        self.v_cache = torch.randn(shape, generator=gen).to(cache_dtype)
        self.q_norm = (1 + 0.3 * torch.randn(head_dim, generator=gen)).to(dtype)
        self.k_norm = (1 + 0.3 * torch.randn(head_dim, generator=gen)).to(dtype)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        return (q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim),
                v.view(-1, self.num_kv_heads, self.head_dim))

    def unfused(self, norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k_cache, v_cache) after the kernels the prologue replaces, as the model calls them."""
        q, k, v = self.split(self.qkv.clone())
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        if norm:
            q, k = rms_norm_triton(q, self.q_norm, EPS)[0], rms_norm_triton(k, self.k_norm, EPS)[0]
        q, k = rotary_triton(self.positions, q, k, self.rope.cos, self.rope.sin)
        store_kv_triton(k, v, k_cache, v_cache, self.slots)
        return q, k_cache, v_cache

    def fused(self, norm: bool, qkv: torch.Tensor | None = None) -> torch.Tensor:
        weights: dict[str, Any] = {"q_norm": self.q_norm, "k_norm": self.k_norm, "eps": EPS} if norm else {}
        return qkv_prologue_triton(
            self.qkv if qkv is None else qkv, self.positions, self.rope.cos, self.rope.sin, self.k_cache,
            self.v_cache, self.slots, num_heads=self.num_heads, **weights,
        )

    def assert_fused_equals_unfused(self, norm: bool) -> None:
        want_q, want_k_cache, want_v_cache = self.unfused(norm)
        _, k_before, v_before = self.split(self.qkv.clone())
        got_q = self.fused(norm)
        assert got_q.shape == want_q.shape and got_q.dtype == want_q.dtype
        assert_bits_equal(got_q, want_q, "q")
        assert_bits_equal(self.k_cache, want_k_cache, "k_cache")
        assert_bits_equal(self.v_cache, want_v_cache, "v_cache")
        _, k_after, v_after = self.split(self.qkv)
        assert torch.equal(k_after, k_before) and torch.equal(v_after, v_before), "qkv's k and v must be untouched"


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal bit for bit (NaN never passes, -0.0 differs from 0.0), with the count of differences."""
    as_int = {2: torch.int16, 4: torch.int32}[got.element_size()]
    differ = got.contiguous().view(as_int) != want.contiguous().view(as_int)
    assert not differ.any(), f"{name}: {int(differ.sum())} of {differ.numel()} elements differ"


@pytest.mark.timeout(120)
@DTYPES
@pytest.mark.parametrize("head_dim", [128, 64, 24, 40, 80, 96])
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "no-norm"])
def test_matches_the_unfused_kernels(dtype: torch.dtype, head_dim: int, norm: bool) -> None:
    Case(5, 4, 2, head_dim, dtype, seed=head_dim).assert_fused_equals_unfused(norm)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("num_kv_heads", "group"),
    # GQA groups 1, 2, 4, 8 and every kv head count from 1 to 8.
    [(1, 1), (1, 8), (2, 4), (3, 2), (4, 1), (5, 2), (6, 1), (7, 1), (8, 2), (2, 8)],
)
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "no-norm"])
def test_matches_over_head_layouts(num_kv_heads: int, group: int, norm: bool) -> None:
    dtype = torch.bfloat16 if num_kv_heads % 2 else torch.float32
    Case(3, num_kv_heads * group, num_kv_heads, 40, dtype, seed=num_kv_heads * 10 + group).assert_fused_equals_unfused(
        norm
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tokens", [1, 2, 7, 13])
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "no-norm"])
def test_matches_over_token_counts(tokens: int, norm: bool) -> None:
    Case(tokens, 4, 1, 24, torch.bfloat16, seed=tokens).assert_fused_equals_unfused(norm)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("tokens", "tiles"), [(5, (2, 2)), (13, (4, 2)), (37, (16, 4)), (9, (32, 8))])
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "no-norm"])
def test_several_tokens_a_program_match_the_unfused_kernels(tokens: int, tiles: tuple[int, int], norm: bool) -> None:
    # Token counts that leave the last program part empty; the norm summed in a tile of many rows
    # must still come out as rms_norm_triton's one row a program does.
    for head_dim, dtype in ((24, torch.bfloat16), (128, torch.float32)):
        case = Case(tokens, 4, 2, head_dim, dtype, seed=tokens)
        want_q, want_k_cache, want_v_cache = case.unfused(norm)
        weights: dict[str, Any] = {"q_norm": case.q_norm, "k_norm": case.k_norm, "eps": EPS} if norm else {}
        got_q = qkv_prologue_triton(case.qkv, case.positions, case.rope.cos, case.rope.sin, case.k_cache,
                                    case.v_cache, case.slots, num_heads=4, tiles=tiles, **weights)
        assert_bits_equal(got_q, want_q, "q")
        assert_bits_equal(case.k_cache, want_k_cache, "k_cache")
        assert_bits_equal(case.v_cache, want_v_cache, "v_cache")


@pytest.mark.timeout(60)
def test_pairwise_row_sum_adds_adjacent_lanes_first() -> None:
    # [2**24, 2**24, -2**24, -1] in fp32: adjacent pairs first, (2**25) + (-2**24 - 1 -> -2**24),
    # give 2**24; lanes 0 + 2 and 1 + 3 first (the strided order a layout may give), or left to
    # right, give 2**24 - 1.
    @triton.jit
    def kernel(x, out, ROWS: tl.constexpr, WIDTH: tl.constexpr):
        rows = tl.arange(0, ROWS)[:, None]
        v = tl.load(x + rows * WIDTH + tl.arange(0, WIDTH)[None, :])
        tl.store(out + tl.arange(0, ROWS), triton_norm.pairwise_row_sum(v, ROWS, WIDTH))

    x = torch.tensor([[2.0**24, 2.0**24, -(2.0**24), -1.0], [3.0, 0.5, 0.25, -3.0]])
    out = torch.empty(2)
    kernel[(1,)](x, out, ROWS=2, WIDTH=4)
    assert out.tolist() == [2.0**24, 0.75]


@pytest.mark.timeout(60)
def test_tiles_grow_with_the_step() -> None:
    sizes = [triton_qkv.prologue_tiles(t)[0] for t in (1, 16, 64, 256, 2048, 8190)]
    assert sizes == sorted(sizes) and sizes[-1] > 1


@pytest.mark.timeout(60)
def test_casts_to_the_cache_dtype_as_store_kv_does() -> None:
    Case(5, 4, 2, 32, torch.bfloat16, cache_dtype=torch.float32, seed=3).assert_fused_equals_unfused(True)


@pytest.mark.timeout(60)
def test_q_is_rotated_in_place_and_returned_as_a_view_of_qkv() -> None:
    case = Case(3, 4, 2, 32, torch.float32)
    q = case.fused(norm=True)
    assert q.data_ptr() == case.qkv.data_ptr()
    assert q.stride() == (case.qkv.stride(0), 32, 1)
    assert torch.equal(q, case.split(case.qkv)[0])


@pytest.mark.timeout(60)
def test_padding_tokens_write_nothing() -> None:
    case = Case(4, 4, 2, 24, torch.bfloat16)
    case.slots.fill_(-1)
    k_before, v_before = case.k_cache.clone(), case.v_cache.clone()
    want_q = case.unfused(norm=True)[0]
    assert_bits_equal(case.fused(norm=True), want_q, "q")  # q is still rotated
    assert torch.equal(case.k_cache, k_before) and torch.equal(case.v_cache, v_before)


class CountingLaunches:
    """Stands in for a jitted kernel: records each ``kernel[grid](...)`` launch's grid and keyword
    arguments, and forwards it."""

    def __init__(self, kernel: Any) -> None:
        self.kernel, self.grids, self.kwargs = kernel, [], []

    def __getitem__(self, grid: Any) -> Any:
        self.grids.append(grid)

        def launch(*args: Any, **kwargs: Any) -> Any:
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.timeout(60)
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "no-norm"])
def test_one_launch_one_program_per_head_and_token_tile(norm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingLaunches(triton_qkv._qkv_prologue_kernel)
    monkeypatch.setattr(triton_qkv, "_qkv_prologue_kernel", counter)
    for tokens in (3, 200):
        Case(tokens, 6, 2, 32, torch.float32).fused(norm)
    tiles = [triton_qkv.prologue_tiles(t)[0] for t in (3, 200)]
    assert counter.grids == [(-(-3 // tiles[0]), 8), (-(-200 // tiles[1]), 8)]


@pytest.mark.timeout(60)
def test_the_kernels_compared_bit_for_bit_compile_without_fused_multiply_adds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # triton_norm.NO_FP_FUSION: a multiply-add fused in one kernel and not in the other moved fp32
    # roundings on the H200; every launch of the three must ask for no fusion.
    recorders = {
        (triton_qkv, "_qkv_prologue_kernel"): CountingLaunches(triton_qkv._qkv_prologue_kernel),
        (triton_norm, "_rms_norm_kernel"): CountingLaunches(triton_norm._rms_norm_kernel),
        (triton_norm, "_rotary_kernel"): CountingLaunches(triton_norm._rotary_kernel),
    }
    for (module, name), recorder in recorders.items():
        monkeypatch.setattr(module, name, recorder)
    case = Case(5, 4, 2, 32, torch.float32)
    case.unfused(norm=True)
    case.fused(norm=True)
    for (_, name), recorder in recorders.items():
        assert recorder.kwargs, f"{name} was not launched"
        assert all(k.get("enable_fp_fusion") is False for k in recorder.kwargs), name


@pytest.mark.timeout(60)
def test_no_tokens_launch_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingLaunches(triton_qkv._qkv_prologue_kernel)
    monkeypatch.setattr(triton_qkv, "_qkv_prologue_kernel", counter)
    case = Case(0, 4, 2, 32, torch.float32)
    q = case.fused(norm=True)
    assert q.shape == (0, 4, 32) and counter.grids == []


def _bad(case: Case, **change: Any) -> None:
    args: dict[str, Any] = {
        "qkv": case.qkv, "positions": case.positions, "cos": case.rope.cos, "sin": case.rope.sin,
        "k_cache": case.k_cache, "v_cache": case.v_cache, "slot_mapping": case.slots, "num_heads": case.num_heads,
        "q_norm": case.q_norm, "k_norm": case.k_norm, "eps": EPS,
    }
    args.update(change)
    qkv_prologue_triton(**args)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"qkv": torch.zeros(3, 10, dtype=torch.int32)}, r"qkv must be bfloat16 or float32 \(float16 runs the separate kernels\), got torch.int32"),
        ({"qkv": torch.zeros(3, 10, dtype=torch.float16)}, "got torch.float16"),
        ({"qkv": torch.zeros(3, 7 * 32)}, r"qkv must be a row-major \[T, \(num_heads=4 \+ 2 \* num_kv_heads=2\)"),
        ({"qkv": torch.zeros(8 * 32, 3).t()}, "qkv must be a row-major"),
        ({"num_heads": 3}, r"num_heads must be a positive multiple of num_kv_heads \(2\), got 3"),
        ({"num_heads": 0}, "num_heads must be a positive multiple"),
        ({"k_cache": torch.zeros(3, 4, 2, 31), "v_cache": torch.zeros(3, 4, 2, 31)}, "head_dim must be even"),
        ({"k_cache": torch.zeros(3, 4, 2, 258), "v_cache": torch.zeros(3, 4, 2, 258)}, "from 2 to 256, got 258"),
        ({"v_cache": torch.zeros(3, 4, 2, 16)}, "k_cache and v_cache must both be"),
        ({"k_cache": torch.zeros(3, 4, 2, 64)[..., ::2]}, "k_cache must be contiguous in its last"),
        ({"positions": torch.zeros(3)}, r"positions must be an integer \[T=3\] tensor, got torch.float32"),
        ({"slot_mapping": torch.zeros(2, dtype=torch.int64)}, r"slot_mapping must be an integer \[T=3\] tensor"),
        ({"slot_mapping": torch.zeros(6, dtype=torch.int64)[::2]}, "slot_mapping must be contiguous, got stride 2"),
        ({"cos": torch.zeros(64, 32, dtype=torch.bfloat16)}, r"cos must be the float32 \[max_positions, head_dim=32\]"),
        ({"sin": torch.zeros(64, 16)}, "sin must be the float32"),
        ({"sin": torch.zeros(64, 64)[:, :32]}, "cos and sin must share a row stride"),
        ({"k_norm": None}, "q_norm and k_norm come as a pair"),
        ({"eps": None}, "eps must be a float >= 0 when q/k norm weights are given, got None"),
        ({"eps": float("nan")}, "eps must be a float >= 0"),
        ({"q_norm": torch.ones(16)}, r"q_norm must be a contiguous \[head_dim=32\] weight, got \(16,\)"),
        ({"k_norm": torch.ones(32, dtype=torch.bfloat16)}, r"k_norm \(torch.bfloat16\) and qkv \(torch.float32\)"),
        ({"positions": torch.zeros(3, dtype=torch.int64, device="meta")}, "positions is on meta, qkv on cpu"),
    ],
)
def test_bad_inputs_are_refused_in_words(change: dict[str, Any], message: str) -> None:
    case = Case(3, 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match=message):
        _bad(case, **change)


# --------------------------------------------------------------------------- the model


def tiny_config(architecture: str) -> ModelConfig:
    raw: dict[str, Any] = {
        "architectures": [architecture], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 50, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 64, "rope_theta": 10000.0,
    }
    if architecture == "Qwen3ForCausalLM":
        raw["head_dim"] = 24  # masked lanes, and q/k norms over them
    return ModelConfig.from_dict(raw, "test")


def random_model(architecture: str, dtype: torch.dtype) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(tiny_config(architecture), MAX_POSITIONS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else 0.2 * torch.randn_like(param))
    model = model.to(dtype).eval()
    model.rotary = RotaryEmbedding(model.config, MAX_POSITIONS)  # fp32 tables, as the loader builds them
    return model


def refuse_store_kv(*args: torch.Tensor) -> None:
    raise AssertionError("store_kv_fn was called although the qkv prologue writes the cache")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_model_forward_with_the_prologue_equals_it_without(architecture: str) -> None:
    """The GPU runner's kernels (fused norms, rotary, SiLU-multiply, Triton attention) with and
    without the prologue: the same hidden states and caches, bit for bit, over a prefill step
    (one sequence after a cached prefix, one fresh) and a decode step of both."""
    dtype = torch.float32
    model = random_model(architecture, dtype)
    cfg = model.config
    num_blocks = 5  # blocks 2 and 4 are in no table: they keep their random contents
    cache = torch.randn(cfg.num_hidden_layers, 2, num_blocks, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
    cache = cache.to(dtype)
    # Slot of position p: table[p // 4] * 4 + p % 4. Step 1: sequence 0 has 2 cached tokens and 3
    # new ones (across a block boundary), sequence 1 is 3 fresh ones. Step 2: one token each, and a
    # padded row (slot -1, nothing in context) as a decode graph has.
    tables = [[3, 0], [1], []]
    prefill = build_metadata([3, 3], [5, 3], tables[:2], [14, 15, 0, 4, 5, 6])
    decode = build_metadata([1, 1, 1], [6, 4, 0], tables, [1, 7, -1])
    gen = torch.Generator().manual_seed(1)
    steps = [
        (torch.randint(0, cfg.vocab_size, (6,), generator=gen), torch.tensor([2, 3, 4, 0, 1, 2]), prefill),
        (torch.randint(0, cfg.vocab_size, (3,), generator=gen), torch.tensor([5, 3, 0]), decode),
    ]
    attention = functools.partial(paged_attention_triton, num_splits=2)  # the decode step's contexts are short
    results = []
    for prologue in (None, qkv_prologue_triton):
        model.use_fused_kernels(rms_norm_triton, rotary_triton, silu_mul_triton, qkv_prologue=prologue)
        kv = cache.clone()
        with torch.inference_mode():
            hidden = [
                model(ids, pos, kv, meta, attention, store_kv_triton if prologue is None else refuse_store_kv)
                for ids, pos, meta in steps
            ]
        results.append((hidden, kv))
    (want_hidden, want_kv), (got_hidden, got_kv) = results
    for step, (got, want) in enumerate(zip(got_hidden, want_hidden, strict=True)):
        assert_bits_equal(got, want, f"hidden states of step {step}")
    assert_bits_equal(got_kv, want_kv, "kv cache")


@pytest.mark.timeout(60)
def test_prologue_replaces_the_norm_rotary_and_store_calls() -> None:
    """With the prologue installed the layer calls nothing else before attention; without it
    (the GPU runner's call today) the old hooks run as before."""
    model = random_model("Qwen3ForCausalLM", torch.float32)
    calls: list[str] = []

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    cfg = model.config
    kv = torch.zeros(cfg.num_hidden_layers, 2, 2, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)
    meta = build_metadata([2], [2], [[1]], [4, 5])
    ids, pos = torch.tensor([1, 2]), torch.tensor([0, 1])
    norm, rotary = counting("norm", rms_norm_triton), counting("rotary", rotary_triton)
    store, prologue = counting("store", store_kv_triton), counting("prologue", qkv_prologue_triton)
    with torch.inference_mode():
        model.use_fused_kernels(norm, rotary, silu_mul_triton)
        model(ids, pos, kv, meta, paged_attention_triton, store)
        # Per layer: input norm, q norm, k norm, rotary, store, post-attention norm; then the final norm.
        assert calls == ["norm", "norm", "norm", "rotary", "store", "norm"] * 2 + ["norm"]
        calls.clear()
        model.use_fused_kernels(norm, rotary, silu_mul_triton, qkv_prologue=prologue)
        model(ids, pos, kv, meta, paged_attention_triton, store)
        assert calls == ["norm", "prologue", "norm"] * 2 + ["norm"]
