"""Requests and their sequences (one per sample), as the scheduler and engine track them."""

from __future__ import annotations

import enum

import attrs

from mini_vllm.engine.detokenizer import IncrementalDetokenizer
from mini_vllm.engine.outputs import FinishReason, TokenLogprob
from mini_vllm.engine.sampler import SamplingRow
from mini_vllm.engine.sampling_params import SamplingParams

# Stands in token_ids for a token sampled by a step still running on the device: the next step is
# scheduled before the previous one's tokens are known, and the runner fills the real id on the
# device. ``LLMEngine.process`` writes it back into the list.
PLACEHOLDER = -1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@attrs.define(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int  # lower is served first (as in vLLM)
    arrival: int  # a counter, not a clock: FCFS order is exact and tests are deterministic
    sequences: list[Sequence] = attrs.field(factory=list)
    forked: bool = False  # n > 1 samples have been split off after the prefill
    # Text and stop strings here (False: the engine core's frontend detokenizes; deltas carry ids)
    detokenize: bool = True
    # time.monotonic() when the scheduler first put it in a batch (queue-time metrics); None before
    scheduled_at: float | None = None
    # The sampling row of every step past min_tokens when nothing in it changes from step to step
    # (no seed per position, no penalties over the output): made once, not once per sample per
    # step. None: prepare_inputs makes each step's row.
    static_row: SamplingRow | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        per_step = self.params.seed is not None or self.params.uses_penalties
        self.static_row = None if per_step else SamplingRow(self.params, None, [], (), None)

    @property
    def finished(self) -> bool:
        return all(s.status is SeqStatus.FINISHED for s in self.sequences)


@attrs.define(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which sample of the request
    token_ids: list[int]  # prompt + output so far
    detokenizer: IncrementalDetokenizer | None
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    # News since the last delta handed out (the streaming path drains these each step).
    new_token_ids: list[int] = attrs.field(factory=list)
    new_logprobs: list[TokenLogprob] = attrs.field(factory=list)
    delta_pending: bool = False
    # All tokens it may produce are scheduled (max_tokens / max_model_len): schedule no more.
    length_capped: bool = False
    # A plain attribute, not a property: the scheduler, the input preparation and the landing
    # read it for every sequence of every step. A request's prompt never changes.
    num_prompt_tokens: int = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.num_prompt_tokens = len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.request.priority, self.request.arrival, self.index)
