"""Sampling parameters, with vLLM's names, validated when built."""

from __future__ import annotations

from typing import Any

import attrs

from mini_vllm.engine.errors import ConfigError

MAX_LOGPROBS = 20


def _check(cond: bool, field: str, allowed: str, value: object) -> None:
    if not cond:
        raise ConfigError(f"{field} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@attrs.frozen
class SamplingParams:
    """How to pick tokens for one request.

    ``temperature == 0`` is greedy. ``stop`` strings are stripped from the output and never
    partially emitted. ``logprobs=k`` returns the top-k log-probabilities (and the chosen token's).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): whole vocabulary
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = attrs.field(default=(), converter=lambda s: (s,) if isinstance(s, str) else tuple(s))
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __attrs_post_init__(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0", self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and (self.top_k >= 0 or self.top_k == -1), "top_k", "-1 (disabled) or an integer >= 0", self.top_k)
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "a number > 0", self.repetition_penalty)
        _check(_is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(_is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        _check(self.seed is None or _is_int(self.seed), "seed", "an integer or None", self.seed)
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", list(self.stop))
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "a list of token ids >= 0", list(self.stop_token_ids))
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "true or false", self.ignore_eos)
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]", self.logprobs,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> SamplingParams:
        """Build from a JSON-like dict; an unknown field is an error, not silently dropped."""
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"unknown sampling field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**fields)
        except TypeError as exc:  # e.g. stop given as a number: the converter's tuple() fails
            raise ConfigError(f"bad sampling field: {exc}") from None
