"""Sampling parameters, with vLLM's names, validated when built."""

from __future__ import annotations

import math
from typing import Any, NoReturn

import attrs

from mini_vllm.engine.errors import ConfigError

MAX_LOGPROBS = 20
# Integers are bounded to 64 bits: anything larger cannot become a tensor index or a generator
# seed, and a huge Python int costs memory and time to carry (a wire frame can hold 4300 digits).
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1


def _check(cond: bool, field: str, allowed: str, value: object) -> None:
    if not cond:
        _fail(field, allowed, value)


def _fail(field: str, allowed: str, value: object, where: str = "") -> NoReturn:
    """``where``: the element of a list field that is wrong (``[3]``), named in the message."""
    raise ConfigError(f"{field} must be {allowed}, got {field + where + ' = ' if where else ''}{show_value(value)}")


def show_value(value: object, limit: int = 80) -> str:
    """A value for an error message, short whatever was sent (a 70,000-string list, a 4000-digit int)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)  # escapes lone surrogates, so the message itself is valid UTF-8
    except ValueError:  # an int beyond Python's str conversion limit
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate in ``text`` (which JSON's ``\\ud800`` escapes allow), else
    None. Such a string is no valid UTF-8: a tokenizer refuses it and a frame echoing it cannot be sent."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _is_number(value: object) -> bool:
    # inf passes every ">= 0" check (JSON gives it for 1e400), so finiteness is part of being a number
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


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
        _check(_int_in(self.n, 1, INT64_MAX), "n", "an integer >= 1 (at most 2**63-1)", self.n)
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", "a finite number >= 0", self.temperature)
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(
            _int_in(self.top_k, -1, INT64_MAX), "top_k",
            "-1 (disabled) or an integer >= 0 (at most 2**63-1)", self.top_k,
        )
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty", "a finite number > 0", self.repetition_penalty,
        )
        _check(_is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(_is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        # Signed or unsigned 64 bits: clients send either (a random u64 is a common seed).
        _check(
            self.seed is None or _int_in(self.seed, INT64_MIN, UINT64_MAX), "seed",
            "an integer or None (within 64 bits: [-2**63, 2**64-1])", self.seed,
        )
        _check(_int_in(self.max_tokens, 1, INT64_MAX), "max_tokens", "an integer >= 1 (at most 2**63-1)", self.max_tokens)
        _check(
            _int_in(self.min_tokens, 0, self.max_tokens), "min_tokens",
            f"an integer in [0, max_tokens={self.max_tokens}]", self.min_tokens,
        )
        for i, s in enumerate(self.stop):  # the first bad one by its index: the list may be long
            if not isinstance(s, str) or not s:
                _fail("stop", "a list of non-empty strings", s, f"[{i}]")
            if (at := lone_surrogate(s)) is not None:
                _fail("stop", f"valid Unicode text (a lone surrogate is at index {at})", s, f"[{i}]")
        for i, t in enumerate(self.stop_token_ids):
            if not _int_in(t, 0, INT64_MAX):
                _fail("stop_token_ids", "a list of token ids >= 0 (at most 2**63-1)", t, f"[{i}]")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "true or false", self.ignore_eos)
        _check(
            self.logprobs is None or _int_in(self.logprobs, 0, MAX_LOGPROBS),
            "logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]", self.logprobs,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        """Repetition, presence or frequency penalties: the sampler needs the real output tokens."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

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
