"""What the engine hands back: per-step deltas (for streaming) and whole results (offline)."""

from __future__ import annotations

from typing import Literal

import attrs

FinishReason = Literal["stop", "length", "abort"]


@attrs.frozen
class TokenLogprob:
    """The chosen token's log-probability and the top-k alternatives at that position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first


# The two delta records are not frozen: a frozen attrs record sets each field through
# object.__setattr__, four times the cost of a plain one, and every step makes one of each per
# request it touched (a quarter of the host's work per decode step at 256 sequences). The engine
# never changes one after handing it out.
@attrs.define
class SampleDelta:
    """New output of one sample (``index`` < n) of a request since the previous step.

    ``text`` is what may be shown now: text that could still turn into a stop string is held
    back until it is decided. ``finish_reason`` is set on the sample's last delta.
    """

    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason | None


@attrs.define
class RequestDelta:
    """One step's news for one request: a delta per sample that changed."""

    request_id: str
    samples: tuple[SampleDelta, ...]
    num_prompt_tokens: int
    finished: bool  # every sample has finished
    scheduled_at: float | None = None  # time.monotonic() of the engine's process when first scheduled


@attrs.frozen
class CompletionOutput:
    """One finished sample, shaped like vLLM's."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None


@attrs.frozen
class RequestOutput:
    """One finished request, shaped like vLLM's ``RequestOutput``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
