"""``argmax_chunks_triton`` against ``torch.argmax`` through Triton's CPU interpreter: random
logits, ties, NaN and -inf, bf16 and fp32, vocabularies that leave the last chunk part empty.
The same at real shapes, compiled, is ``test_triton_argmax_gpu.py``."""

from __future__ import annotations

import os

# Must be set before triton is imported: @triton.jit picks the interpreter at decoration time.
os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

import torch
import triton

from mini_vllm.engine import triton_argmax
from mini_vllm.engine.triton_argmax import argmax_chunks_triton

if isinstance(triton_argmax._chunk_kernel, triton.runtime.JITFunction):
    pytest.fail("mini_vllm.engine.triton_argmax was imported before TRITON_INTERPRET=1 was set", pytrace=False)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_argmax, "CHUNK", 64)  # many chunks at interpreter-sized vocabularies


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("vocab", [1, 50, 64, 300, 1000])
def test_equals_torch_argmax(dtype: torch.dtype, vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    # Few distinct values: ties within and across chunks, as bf16 logits have.
    logits = torch.randint(-4, 5, (7, vocab), generator=gen).to(dtype)
    logits[1] = float("-inf")
    logits[2, vocab // 2] = float("nan")
    logits[3, vocab - 1] = float("nan")
    logits[3, vocab // 3] = float("nan")
    logits[4] = 3.0
    logits[5, -1] = 100.0
    logits[6, vocab // 2 :] = float("-inf")
    assert torch.equal(argmax_chunks_triton(logits), logits.argmax(dim=-1))


@pytest.mark.timeout(60)
def test_rows_of_a_larger_tensor_and_no_rows() -> None:
    logits = torch.randn(6, 200, generator=torch.Generator().manual_seed(1))
    view = logits[1:5]  # a row stride of 200, an offset of one row
    assert torch.equal(argmax_chunks_triton(view), view.argmax(dim=-1))
    empty = argmax_chunks_triton(torch.empty(0, 200))
    assert empty.shape == (0,) and empty.dtype == torch.int64


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("logits", "message"),
    [(torch.zeros(4, 10)[:, ::2], "contiguous rows"), (torch.zeros(10), r"\[rows, vocab\]"),
     (torch.zeros(3, 0), "a vocabulary of 1")],
)
def test_refuses_other_layouts(logits: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        argmax_chunks_triton(logits)
