"""On a GPU, compiled: ``argmax_chunks_triton`` against ``torch.argmax`` on the GPU at the
vocabularies of qwen3-0.6b (151,936) and llama3-8b (128,256) and odd ones, 1 to 300 rows, with
ties, NaN and -inf. Skipped without CUDA; run it in its own pytest process (the interpreted test
files set TRITON_INTERPRET for the whole process)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch
import triton

from mini_vllm.engine import triton_argmax
from mini_vllm.engine.triton_argmax import argmax_chunks_triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not isinstance(triton_argmax._chunk_kernel, triton.runtime.JITFunction),
        reason="kernels are interpreted (TRITON_INTERPRET set): run this file in its own process",
    ),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("vocab", [151936, 128256, 32000, 1000, 7])
@pytest.mark.parametrize("rows", [1, 7, 64, 256, 300])
def test_equals_torch_argmax_on_the_gpu(dtype: torch.dtype, vocab: int, rows: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows * 7 + vocab)
    logits = (torch.randn(rows, vocab, generator=gen, device="cuda") * 3).to(dtype)
    if rows >= 7:
        logits[1] = float("-inf")
        logits[2, vocab // 2] = float("nan")
        logits[3, [vocab // 3, vocab - 1]] = float("nan")
        logits[4] = 1.5  # every column ties
        logits[5, [0, vocab - 1]] = 1e4  # a tie between the first and the last chunk
        logits[6, vocab // 2 :] = float("-inf")
    assert torch.equal(argmax_chunks_triton(logits), logits.argmax(dim=-1))


@pytest.mark.timeout(120)
def test_greedy_argmax_offers_it_beside_the_other_ways() -> None:
    from mini_vllm.engine.sampler import GreedyArgmax

    choice = GreedyArgmax.measured([1, 8], lambda n, way: 1.0, {"chunks": argmax_chunks_triton})
    assert set(choice.ways) == {"one pass", "two passes", "chunks"}
    logits = torch.randn(8, 151936, device="cuda").bfloat16()
    assert torch.equal(choice.ways["chunks"](logits), logits.argmax(dim=-1))
