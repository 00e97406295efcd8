"""The scheduling policy alone (no model): budget, order, chunking, admission limits, preemption."""

from __future__ import annotations

import pytest

from mini_vllm.engine.block_manager import BlockManager
from mini_vllm.engine.errors import ConfigError
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.scheduler import Scheduler
from mini_vllm.engine.sequence import PLACEHOLDER, Request, SeqStatus, Sequence


def make(num_blocks: int = 64, max_seqs: int = 8, budget: int = 64, block_size: int = 4) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, False, "t"), max_seqs, budget, max_model_len=1024)


def add(sched: Scheduler, rid: int, prompt_len: int, priority: int = 0, max_tokens: int = 100) -> Sequence:
    req = Request(f"r{rid}", None, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), priority, rid)
    seq = Sequence(rid, req, 0, list(req.prompt_token_ids), None)
    req.sequences.append(seq)
    sched.add(seq)
    return seq


def land(sched: Scheduler) -> None:
    """What the engine does when a step lands: real tokens replace the placeholders."""
    for seq in sched.running:
        seq.token_ids = [7 if t == PLACEHOLDER else t for t in seq.token_ids]


def test_decodes_first_then_prefills_within_the_budget() -> None:
    sched = make(budget=20)
    a = add(sched, 0, 10)
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens, s.num_samples) for s in out.seqs] == [(a, 10, 1)]
    land(sched)
    b = add(sched, 1, 30)
    out = sched.schedule()
    # a decodes (1 token), b gets the rest of the budget as a chunk that does not sample yet
    assert [(s.seq, s.num_new_tokens, s.num_samples) for s in out.seqs] == [(a, 1, 1), (b, 19, 0)]
    land(sched)
    out = sched.schedule()
    assert [(s.seq, s.start, s.num_new_tokens, s.num_samples) for s in out.seqs] == [(a, 11, 1, 1), (b, 19, 11, 1)]


def test_max_num_seqs_limits_admission() -> None:
    sched = make(max_seqs=2)
    for i in range(3):
        add(sched, i, 4)
    out = sched.schedule()
    assert len(out.seqs) == 2 and len(sched.waiting) == 1


def test_priority_then_arrival_order() -> None:
    sched = make(budget=8)
    late_urgent = add(sched, 5, 8, priority=-1)
    add(sched, 1, 8)
    out = sched.schedule()
    assert [s.seq for s in out.seqs] == [late_urgent]


def test_preemption_takes_the_latest_arrival_and_loses_nothing() -> None:
    sched = make(num_blocks=4, budget=64)  # 16 token slots
    first = add(sched, 0, 7)
    second = add(sched, 1, 7)
    sched.schedule()  # both prefill: 2 blocks each, all 4 used
    land(sched)
    sched.schedule()  # position 7 still fits in each second block
    land(sched)
    out = sched.schedule()  # position 8 needs a new block each: the later arrival yields
    assert out.preempted == (second,)
    assert second.status is SeqStatus.WAITING and second.num_computed_tokens == 0
    assert [s.seq for s in out.seqs] == [first]
    assert sched.block_manager.statistics().used_blocks == 3
    sched.block_manager.check_invariants()


def test_no_admission_in_a_step_that_preempted() -> None:
    sched = make(num_blocks=4, budget=64)
    add(sched, 0, 7)
    add(sched, 1, 7)
    sched.schedule()
    land(sched)
    sched.schedule()
    land(sched)
    add(sched, 2, 1)
    out = sched.schedule()
    assert out.preempted and all(s.seq.seq_id != 2 for s in out.seqs)


def test_length_capped_sequence_is_not_scheduled_again() -> None:
    sched = make()
    seq = add(sched, 0, 4, max_tokens=1)
    sched.schedule()
    assert seq.length_capped  # its only token is in flight
    assert sched.schedule().seqs == ()


def test_without_chunked_prefill_prompts_go_whole_in_prefill_only_steps() -> None:
    sched = Scheduler(BlockManager(64, 4, False, "t"), 8, 40, max_model_len=40, chunked_prefill=False)
    a = add(sched, 0, 10)
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens, s.num_samples) for s in out.seqs] == [(a, 10, 1)]
    land(sched)
    b, c = add(sched, 1, 25), add(sched, 2, 20)
    out = sched.schedule()
    # b whole, alone: a's decode waits, and c (which would fit only as a chunk) waits for the next step
    assert [(s.seq, s.num_new_tokens) for s in out.seqs] == [(b, 25)]
    land(sched)
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in out.seqs] == [(c, 20)]
    land(sched)
    out = sched.schedule()  # nothing waits: everyone decodes
    assert [(s.seq, s.num_new_tokens) for s in out.seqs] == [(a, 1), (b, 1), (c, 1)]


def test_without_chunked_prefill_the_budget_must_hold_a_whole_prompt() -> None:
    with pytest.raises(ConfigError, match="max_num_batched_tokens .* must be >= max_model_len"):
        Scheduler(BlockManager(64, 4, False, "t"), 8, 40, max_model_len=1024, chunked_prefill=False)
