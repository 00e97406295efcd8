"""The few-row projections (engine/triton_skinny.py) against the separate eager operations,
and the model's skinny path against its full one, through Triton's interpreter."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from test_triton_qkv import random_model  # noqa: E402  (the prologue tests' tiny models)

from mini_vllm.engine.attention import build_metadata  # noqa: E402
from mini_vllm.engine.triton_attention import paged_attention_triton, store_kv_triton  # noqa: E402
from mini_vllm.engine.triton_norm import rms_norm_triton, rotary_triton, silu_mul_triton  # noqa: E402
from mini_vllm.engine.triton_qkv import qkv_prologue_triton  # noqa: E402
from mini_vllm.engine.triton_skinny import MAX_ROWS, skinny_linear_triton, skinny_tiles  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter test (CPU tensors); the GPU has tests/test_triton_skinny_gpu.py"
)


def separate(x: torch.Tensor, w: torch.Tensor, silu: int | None) -> torch.Tensor:
    """What the model does without the skinny kernel: the linear, then the SiLU-multiply."""
    y = F.linear(x.float(), w.float()).to(x.dtype)
    if silu is not None:
        gate, up = y.split(silu, dim=-1)
        y = (F.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)
    return y


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
# Rows 1 to MAX_ROWS; K not a multiple of the K tile (100, 72) nor of 16; N not a multiple of the column tile.
@pytest.mark.parametrize(("m", "n", "k"), [(1, 48, 64), (1, 200, 1100), (5, 200, 100), (MAX_ROWS, 40, 72), (3, 64, 1100)])
def test_skinny_equals_the_separate_operations(dtype: torch.dtype, silu: bool, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(2 * n if silu else n, k, generator=gen) / k**0.5).to(dtype)
    got = skinny_linear_triton(x, w, silu_intermediate=n if silu else None)
    want = separate(x, w, n if silu else None)
    assert got.shape == want.shape == (m, n) and got.dtype == dtype
    # fp32: the sum's order. bf16: one rounding of the dtype, two where SiLU is.
    tol = {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.timeout(60)
def test_zero_rows_and_strided_rows() -> None:
    w = torch.randn(24, 32)
    y = skinny_linear_triton(torch.zeros(0, 32), w)
    assert y.shape == (0, 24)
    base = torch.randn(4, 80)
    x = base[:, 8:40]  # rows 80 apart: like o_proj's input sliced out of a wider buffer
    torch.testing.assert_close(skinny_linear_triton(x, w), F.linear(x, w), atol=2e-5, rtol=2e-5)


def _call(**change: Any) -> None:
    args: dict[str, Any] = {"x": torch.randn(2, 32), "weight": torch.randn(24, 32)}
    args.update(change)
    skinny_linear_triton(**args)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.randn(MAX_ROWS + 1, 32)}, f"at most {MAX_ROWS} rows, got {MAX_ROWS + 1}"),
        ({"x": torch.randn(2, 31)}, r"x \[M, K\] and weight \[N, K\], got \(2, 31\) and \(24, 32\)"),
        ({"x": torch.randn(32)}, r"x \[M, K\] and weight \[N, K\]"),
        ({"x": torch.randn(2, 32, dtype=torch.float16), "weight": torch.randn(24, 32, dtype=torch.float16)},
         "one dtype of"),
        ({"weight": torch.randn(24, 32, dtype=torch.bfloat16)}, "one dtype of"),
        ({"x": torch.randn(32, 2).t()}, "contiguous rows"),
        ({"silu_intermediate": 10}, r"SiLU needs a \[2 \* 10, K\] weight, got 24 rows"),
    ],
)
def test_bad_inputs_are_refused_in_words(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _call(**change)


def test_tiles_cover_the_shapes_we_serve() -> None:
    # Narrow outputs get narrow column tiles (enough programs), long rows long K tiles.
    assert skinny_tiles(1024, 2048) == (16, 256, 3)  # qwen3-0.6b o_proj
    assert skinny_tiles(4096, 14336) == (32, 512, 4)  # llama3-8b down_proj
    assert skinny_tiles(4096, 4096) == (32, 512, 4)  # llama3-8b o_proj
    assert skinny_tiles(14336, 4096, silu=True) == (32, 128, 3)  # llama3-8b gate_up: two tiles a program
    assert skinny_tiles(4096, 4096, silu=True) == (32, 128, 3)  # two tiles of 512 would not fit an SM
    assert skinny_tiles(4096, 4096, element_size=4) == (32, 256, 3)  # fp32: stages of 32 x 512 would not fit
    assert skinny_tiles(14336, 4096, silu=True, element_size=4) == (32, 64, 3)  # fp32 SiLU spilled at 128


@pytest.mark.timeout(240)
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM"])
def test_model_skinny_path_equals_the_full_one(architecture: str) -> None:
    """The GPU runner's kernels with and without the skinny path, fp32: the same hidden states
    within fp32 rounding and the same caches, over a prefill of 6 tokens, a decode of 3 rows (one
    padded, as a graph pads) and one of a single row; a step of more tokens than the skinny rows
    takes the full path."""
    model = random_model(architecture, torch.float32)
    cfg = model.config
    cache = torch.randn(cfg.num_hidden_layers, 2, 5, 4, cfg.num_key_value_heads, cfg.head_dim)
    tables = [[3, 0], [1], []]
    gen = torch.Generator().manual_seed(1)
    steps = [
        (torch.randint(0, cfg.vocab_size, (6,), generator=gen), torch.tensor([2, 3, 4, 0, 1, 2]),
         build_metadata([3, 3], [5, 3], tables[:2], [14, 15, 0, 4, 5, 6])),
        (torch.randint(0, cfg.vocab_size, (3,), generator=gen), torch.tensor([5, 3, 0]),
         build_metadata([1, 1, 1], [6, 4, 0], tables, [1, 7, -1])),
        # One row (a single stream's step): sequence 0's next token, position 6 in block 0, slot 2.
        (torch.randint(0, cfg.vocab_size, (1,), generator=gen), torch.tensor([6]),
         build_metadata([1], [7], tables[:1], [2])),
    ]
    attention = functools.partial(paged_attention_triton, num_splits=2)
    model.use_fused_kernels(rms_norm_triton, rotary_triton, silu_mul_triton, qkv_prologue=qkv_prologue_triton)
    results = []
    calls: list[int] = []

    def counted(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(x.shape[0])
        return skinny_linear_triton(x, *args, **kwargs)

    for skinny in (False, True):
        model.use_skinny_linear(counted, MAX_ROWS if skinny else 0)
        kv = cache.clone()
        with torch.inference_mode():
            hidden = [model(ids, pos, kv, meta, attention, store_kv_triton) for ids, pos, meta in steps]
        results.append((hidden, kv))
    layers = cfg.num_hidden_layers
    assert calls == [6] * 3 * layers + [3] * 3 * layers + [1] * 3 * layers  # o, gate_up, down a layer
    (want_hidden, want_kv), (got_hidden, got_kv) = results
    for got, want in zip(got_hidden, want_hidden, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_kv, want_kv, atol=1e-4, rtol=1e-4)

    model.use_skinny_linear(counted, 5)  # six tokens: the full path, no skinny call
    calls.clear()
    with torch.inference_mode():
        model(*steps[0][:2], cache.clone(), steps[0][2], attention, store_kv_triton)
    assert calls == []
