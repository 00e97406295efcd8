"""The split-K projection (engine/triton_splitk.py) through Triton's interpreter: equal to the
product within the dtype's rounding, the same bits every run whatever the split, its counters
back at zero after each launch, and bad inputs refused in words."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from mini_vllm.engine.triton_splitk import SplitKLinear, SplitTiles, split_tiles  # noqa: E402

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (CPU tensors)"),
    pytest.mark.timeout(120),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# K not a multiple of the K tile or of the split; N not a multiple of the column tile; rows past one row tile.
@pytest.mark.parametrize(("m", "n", "k", "tiles"), [
    (17, 100, 300, SplitTiles(32, 64, 64, 2)),
    (40, 64, 1100, SplitTiles(32, 64, 64, 4)),
    (70, 130, 1024, SplitTiles(64, 64, 128, 8)),
    (33, 64, 200, SplitTiles(64, 128, 64, 8)),  # more splits than K tiles: the last ones add nothing
    (20, 72, 256, SplitTiles(32, 64, 64, 1)),
])
def test_split_k_equals_the_product(dtype: torch.dtype, m: int, n: int, k: int, tiles: SplitTiles) -> None:
    gen = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    linear = SplitKLinear(128)
    got = linear(x, w, tiles)
    want = F.linear(x.float(), w.float()).to(dtype)
    assert got.shape == (m, n) and got.dtype == dtype
    tol = {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, want, **tol)
    assert torch.equal(linear(x, w, tiles), got)  # the slices summed in one order, every run
    _, counters = linear.workspace(n, x.device)
    assert not counters.any()  # the last program of each tile zeroed its counter for the next launch


def test_one_workspace_serves_every_projection_of_a_width_and_rows_up_to_max_rows() -> None:
    linear = SplitKLinear(64)
    a, b = torch.randn(64, 512), torch.randn(80, 512)
    linear(a, b)
    linear(torch.randn(20, 256), torch.randn(80, 256))
    assert list(linear._workspaces) == [(80, torch.device("cpu"))]
    partial, _ = linear.workspace(80, torch.device("cpu"))
    assert partial.numel() == 8 * 64 * 80  # eight slices of the largest [rows, N]


def test_zero_rows_and_strided_rows() -> None:
    linear = SplitKLinear(64)
    assert linear(torch.zeros(0, 32), torch.randn(24, 32)).shape == (0, 24)
    base = torch.randn(20, 600)
    x = base[:, 40:552]  # rows 600 apart: o_proj's input is a slice of a wider buffer
    w = torch.randn(70, 512) / 512**0.5
    torch.testing.assert_close(linear(x, w, SplitTiles(32, 64, 64, 4)), x @ w.T, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(("x", "w", "tiles", "message"), [
    (torch.randn(4, 32), torch.randn(8, 16), None, "x \\[M, K\\] and weight \\[N, K\\]"),
    (torch.randn(4, 32), torch.randn(8, 32).double(), None, "one dtype"),
    (torch.randn(4, 32).double(), torch.randn(8, 32).double(), None, "one dtype"),
    (torch.randn(32, 4).T, torch.randn(8, 32), None, "contiguous rows"),
    (torch.randn(65, 32), torch.randn(8, 32), None, "at most 64 rows"),
    (torch.randn(4, 32), torch.randn(8, 32), SplitTiles(16, 64, 64, 2), "at most 8 splits of tiles at least 32 x 64"),
    (torch.randn(4, 32), torch.randn(8, 32), SplitTiles(32, 64, 64, 16), "at most 8 splits"),
])
def test_bad_inputs_are_refused_in_words(x: torch.Tensor, w: torch.Tensor, tiles: SplitTiles | None,
                                         message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SplitKLinear(64)(x, w, tiles)


def test_max_rows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        SplitKLinear(0)


@pytest.mark.parametrize("m", [17, 32, 64, 128, 256])
@pytest.mark.parametrize(("n", "k"), [(1024, 2048), (1024, 3072), (4096, 4096), (4096, 14336), (6144, 1024)])
def test_default_tiles_are_valid_for_the_served_shapes(m: int, n: int, k: int) -> None:
    t = split_tiles(m, n, k)
    assert t.block_m == 32 and t.block_n == 64 and t.block_k == 64 and t.splits in (1, 2, 4, 8)
    assert k // t.splits >= 256 or t.splits == 1  # every slice at least four K tiles long
    # about two programs per SM of 132: no more than that once split
    programs = -(-m // t.block_m) * -(-n // t.block_n) * t.splits
    assert t.splits == 1 or programs <= 2 * 132


@pytest.mark.timeout(240)
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_model_split_k_path_equals_the_full_one(architecture: str) -> None:
    """The GPU runner's kernels with and without the split-K path for o_proj and down_proj, fp32:
    the same hidden states within fp32 rounding, over a prefill of 6 tokens and a decode of 3 rows,
    with K split in two (the partials, the counters and the last program's sum all run); a step of
    more tokens than its rows takes cuBLAS's path, and steps the skinny kernel takes stay its own."""
    from test_triton_qkv import random_model

    from mini_vllm.engine.attention import build_metadata
    from mini_vllm.engine.triton_attention import paged_attention_triton, store_kv_triton
    from mini_vllm.engine.triton_norm import rms_norm_triton, rotary_triton, silu_mul_triton
    from mini_vllm.engine.triton_qkv import qkv_prologue_triton

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
    ]
    attention = functools.partial(paged_attention_triton, num_splits=2)
    model.use_fused_kernels(rms_norm_triton, rotary_triton, silu_mul_triton, qkv_prologue=qkv_prologue_triton)
    linear = SplitKLinear(8)
    calls: list[tuple[int, int]] = []

    def counted(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], weight.shape[1]))
        return linear(x, weight, SplitTiles(32, 64, 64, 2))

    results = []
    for rows in (0, 8):
        model.use_split_k_linear(counted, rows)
        with torch.inference_mode():
            results.append([model(ids, pos, cache.clone(), meta, attention, store_kv_triton) for ids, pos, meta in steps])
    layers = cfg.num_hidden_layers
    o, down = cfg.num_attention_heads * cfg.head_dim, cfg.intermediate_size
    assert calls == [(6, o), (6, down)] * layers + [(3, o), (3, down)] * layers
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    calls.clear()
    model.use_split_k_linear(counted, 5)  # six tokens: more than its rows, cuBLAS's path
    model.use_skinny_linear(lambda x, w, silu_intermediate=None: F.linear(x, w) if silu_intermediate is None
                            else silu_mul_triton(F.linear(x, w), silu_intermediate), 3)
    with torch.inference_mode():
        for ids, pos, meta in steps:
            model(ids, pos, cache.clone(), meta, attention, store_kv_triton)
    assert calls == []  # six rows: too many; three: the skinny kernel's
