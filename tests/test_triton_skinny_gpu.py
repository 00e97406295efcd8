"""On a GPU, at the served models' shapes: the fused few-row projections against the separate
kernels (the fused norm, cuBLAS, the fused SiLU-multiply). Kept apart from
``test_triton_skinny.py`` (the interpreter on the CPU); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = {  # name: (N, K, variant); N is the intermediate size for SiLU
    "llama3-8b qkv": (6144, 4096, "norm"), "llama3-8b o": (4096, 4096, "plain"),
    "llama3-8b gate_up": (14336, 4096, "silu"), "llama3-8b down": (4096, 14336, "plain"),
    "qwen3-0.6b qkv": (4096, 1024, "norm"), "qwen3-0.6b o": (1024, 2048, "plain"),
    "qwen3-0.6b gate_up": (3072, 1024, "silu"), "qwen3-0.6b down": (1024, 3072, "plain"),
    "qwen2 qkv with bias": (1152, 896, "bias"), "odd sizes": (1000, 1000, "silu"),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_equals_the_separate_kernels(dtype: torch.dtype, rows: int, shape: str) -> None:
    from mini_vllm.engine.triton_norm import rms_norm_triton, silu_mul_triton
    from mini_vllm.engine.triton_skinny import skinny_linear_triton

    n, k, variant = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(rows * 100 + n)
    dev = torch.device("cuda")
    x = torch.randn(rows, k, device=dev, generator=gen).to(dtype)
    w = (torch.randn(2 * n if variant == "silu" else n, k, device=dev, generator=gen) / k**0.5).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(k, device=dev, generator=gen)).to(dtype)
    res = torch.randn(rows, k, device=dev, generator=gen).to(dtype)
    bias = torch.randn(n, device=dev, generator=gen).to(dtype) if variant == "bias" else None
    fused = variant in ("norm", "silu", "bias")
    got, total = skinny_linear_triton(
        x, w, bias, residual=res if fused else None, norm_weight=norm_w if fused else None, eps=1e-6,
        silu_intermediate=n if variant == "silu" else None,
    )
    if fused:
        normed, want_total = rms_norm_triton(x, norm_w, 1e-6, res)
        assert total is not None and torch.equal(total, want_total)  # the add is one rounding: the same
    else:
        normed, want_total = x, None
        assert total is None
    want = F.linear(normed, w, bias)
    if variant == "silu":
        want = silu_mul_triton(want, n)
    # fp32: sums in another order. bf16: the norm's rounding moved behind the product (about one
    # rounding of the dtype on each input) and cuBLAS's own order.
    scale = want.float().abs().max().item()
    atol = 1e-4 * scale if dtype == torch.float32 else 2e-2 * scale
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=1e-4 if dtype == torch.float32 else 2e-2)
