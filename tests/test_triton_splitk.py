"""The split-K projection (engine/triton_splitk.py) through Triton's interpreter: equal to the
product within the dtype's rounding, the same bits every run whatever the split, its counters
back at zero after each launch, and bad inputs refused in words."""

from __future__ import annotations

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
    for size in (2, 4):
        t = split_tiles(m, n, k, element_size=size)
        assert t.block_m in (32, 64) and t.block_n == 64 and t.splits in (1, 2, 4, 8)
        assert t.block_k == (128 if size == 2 else 64)
        assert k // t.splits >= 256 or t.splits == 1  # every slice at least two K tiles long
