"""On a GPU: steps that carry prefill tokens replay CUDA graphs too, and change nothing.

Every step of a served batch should be a graph replay once the runner has started: decode-only
steps the decode ladder's, steps with prefill chunks the mixed ladder's (whose prefill attention
reads a tile map rewritten per step, its spare programs returning at once). Greedy output with
graphs must equal the eager run's token for token in fp32 (the same kernels, the same order), on
a budget small enough that prompts are chunked next to running decodes, with prefix hits,
preemption and ``n > 1`` forks in the mix. Skipped without CUDA.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mini_vllm.engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def prompts() -> list[list[int]]:
    rng = random.Random(11)
    shared = [rng.randrange(3, 259) for _ in range(40)]  # a common prefix: prefix-cache hits
    lens = (1, 3, 17, 40, 64, 65, 100, 129, 230, 301)
    return [[rng.randrange(3, 259) for _ in range(n)] for n in lens] + [shared + [5, 6], shared + [7]]


def run(path: Path, enforce_eager: bool, **engine: int) -> tuple[list[list[list[int]]], dict[str, int]]:
    llm = LLM(str(path), dtype="float32", enforce_eager=enforce_eager, **engine)  # type: ignore[arg-type]
    try:
        params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 10 + [
            SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        ]
        outs = llm.generate(prompts(), params)
        kinds = dict(llm.engine.runner.step_kinds)  # type: ignore[attr-defined]
        return [[c.token_ids for c in o.outputs] for o in outs], kinds
    finally:
        llm.close()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "LlamaForCausalLM"])
@pytest.mark.parametrize(
    "engine",
    [
        {"num_kv_blocks": 512, "max_num_seqs": 8, "max_num_batched_tokens": 96},
        # Tight: chunks of 40 next to decodes, and too few blocks for everyone (preemption).
        {"num_kv_blocks": 40, "max_num_seqs": 16, "max_num_batched_tokens": 40, "max_model_len": 400},
    ],
    ids=["chunked", "preempting"],
)
def test_mixed_steps_replay_graphs_and_equal_eager(
    arch: str, engine: dict[str, int], tiny_model: Callable[..., Path]
) -> None:
    path = tiny_model(arch)
    want, eager_kinds = run(path, True, **engine)
    got, kinds = run(path, False, **engine)
    assert got == want
    assert eager_kinds["decode_graph"] == eager_kinds["mixed_graph"] == 0
    # Every served step was a replay: none ran eagerly, and both ladders were used.
    assert kinds["eager"] == 0, kinds
    assert kinds["mixed_graph"] > 0 and kinds["decode_graph"] > 0, kinds
