"""On a GPU, at the served models' shapes: the few-row projections against the separate kernels
(cuBLAS, the fused SiLU-multiply). Kept apart from ``test_triton_skinny.py`` (the interpreter on
the CPU); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = {  # name: (N, K, silu); N is the intermediate size for SiLU
    "llama3-8b o": (4096, 4096, False), "llama3-8b gate_up": (14336, 4096, True),
    "llama3-8b down": (4096, 14336, False), "qwen3-0.6b o": (1024, 2048, False),
    "qwen3-0.6b gate_up": (3072, 1024, True), "qwen3-0.6b down": (1024, 3072, False),
    "odd sizes": (1000, 1000, True), "odd sizes, plain": (1000, 1000, False),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_skinny_equals_the_separate_kernels(dtype: torch.dtype, rows: int, shape: str) -> None:
    from mini_vllm.engine.triton_norm import silu_mul_triton
    from mini_vllm.engine.triton_skinny import skinny_linear_triton

    n, k, silu = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(rows * 100 + n)
    dev = torch.device("cuda")
    x = torch.randn(rows, k, device=dev, generator=gen).to(dtype)
    w = (torch.randn(2 * n if silu else n, k, device=dev, generator=gen) / k**0.5).to(dtype)
    got = skinny_linear_triton(x, w, silu_intermediate=n if silu else None)
    want = F.linear(x, w)
    if silu:
        want = silu_mul_triton(want, n)
    # fp32: sums in another order. bf16: cuBLAS's own order and rounding.
    scale = want.float().abs().max().item()
    atol = 1e-4 * scale if dtype == torch.float32 else 2e-2 * scale
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=1e-4 if dtype == torch.float32 else 2e-2)
