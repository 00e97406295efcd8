"""The fused RMSNorm (+ residual add) kernel against the eager module, through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from mini_vllm.engine.model import RMSNorm  # noqa: E402
from mini_vllm.engine.triton_norm import rms_norm_triton  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter test (CPU tensors); the GPU path is covered by test_gpu_engine"
)


def eager(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    norm = RMSNorm(x.shape[-1], eps).to(x.dtype)
    norm.weight.data.copy_(w)
    if residual is None:
        return norm(x), None
    return norm.add_forward(x, residual)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
# Hidden sizes that are no power of two (72, 100, 200: the row is walked in 128 or 256 masked
# lanes) and a Qwen3 q/k norm over heads of 24.
@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 32), (7, 100), (3, 72), (4, 200), (2, 5, 24)])
def test_fused_norm_matches_eager(dtype: torch.dtype, with_residual: bool, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(hash(shape) & 0xFFFF)
    x = torch.randn(shape, generator=gen).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(dtype)
    res = torch.randn(shape, generator=gen).to(dtype) if with_residual else None
    got, got_sum = rms_norm_triton(x, w, 1e-6, res)
    want, want_sum = eager(x, w, 1e-6, res)
    assert got.shape == want.shape and got.dtype == want.dtype
    # One rounding apart at most (fp32 sum order; the interpreter rounds bf16 toward zero).
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1.6e-2}
    torch.testing.assert_close(got, want, **tol)
    if with_residual:
        assert got_sum is not None and want_sum is not None
        torch.testing.assert_close(got_sum, want_sum, **tol)
    else:
        assert got_sum is None


@pytest.mark.timeout(60)
def test_strided_input_is_normalized_per_row() -> None:
    base = torch.randn(6, 3 * 32)
    q = base[:, :64].view(6, 2, 32)  # a non-contiguous view, like q split out of a fused qkv
    w = torch.ones(32)
    got, _ = rms_norm_triton(q, w, 1e-6)
    torch.testing.assert_close(got, eager(q.contiguous(), w, 1e-6, None)[0], atol=1e-5, rtol=1e-5)


def test_dtype_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="share a dtype"):
        rms_norm_triton(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6)


def _rope(head_dim: int = 32) -> torch.nn.Module:
    """Llama-style RoPE for 4 query / 2 key-value heads of ``head_dim``, positions up to 64."""
    from mini_vllm.engine.config import ModelConfig
    from mini_vllm.engine.model import RotaryEmbedding

    cfg = ModelConfig.from_dict(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 10,
         "head_dim": head_dim, "rope_theta": 10000.0},
        "test",
    )
    return RotaryEmbedding(cfg, 64)


def _assert_rotary_equal(dtype: torch.dtype, got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    for g, w in zip(got, want, strict=True):
        if dtype == torch.bfloat16:  # the kernel rounds in integer arithmetic, exactly as the eager ops
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


class _CountingLaunches:
    """Stands in for a jitted kernel: counts ``kernel[grid](...)`` launches and forwards them."""

    def __init__(self, kernel: object) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid: object) -> object:
        self.launches += 1
        return self.kernel[grid]  # type: ignore[index]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [9, 1])  # one token: a decode step at batch 1
def test_fused_rotary_matches_eager(dtype: torch.dtype, tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from mini_vllm.engine import triton_norm
    from mini_vllm.engine.triton_norm import rotary_triton

    counter = _CountingLaunches(triton_norm._rotary_kernel)
    monkeypatch.setattr(triton_norm, "_rotary_kernel", counter)
    rope = _rope()
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, 8 * 32, generator=gen).to(dtype)  # q (4 heads) | k (2) | v (2), as the model splits it
    q, k, v = qkv.split([4 * 32, 2 * 32, 2 * 32], dim=-1)
    q, k = q.view(-1, 4, 32), k.view(-1, 2, 32)
    positions = torch.tensor([0, 1, 2, 3, 17, 33, 40, 62, 63][:tokens])
    want_q, want_k = rope(positions, q.clone(), k.clone())
    v_before = v.clone()
    got_q, got_k = rotary_triton(positions, q, k, rope.cos, rope.sin)
    _assert_rotary_equal(dtype, (got_q, got_k), (want_q, want_k))
    assert torch.equal(v, v_before), "v must be untouched"
    # Neighbours in one buffer: one launch, also for one token, whose views' row strides differ.
    assert counter.launches == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_on_separate_q_and_k(dtype: torch.dtype) -> None:
    """q and k that are not neighbours in one buffer (Qwen3's normed q/k) take two launches."""
    from mini_vllm.engine.triton_norm import rotary_triton

    rope = _rope()
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(5, 4, 32, generator=gen).to(dtype)
    k = torch.randn(5, 2, 32, generator=gen).to(dtype)
    positions = torch.tensor([0, 9, 31, 32, 63])
    want_q, want_k = rope(positions, q.clone(), k.clone())
    got_q, got_k = rotary_triton(positions, q, k, rope.cos, rope.sin)
    _assert_rotary_equal(dtype, (got_q, got_k), (want_q, want_k))


@pytest.mark.timeout(120)
def test_fused_rotary_on_adjacent_but_separate_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """One token of q and k in two storages that happen to be neighbours in memory (as the caching
    allocator may place Qwen3's normed q and k): two launches, not one view across storages."""
    from mini_vllm.engine import triton_norm
    from mini_vllm.engine.triton_norm import rotary_triton

    counter = _CountingLaunches(triton_norm._rotary_kernel)
    monkeypatch.setattr(triton_norm, "_rotary_kernel", counter)
    rope = _rope()
    memory = bytearray(6 * 32 * 4)
    q = torch.frombuffer(memory, dtype=torch.float32, count=4 * 32).view(1, 4, 32)
    k = torch.frombuffer(memory, dtype=torch.float32, count=2 * 32, offset=4 * 32 * 4).view(1, 2, 32)
    assert k.data_ptr() == q.data_ptr() + q.numel() * 4  # neighbours, separate storages
    q.copy_(torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(3)))
    k.copy_(torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(4)))
    positions = torch.tensor([17])
    want_q, want_k = rope(positions, q.clone(), k.clone())
    got_q, got_k = rotary_triton(positions, q, k, rope.cos, rope.sin)
    _assert_rotary_equal(torch.float32, (got_q, got_k), (want_q, want_k))
    assert counter.launches == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# One block per row; one, masked (200); several, the last one masked (1500).
