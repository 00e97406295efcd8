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


@attrs.frozen
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


@attrs.frozen
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
