"""On a GPU: the engine (Triton kernels, CUDA graphs, pipelined steps) against transformers.

Greedy output must equal transformers' on the same weights. In bf16, rounding ties can make two
correct implementations diverge, so there the rule is: equal, or at the first divergence each
side's token is among the other's top-5. Skipped on machines without CUDA.
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

ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(n)] for n in (1, 7, 16, 33, 90, 150, 200, 301)]


def hf_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).cuda().eval()


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda")).logits[0].float()


def check_agrees(model: torch.nn.Module, prompt: list[int], ours: list[int], max_tokens: int) -> str:
    """'equal', or 'tie' when the first divergence is a top-5 swap both ways; fails otherwise."""
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    theirs = ref[0, len(prompt) :].tolist()
    if ours == theirs:
        return "equal"
    k = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
    logits = hf_logits(model, prompt + theirs[:k])[-1]
    top5 = logits.topk(5).indices.tolist()
    assert ours[k] in top5, f"at token {k} we chose {ours[k]}, not in transformers' top-5 {top5}"
    return "tie"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("skinny", "pdl"), [(False, False), (True, False), (True, None)],
                         ids=["cublas", "skinny", "defaults"])
def test_greedy_matches_transformers_on_gpu(
    arch: str, dtype: str, skinny: bool, pdl: bool | None, tiny_model: Callable[..., Path]
) -> None:
    path = tiny_model(arch)
    ps = prompts()
    # max_num_seqs 16: with skinny every decode graph and the 1- to 16-token steps take the few-row
    # kernel; by default (pdl None, an sm_90 GPU) steps of up to 64 tokens launch dependent, the
    # prompts' longer ones plainly.
    llm = LLM(str(path), dtype=dtype, num_kv_blocks=256, max_num_seqs=16, skinny_kernels=skinny,
              programmatic_dependent_launch=pdl)
    sm90 = torch.cuda.get_device_capability() >= (9, 0)
    assert llm.engine.runner.dependent_launch is (sm90 if pdl is None else pdl)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=24, logprobs=5))
    model = hf_model(path, getattr(torch, dtype))
    verdicts = [check_agrees(model, p, o.outputs[0].token_ids, 24) for p, o in zip(ps, outs, strict=True)]
    if dtype == "float32":
        assert verdicts.count("equal") >= len(verdicts) - 1, verdicts
    print(arch, dtype, "skinny" if skinny else "cublas", "dependent launch" if pdl else "", verdicts)


@pytest.mark.timeout(600)
def test_graphs_chunking_and_preemption_stay_exact(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("Qwen3ForCausalLM")
    ps = prompts(3)
    eager = LLM(str(path), dtype="float32", num_kv_blocks=512, enforce_eager=True)
    want = [o.outputs[0].token_ids for o in eager.generate(ps, SamplingParams(temperature=0, max_tokens=40))]
    del eager
    tight = LLM(str(path), dtype="float32", num_kv_blocks=60, max_model_len=400, max_num_batched_tokens=64,
                enable_prefix_caching=True, skinny_kernels=False)
    got = [o.outputs[0].token_ids for o in tight.generate(ps, SamplingParams(temperature=0, max_tokens=40))]
    assert tight.engine.statistics().num_preemptions > 0
    assert got == want
    assert tight.engine.block_manager.statistics().used_blocks == 0
    del tight
    # The same with the few-row kernel in every step of at most 16 tokens (fp32: exact), then also
    # with our kernels launched so that each may start before the one before it ends.
    for pdl in (False, True):
        tight = LLM(str(path), dtype="float32", num_kv_blocks=60, max_model_len=400, max_num_batched_tokens=64,
                    enable_prefix_caching=True, skinny_kernels=True, programmatic_dependent_launch=pdl)
        got = [o.outputs[0].token_ids for o in tight.generate(ps, SamplingParams(temperature=0, max_tokens=40))]
        assert tight.engine.runner.skinny and tight.engine.statistics().num_preemptions > 0
        assert tight.engine.runner.dependent_launch is pdl
        assert got == want
        del tight
    # The serving study's knobs: whole prompts in prefill-only steps, and no scheduling ahead.
    plain = LLM(str(path), dtype="float32", num_kv_blocks=512, max_model_len=512, max_num_batched_tokens=512,
                enable_chunked_prefill=False, async_scheduling=False)
    got = [o.outputs[0].token_ids for o in plain.generate(ps, SamplingParams(temperature=0, max_tokens=40))]
    assert got == want


@pytest.mark.timeout(600)
def test_sampling_seeded_reproducible_on_gpu(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("LlamaForCausalLM")
    llm = LLM(str(path), dtype="bfloat16", num_kv_blocks=256)
    p = SamplingParams(n=2, temperature=0.9, top_k=50, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    a = llm.generate(prompts()[3:4], p)[0]
    b = llm.generate(prompts()[:6], [SamplingParams(temperature=1.0, max_tokens=5)] * 3 + [p]
                     + [SamplingParams(temperature=0, max_tokens=9)] * 2)[3]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]


def _jit_kernels() -> dict[str, object]:
    from mini_vllm.engine import triton_attention, triton_norm, triton_qkv, triton_skinny

    return {
        name: obj for module in (triton_attention, triton_norm, triton_qkv, triton_skinny)
        for name, obj in vars(module).items()
        if hasattr(obj, "device_caches")
    }


def _compiled_variants() -> dict[str, int]:
    return {name: sum(len(c[0]) for c in k.device_caches.values()) for name, k in _jit_kernels().items()}  # type: ignore[attr-defined]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("enforce_eager", "max_num_seqs", "max_num_batched_tokens", "skinny", "pdl"),
    [(False, 16, 64, False, False), (True, 16, 64, False, False), (False, 1, 2, False, False),
     (False, 16, 64, True, False), (True, 16, 64, True, False), (False, 80, 128, True, True), (True, 80, 128, True, True)],
    ids=["graphs", "eager", "one-seq-two-tokens", "graphs-skinny", "eager-skinny", "graphs-skinny-dependent-launch",
         "eager-skinny-dependent-launch"],
)
def test_no_kernel_compiles_after_start(
    enforce_eager: bool, max_num_seqs: int, max_num_batched_tokens: int, skinny: bool, pdl: bool,
    tiny_model: Callable[..., Path],
) -> None:
    """Start-up compiles every Triton kernel variant a step can need: a compile mid-serving
    stalls every request in flight for a second or more."""
    for kernel in _jit_kernels().values():
        kernel.device_caches.clear()  # type: ignore[attr-defined]  # what earlier tests compiled does not count
    path = tiny_model("LlamaForCausalLM")
    llm = LLM(str(path), dtype="bfloat16", num_kv_blocks=512, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=max_num_batched_tokens, enforce_eager=enforce_eager, skinny_kernels=skinny,
              programmatic_dependent_launch=pdl)
    before = _compiled_variants()
    rng = random.Random(5)
    # Block tables of every width from 1 to 20 (1 and 16 are the widths Triton likes to specialize),
    # chunked prefills next to decodes, decode batches of every size, and a sampled request.
    ps = [[rng.randrange(3, 259) for _ in range(n)] for n in (1, 2, 15, 16, 17, 31, 32, 33, 100, 250, 256, 300)]
    # With dependent launch, steps on both sides of its 64 tokens (decode batches too, at 80 sequences).
    many = [[rng.randrange(3, 259) for _ in range(3)] for _ in range(max_num_seqs - len(ps))]
    llm.generate(ps + many, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    llm.generate(ps[:3], SamplingParams(temperature=0.8, top_p=0.9, max_tokens=5, seed=1, ignore_eos=True))
    after = _compiled_variants()
    assert after == before, {name: (before.get(name), n) for name, n in after.items() if before.get(name) != n}
