"""On a GPU, at the served models' shapes: the split-K projection (engine/triton_splitk.py) against
cuBLAS, the same bits run after run, and inside a CUDA graph replayed with new inputs. Kept apart
from ``test_triton_splitk.py`` (the interpreter on the CPU); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = {  # name: (N, K) of the weight; o_proj and down_proj, where the model uses it
    "qwen3-0.6b o": (1024, 2048), "qwen3-0.6b down": (1024, 3072),
    "llama3-8b o": (4096, 4096), "llama3-8b down": (4096, 14336), "odd sizes": (1000, 1000),
}


def _operands(rows: int, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, k, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    return x, w


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 17, 33, 64, 200, 256])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_splitk_equals_cublas_and_repeats_bit_for_bit(dtype: torch.dtype, rows: int, shape: str) -> None:
    from mini_vllm.engine.triton_splitk import SplitKLinear

    n, k = SHAPES[shape]
    x, w = _operands(rows, n, k, dtype, rows * 1000 + n)
    linear = SplitKLinear(256)
    got = linear(x, w)
    want = F.linear(x, w)
    scale = want.float().abs().max().item()
    # fp32: IEEE products summed in another order. bf16: cuBLAS's own order and one rounding.
    atol = 1e-4 * scale if dtype == torch.float32 else 2e-2 * scale
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=1e-4 if dtype == torch.float32 else 2e-2)
    assert torch.equal(linear(x, w), got)  # the slices summed in a fixed order, whoever finishes last
    _, counters = linear.workspace(n, x.device)
    assert int(counters.abs().sum()) == 0  # left clean for the next launch


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pdl", [False, True])
def test_splitk_in_a_replayed_graph_equals_eager(pdl: bool) -> None:
    """A graph holds one launch; its counters must be back at zero after each replay, or the next
    replay's last program is the wrong one. Two projections of one width share a workspace, as the
    model's o_proj and down_proj do."""
    from mini_vllm.engine.triton_splitk import SplitKLinear

    if pdl and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90")
    n, k_o, k_down, rows = 1024, 2048, 3072, 200
    linear = SplitKLinear(256, pdl_rows=256 if pdl else 0)
    x_o, w_o = _operands(rows, n, k_o, torch.bfloat16, 1)
    x_d, w_d = _operands(rows, n, k_down, torch.bfloat16, 2)
    linear(x_o, w_o)  # the workspace, and the compiles, before capture (as the runner's warm-up does)
    linear(x_d, w_d)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out_o = linear(x_o, w_o)
        out_d = linear(x_d, w_d)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in range(5):
        new_o, _ = _operands(rows, n, k_o, torch.bfloat16, 10 + seed)
        new_d, _ = _operands(rows, n, k_down, torch.bfloat16, 20 + seed)
        x_o.copy_(new_o)
        x_d.copy_(new_d)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_o, linear(x_o, w_o)), seed
        assert torch.equal(out_d, linear(x_d, w_d)), seed
        torch.testing.assert_close(out_d.float(), F.linear(x_d, w_d).float(), atol=2e-2 * out_d.float().abs().max().item(),
                                   rtol=2e-2)


@pytest.mark.timeout(120)
def test_splitk_refuses_a_new_workspace_inside_a_capture() -> None:
    from mini_vllm.engine.triton_splitk import SplitKLinear

    linear = SplitKLinear(64)
    x, w = _operands(32, 512, 1024, torch.bfloat16, 3)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), pytest.raises(RuntimeError, match="run a step eagerly first"), torch.cuda.graph(graph, stream=stream):
        linear(x, w)
