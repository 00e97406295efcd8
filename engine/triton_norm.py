"""Fused RMSNorm (optionally with the residual add before it) in Triton.

The eager model spends ~7 small kernels per RMSNorm (cast, square, mean, rsqrt, multiply, cast,
scale) and one more for the residual add; at decode batch sizes each is a full pass over a small
tensor plus a launch. One program per row does it all in one pass. The arithmetic mirrors
``engine.model.RMSNorm`` rounding for rounding (normalize in fp32, round to the input dtype, then
scale and round again; the residual sum rounded to the input dtype first); only the order of
the mean's fp32 sum differs, so results agree with the eager path to within one rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x,
    residual,
    weight,
    out,
    res_out,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    v = tl.load(x + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual + row * stride_r + cols, mask=ok, other=0.0)
        v = (v.to(tl.float32) + r.to(tl.float32)).to(out.dtype.element_ty)  # rounded like a + b
        tl.store(res_out + row * stride_ro + cols, v, mask=ok)
    v32 = v.to(tl.float32)
    mean_sq = tl.sum(v32 * v32, axis=0) / n_cols
    normed = (v32 * (1.0 / tl.sqrt(mean_sq + eps))).to(out.dtype.element_ty)
    w = tl.load(weight + cols, mask=ok, other=0.0)
    y = (w.to(tl.float32) * normed.to(tl.float32)).to(out.dtype.element_ty)
    tl.store(out + row * stride_o + cols, y, mask=ok)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(norm(x + residual), x + residual)`` with a residual, else ``(norm(x), None)``.

    ``x`` may have any leading shape; the last dimension is normalized.
    """
    if x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share a dtype")
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty_like(x2)
    rows = x2.shape[0]
    if residual is not None:
        r2 = residual.reshape(-1, n)
        res_out = torch.empty_like(x2)
    else:
        r2, res_out = x2, out  # unused by the kernel
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, res_out,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            n, eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(n),
            num_warps=4 if n <= 2048 else 8,
        )
    return out.view(x.shape), (res_out.view(x.shape) if residual is not None else None)
