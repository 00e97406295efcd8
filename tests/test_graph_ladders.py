"""The CUDA graph ladders (pure arithmetic; runs without a GPU)."""

from __future__ import annotations

import pytest

from mini_vllm.engine.cuda_runner import MAX_MIXED_GRAPH_TOKENS, graph_batch_sizes, mixed_graph_sizes


@pytest.mark.parametrize("budget", [2, 16, 17, 64, 100, 2048, 8192, 10000])
def test_mixed_sizes_cover_every_token_count_with_little_padding(budget: int) -> None:
    sizes = mixed_graph_sizes(budget)
    top = min(budget, MAX_MIXED_GRAPH_TOKENS)  # larger steps run eagerly
    assert sizes == sorted(set(sizes)) and sizes[-1] == top
    for n in range(2, top + 1):
        size = next(s for s in sizes if s >= n)
        # Below 64 a step pads to the next multiple of 16; above it, by at most a quarter.
        assert size - n < 16 if n <= 64 else size <= n * 1.25, (n, size)


def test_mixed_ladder_size() -> None:
    # Four graphs per doubling keep start-up capture bounded (32 for vLLM's default budget).
    assert len(mixed_graph_sizes(8192)) == 32
    assert mixed_graph_sizes(1 << 17) == mixed_graph_sizes(8192)
    assert mixed_graph_sizes(8192)[:9] == [16, 32, 48, 64, 80, 96, 112, 128, 160]


def test_decode_sizes() -> None:
    assert graph_batch_sizes(256)[:6] == [1, 2, 4, 8, 16, 32]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
