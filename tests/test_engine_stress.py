"""Random mixes of requests, aborts and memory pressure through the engine's step loop, both ways.

Checks what must hold whatever happens: the block books balance after every step, every request
ends exactly once, every block comes back, and each greedy request's tokens equal that request run
alone, so preemption, chunking, forks and one-step-late finishes never change an output.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mini_vllm.engine import LLM, SamplingParams
from mini_vllm.engine.outputs import RequestDelta

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def alone(demo_model_dir: Path) -> LLM:
    return LLM(num_kv_blocks=512, max_model_len=512)


def random_params(rng: random.Random) -> SamplingParams:
    if rng.random() < 0.6:
        return SamplingParams(temperature=0, max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.5)
    max_tokens = rng.randint(1, 30)
    return SamplingParams(
        n=rng.choice([1, 2, 3]),
        temperature=rng.choice([0.7, 1.0]),
        top_p=rng.choice([1.0, 0.9]),
        seed=rng.randrange(1000),
        max_tokens=max_tokens,
        min_tokens=min(max_tokens, rng.choice([0, 2])),
        stop=rng.choice([(), ("a",), ("\n", "xy")]),
        presence_penalty=rng.choice([0.0, 0.5]),
    )


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "serial"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_random_mix_keeps_books_and_outputs(seed: int, pipelined: bool, alone: LLM) -> None:
    rng = random.Random(seed)
    # A small pool and budget: preemption and chunked prefill happen all the time.
    llm = LLM(num_kv_blocks=24, max_model_len=384, max_num_batched_tokens=48, max_num_seqs=8,
              async_scheduling=pipelined)
    engine = llm.engine
    requests = {}
    for i in range(24):
        prompt = [rng.randrange(3, 259) for _ in range(rng.randint(1, 120))]
        requests[f"r{i}"] = (prompt, random_params(rng))
    pending = list(requests)
    tokens: dict[str, dict[int, list[int]]] = {rid: {} for rid in requests}
    finished: dict[str, int] = {}
    aborted: set[str] = set()

    def take(deltas: list[RequestDelta]) -> None:
        for d in deltas:
            for s in d.samples:
                tokens[d.request_id].setdefault(s.index, []).extend(s.token_ids)
            if d.finished:
                finished[d.request_id] = finished.get(d.request_id, 0) + 1

    steps = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, 2)):
            if pending:
                rid = pending.pop(0)
                prompt, params = requests[rid]
                engine.add_request(rid, prompt, params)
        if engine.requests and rng.random() < 0.05:
            victim = rng.choice(sorted(engine.requests))
            final = engine.abort_request(victim)
            assert final is not None
            aborted.add(victim)
            take([final])
        take(engine.step())  # the one step loop, one step ahead or serial
        engine.block_manager.check_invariants()
        steps += 1
        assert steps < 5000, "the engine stopped making progress"
    assert engine.statistics().num_preemptions > 0, "the pool was meant to be too small"
    assert set(finished) == set(requests) and set(finished.values()) == {1}
    assert engine.block_manager.statistics().used_blocks == 0
    for rid, (prompt, params) in requests.items():
        if rid in aborted:
            continue
        assert len(tokens[rid]) == params.n
        for sample in tokens[rid].values():
            assert len(sample) <= params.max_tokens
        if params.greedy:
            want = alone.generate([prompt], params)[0].outputs[0].token_ids
            assert tokens[rid][0] == want, rid
        elif params.seed is not None and params.presence_penalty == 0 and not params.stop:
            # Seeded samples are reproducible alone, whatever else ran beside them.
            want = [o.token_ids for o in alone.generate([prompt], params)[0].outputs]
            assert [tokens[rid][i] for i in range(params.n)] == want, rid
