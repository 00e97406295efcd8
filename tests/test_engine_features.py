"""Stops and limits end requests where they should, through the whole engine (demo model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mini_vllm.engine import LLM, SamplingParams

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def llm(demo_model_dir: Path) -> LLM:
    return LLM(num_kv_blocks=256)


def greedy(llm: LLM, prompt: str, **fields: object) -> tuple[list[int], str, str]:
    out = llm.generate([prompt], SamplingParams(temperature=0, **fields))[0].outputs[0]  # type: ignore[arg-type]
    return out.token_ids, out.text, out.finish_reason


def test_stop_string_cuts_the_text_and_finishes(llm: LLM) -> None:
    ids, text, reason = greedy(llm, "hello", max_tokens=40, ignore_eos=True)
    assert reason == "length" and len(ids) == 40
    stop = text[10:13]
    first = text.find(stop)
    _, cut, cut_reason = greedy(llm, "hello", max_tokens=40, ignore_eos=True, stop=[stop])
    assert cut_reason == "stop"
    assert cut == text[:first]


def test_stop_token_id_finishes_with_the_token_kept(llm: LLM) -> None:
    ids, _, _ = greedy(llm, "abc", max_tokens=30, ignore_eos=True)
    target = ids[7]
    first = ids.index(target)
    got, _, reason = greedy(llm, "abc", max_tokens=30, ignore_eos=True, stop_token_ids=[target])
    assert reason == "stop" and got == ids[: first + 1]


def test_min_tokens_defers_a_stop_token(llm: LLM) -> None:
    ids, _, _ = greedy(llm, "abc", max_tokens=30, ignore_eos=True)
    target = ids[2]
    got, _, reason = greedy(llm, "abc", max_tokens=30, ignore_eos=True, stop_token_ids=[target], min_tokens=5)
    assert len(got) >= 5 and target not in got[:5]
    assert reason in ("stop", "length")


def test_eos_stops_unless_ignored(llm: LLM) -> None:
    eos = llm.engine.eos_ids[0]
    prompts = [f"p{i}" for i in range(24)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64))
    stopped = []
    for prompt, o in zip(prompts, outs, strict=True):
        c = o.outputs[0]
        if eos in c.token_ids:
            assert c.token_ids[-1] == eos and c.finish_reason == "stop"
            stopped.append(prompt)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 64
    assert stopped, "the demo model emits EOS for some of these prompts (4 of 24 when written)"
    ignored = llm.generate(stopped[:1], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0].outputs[0]
    assert len(ignored.token_ids) == 64 and ignored.finish_reason == "length"


def test_abort_frees_blocks_and_reports(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("x", [5] * 50, SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    engine.step()
    final = engine.abort_request("x")
    assert final is not None and final.finished
    assert [s.finish_reason for s in final.samples] == ["abort"]
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.statistics().used_blocks == 0
    assert engine.abort_request("x") is None


def test_logprobs_count_and_chosen_token(llm: LLM) -> None:
    out = llm.generate(["hi"], SamplingParams(temperature=0.7, seed=1, max_tokens=5, logprobs=3))[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][1] >= lp.logprob - 1e-6 or lp.token_id == lp.top[0][0]


def test_without_chunked_prefill_the_engine_refuses_a_budget_below_max_model_len(demo_model_dir: Path) -> None:
    from mini_vllm.engine import ConfigError

    with pytest.raises(ConfigError, match=r"max_num_batched_tokens \(64\) must be >= max_model_len \(128\)"):
        LLM(enable_chunked_prefill=False, max_num_batched_tokens=64, max_model_len=128)