@pytest.mark.parametrize("intermediate", [64, 200, 1500])
def test_fused_silu_mul_matches_eager(dtype: torch.dtype, intermediate: int) -> None:
    from mini_vllm.engine.triton_norm import silu_mul_triton

    gen = torch.Generator().manual_seed(2)
    gate_up = (3 * torch.randn(7, 2 * intermediate, generator=gen)).to(dtype)
    gate, up = gate_up.split(intermediate, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = silu_mul_triton(gate_up, intermediate)
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1.6e-2, "rtol": 1.6e-2}
    # (The interpreter rounds fp32 -> bf16 toward zero, so bf16 is only close here; the GPU test
    # checks that the compiled kernel is almost everywhere bit-equal.)
    torch.testing.assert_close(got, want, **tol)
    with pytest.raises(ValueError, match="silu_mul needs"):
        silu_mul_triton(gate_up[:, :-1], intermediate)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [24, 40, 80, 96])
def test_fused_rotary_on_head_sizes_that_are_no_power_of_two(dtype: torch.dtype, head_dim: int) -> None:
    """tl.arange needs a power of two: the half head is rounded up and masked (a Qwen3 with
    head_dim 24 failed to compile on the H200 before)."""
    from mini_vllm.engine.triton_norm import rotary_triton

    rope = _rope(head_dim)
    gen = torch.Generator().manual_seed(head_dim)
    q = torch.randn(5, 3, head_dim, generator=gen).to(dtype)
    k = torch.randn(5, 1, head_dim, generator=gen).to(dtype)
    positions = torch.tensor([0, 9, 31, 32, 63])
    want_q, want_k = rope(positions, q.clone(), k.clone())
    got_q, got_k = rotary_triton(positions, q, k, rope.cos, rope.sin)
    _assert_rotary_equal(dtype, (got_q, got_k), (want_q, want_k))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [12, 24, 40])
def test_fused_rotary_one_launch_over_odd_head_counts(
    dtype: torch.dtype, head_dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5 query heads and 1 kv head side by side in one qkv row: the one launch walks 6 heads in 8
    masked rows, each head in masked lanes, and leaves v alone."""
    from mini_vllm.engine import triton_norm
    from mini_vllm.engine.triton_norm import rotary_triton

    counter = _CountingLaunches(triton_norm._rotary_kernel)
    monkeypatch.setattr(triton_norm, "_rotary_kernel", counter)
    rope = _rope(head_dim)
    gen = torch.Generator().manual_seed(head_dim)
    qkv = torch.randn(6, 7 * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([5 * head_dim, head_dim, head_dim], dim=-1)
    q, k = q.view(-1, 5, head_dim), k.view(-1, 1, head_dim)
    positions = torch.tensor([0, 1, 9, 31, 32, 63])
    want_q, want_k = rope(positions, q.clone(), k.clone())
    v_before = v.clone()
    got_q, got_k = rotary_triton(positions, q, k, rope.cos, rope.sin)
    _assert_rotary_equal(dtype, (got_q, got_k), (want_q, want_k))
    assert torch.equal(v, v_before), "v must be untouched"
    assert counter.launches == 1


def test_fused_rotary_refuses_an_odd_head() -> None:
    from mini_vllm.engine.triton_norm import rotary_triton

    q, k = torch.randn(2, 2, 25), torch.randn(2, 1, 25)
    table = torch.randn(8, 26)
    with pytest.raises(ValueError, match="head_dim must be even, got 25"):
        rotary_triton(torch.tensor([0, 1]), q, k, table, table)
