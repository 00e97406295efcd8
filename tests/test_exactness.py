"""Greedy output equals transformers' ``generate`` token for token, on tiny random checkpoints of
every supported architecture, also while the engine preempts, chunks prompts and hits its prefix
cache. Sampled output (n > 1, seeded) is reproducible whatever else is in the batch."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch

from mini_vllm.engine import LLM, SamplingParams

ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MAX_TOKENS = 10


def prompts_of_mixed_lengths(vocab: int = 259, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 5, 17, 33, 64, 91)]


@cache
def _hf_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: Path, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    model = _hf_model(str(path))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def engine_greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers(arch: str, tiny_model: Callable[..., Path]) -> None:
    path = tiny_model(arch)
    prompts = prompts_of_mixed_lengths()
    llm = LLM(str(path), num_kv_blocks=128, async_scheduling=True)  # the GPU's pipelined loop, on the CPU
    got = engine_greedy(llm, prompts)
    want = [hf_greedy(path, p) for p in prompts]
    assert got == want


@pytest.mark.timeout(240)
def test_greedy_exact_without_chunked_prefill_or_async_scheduling(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("LlamaForCausalLM")
    prompts = prompts_of_mixed_lengths()
    # A budget of one long prompt: prompts go whole, in prefill-only steps, one or two at a time.
    llm = LLM(str(path), num_kv_blocks=128, max_model_len=128, max_num_batched_tokens=128,
              enable_chunked_prefill=False, async_scheduling=False)
    assert engine_greedy(llm, prompts) == [hf_greedy(path, p) for p in prompts]


@pytest.mark.timeout(240)
def test_sharded_checkpoint_loads_and_matches(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("LlamaForCausalLM", shards=True)
    assert (path / "model.safetensors.index.json").is_file()
    prompts = prompts_of_mixed_lengths()[:3]
    assert engine_greedy(LLM(str(path), num_kv_blocks=64), prompts) == [hf_greedy(path, p) for p in prompts]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_greedy_exact_under_preemption(arch: str, tiny_model: Callable[..., Path]) -> None:
    path = tiny_model(arch)
    prompts = prompts_of_mixed_lengths()
    # 14 blocks of 16 = 224 tokens: the longest request alone needs 7 blocks, all six need ~20.
    llm = LLM(str(path), num_kv_blocks=14, max_model_len=200, enable_prefix_caching=False, async_scheduling=True)
    got = engine_greedy(llm, prompts, max_tokens=20)
    assert llm.engine.statistics().num_preemptions > 0, "the pool was meant to be too small"
    assert got == [hf_greedy(path, p, 20) for p in prompts]
    stats = llm.engine.block_manager.statistics()
    assert stats.used_blocks == 0 and stats.free_blocks == 14


@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_greedy_exact_with_chunked_prefill(arch: str, tiny_model: Callable[..., Path]) -> None:
    path = tiny_model(arch)
    prompts = prompts_of_mixed_lengths()
    # Every prompt > 8 tokens is chunked.
    llm = LLM(str(path), num_kv_blocks=128, max_num_batched_tokens=8, async_scheduling=True)
    got = engine_greedy(llm, prompts)
    assert llm.engine.statistics().steps > sum(len(p) for p in prompts) // 8
    assert got == [hf_greedy(path, p) for p in prompts]


@pytest.mark.timeout(240)
def test_greedy_exact_with_prefix_cache_hits(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("Qwen3ForCausalLM")
    rng = random.Random(5)
    shared = [rng.randrange(3, 259) for _ in range(70)]
    prompts = [shared + [rng.randrange(3, 259) for _ in range(k)] for k in (1, 4, 9, 30)]
    llm = LLM(str(path), num_kv_blocks=128)
    first = engine_greedy(llm, prompts[:1])
    rest = engine_greedy(llm, prompts[1:])
    stats = llm.engine.block_manager.statistics()
    assert stats.prefix_hits >= 3 * 4, f"expected the 4 shared blocks to hit for each later prompt: {stats}"
    assert first + rest == [hf_greedy(path, p) for p in prompts]


@pytest.mark.timeout(240)
def test_n_samples_with_seed_are_reproducible_across_batches(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("LlamaForCausalLM")
    llm = LLM(str(path), num_kv_blocks=128)
    prompt = prompts_of_mixed_lengths()[3]
    params = SamplingParams(n=3, temperature=0.8, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([prompt], params)[0]
    others = prompts_of_mixed_lengths(seed=9)
    mixed = llm.generate([*others[:3], prompt, *others[3:]], [SamplingParams(temperature=1.0, max_tokens=7)] * 3
                         + [params] + [SamplingParams(temperature=0, max_tokens=5)] * 3)[3]
    assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in mixed.outputs]
    assert len(alone.outputs) == 3 and all(len(o.token_ids) == 12 for o in alone.outputs)
    assert len({tuple(o.token_ids) for o in alone.outputs}) > 1, "three samples should not all agree"
    assert llm.engine.block_manager.statistics().used_blocks == 0


@pytest.mark.timeout(240)
def test_n_samples_share_prompt_blocks(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("LlamaForCausalLM")
    llm = LLM(str(path), num_kv_blocks=128, enable_prefix_caching=False)
    engine = llm.engine
    prompt = prompts_of_mixed_lengths()[4][:60]  # 3 full blocks and a partial one
    engine.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=3, ignore_eos=True))

    def one_step() -> None:  # unpipelined, so each step has landed when we look
        batch = engine.schedule()
        assert batch is not None
        engine.process(batch, engine.execute(batch))

    one_step()  # the prefill, then the fork: four samples hold the same 4 blocks
    assert engine.block_manager.statistics().used_blocks == 4
    engine.block_manager.check_invariants()
    one_step()  # each sample writes into the shared partial block: three copy it (copy-on-write)
    assert engine.block_manager.statistics().used_blocks == 4 + 3
    while engine.has_unfinished_requests():
        engine.step()
    engine.block_manager.check_invariants()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_logprobs_match_transformers(arch: str, tiny_model: Callable[..., Path]) -> None:
    path = tiny_model(arch)
    prompt = prompts_of_mixed_lengths()[2]
    llm = LLM(str(path), num_kv_blocks=64)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=5))[0].outputs[0]
    model = _hf_model(str(path))
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = model(full).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - ref[i, lp.token_id].item()) < 1e-4
        want_top = torch.topk(ref[i], 5)
        assert [t for t, _ in lp.top] == want_top.indices.tolist()
        for (_, got), w in zip(lp.top, want_top.values.tolist(), strict=True):
            assert abs(got - w) < 1e-4


@pytest.mark.timeout(240)
def test_greedy_n_samples_after_copy_on_write_all_equal_transformers(tiny_model: Callable[..., Path]) -> None:
    # Greedy samples share the prompt's partial block, then copy it: wrong copies would diverge.
    path = tiny_model("MistralForCausalLM")
    prompt = prompts_of_mixed_lengths()[4][:60]
    out = LLM(str(path), num_kv_blocks=64).generate([prompt], SamplingParams(n=3, temperature=0, max_tokens=12))[0]
    want = hf_greedy(path, prompt, 12)
    assert [o.token_ids for o in out.outputs] == [want] * 3


@pytest.mark.timeout(240)
def test_repetition_penalty_matches_transformers(tiny_model: Callable[..., Path]) -> None:
    # Same definition on both sides: over prompt and output tokens, divide positive logits by the
    # penalty and multiply negative ones.
    path = tiny_model("LlamaForCausalLM")
    prompts = prompts_of_mixed_lengths()[:4]
    llm = LLM(str(path), num_kv_blocks=128)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12,
                                                                                 repetition_penalty=1.3))]
    model = _hf_model(str(path))
    want = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 repetition_penalty=1.3)
        want.append(out[0, len(p) :].tolist())
    assert got == want
