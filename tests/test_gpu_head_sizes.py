"""On a GPU: models whose heads are no power of two, against transformers on the same weights.

Tiny random models the other GPU tests do not build, so that every Triton kernel walks padded,
masked lanes: a Qwen3 with head_dim 24 (whose rotary kernel once failed to compile on the H200:
``arange's range must be a power of 2``), a Qwen3 with head_dim 40 and 5 query heads on 1 kv
head, and a Llama with an odd hidden size (75), 3 query heads of 24 on 1 kv head and an odd
intermediate size (131): RMSNorm over 75, the q/k norms over 24 or 40, rotary, SiLU-multiply over
131, the KV store, prefill and split decode. Prefills are chunked at 64 tokens, so later chunks
attend to a prefix already in the cache. In fp32 the greedy output must equal transformers', with
CUDA graphs and eagerly; in bf16 each divergence must be a rounding tie (each side's token among
the other's top 5, as in ``test_gpu_engine.py``). Skipped without CUDA.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mini_vllm.engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-head24": ("Qwen3ForCausalLM", {"head_dim": 24}),
    "qwen3-head40-5-on-1": ("Qwen3ForCausalLM", {"head_dim": 40, "num_attention_heads": 5, "num_key_value_heads": 1}),
    "llama-hidden75-3-on-1": (
        "LlamaForCausalLM",
        {"hidden_size": 75, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 24, "intermediate_size": 131},
    ),
}
MAX_TOKENS = 24
ENGINE: dict[str, Any] = {"num_kv_blocks": 256, "max_num_seqs": 16, "max_num_batched_tokens": 64}


def prompts() -> list[list[int]]:
    """One token up to 301: decode-only batches, single chunks and prompts of several chunks."""
    rng = random.Random(24)
    return [[rng.randrange(3, 259) for _ in range(n)] for n in (1, 7, 16, 33, 90, 150, 200, 301)]


def model_path(tiny_model: Callable[..., Path], name: str) -> Path:
    architecture, overrides = MODELS[name]
    return tiny_model(architecture, **overrides)


def ours(path: Path, dtype: str, enforce_eager: bool) -> list[list[int]]:
    llm = LLM(str(path), dtype=dtype, enforce_eager=enforce_eager, **ENGINE)
    try:
        config = llm.engine.model_config
        # The point of these models: heads that are no power of two (else this tests nothing new).
        assert config.head_dim & (config.head_dim - 1), f"head_dim {config.head_dim} is a power of two"
        outs = llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.close()  # its KV cache and graphs go before transformers' model loads


class Transformers:
    """transformers' model on the same checkpoint: greedy continuations and next-token logits."""

    def __init__(self, path: Path, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).cuda().eval()

    def greedy(self, prompt: list[int]) -> list[int]:
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
            )
        return out[0, len(prompt) :].tolist()

    def top5(self, ids: list[int]) -> list[int]:
        with torch.no_grad():
            logits = self.model(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        return logits.topk(5).indices.tolist()


def first_divergence(got: list[int], want: list[int]) -> int | None:
    k = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if k is None and len(got) != len(want):
        return min(len(got), len(want))
    return k


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", MODELS)
def test_fp32_greedy_equals_transformers_with_graphs_and_eager(name: str, tiny_model: Callable[..., Path]) -> None:
    path = model_path(tiny_model, name)
    runs = {"graphs": ours(path, "float32", enforce_eager=False), "eager": ours(path, "float32", enforce_eager=True)}
    reference = Transformers(path, "float32")
    for prompt_index, prompt in enumerate(prompts()):
        want = reference.greedy(prompt)
        for mode, outs in runs.items():
            k = first_divergence(outs[prompt_index], want)
            if k is not None:
                top5 = reference.top5(prompt + want[:k])
                pytest.fail(
                    f"{name}, {mode}, prompt {prompt_index} ({len(prompt)} tokens): token {k} is "
                    f"{outs[prompt_index][k:k + 1]}, transformers chose {want[k:k + 1]} (its top 5: {top5})"
                )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", MODELS)
def test_bf16_greedy_agrees_with_transformers(name: str, tiny_model: Callable[..., Path]) -> None:
    path = model_path(tiny_model, name)
    outs = ours(path, "bfloat16", enforce_eager=False)
    reference = Transformers(path, "bfloat16")
    ties = 0
    for prompt_index, prompt in enumerate(prompts()):
        want = reference.greedy(prompt)
        got = outs[prompt_index]
        k = first_divergence(got, want)
        if k is None:
            continue
        # A rounding tie: at the first divergence our token is among transformers' top 5.
        assert k < len(got) and k < len(want), f"prompt {prompt_index}: {len(got)} tokens, transformers {len(want)}"
        top5 = reference.top5(prompt + want[:k])
        assert got[k] in top5, (
            f"{name}, prompt {prompt_index}: token {k} is {got[k]}, transformers chose {want[k]} (its top 5: {top5})"
        )
        ties += 1
    print(name, "bf16:", ties, "rounding ties in", len(prompts()), "prompts")
