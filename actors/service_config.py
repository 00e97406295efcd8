"""The service's configuration and its loading events: shared by the frontend and the engine core."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from mini_vllm.engine.errors import ConfigError
from mini_vllm.engine.sampling_params import MAX_LOGPROBS


def _limit(low: int, high: int | None = None) -> Any:
    """An attrs validator: an integer in [low, high] (no upper bound when ``high`` is None)."""

    def check(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ConfigError(f"{attribute.name} must be an integer {allowed}, got {value!r}")

    return check


@attrs.frozen
class ServiceConfig:
    # Admitted and unfinished requests per model: a queue bound, four times the default batch
    # (max_num_seqs 256), so that one client's fair share of it (a quarter) still fills a batch.
    max_pending_per_model: int = attrs.field(default=1024)
    loop_lag_interval: float | None = 0.01  # None: do not run the lag monitor
    # torch's intra-op threads when a model runs on the CPU. None: one fewer than the cores, so the
    # event loop keeps a core (on 2 cores, 2 torch threads tripled the demo's TPOT under load:
    # 22 ms against 6.5 ms with 1, docs/serving.md). Process-wide, as torch's setting is.
    cpu_threads: int | None = attrs.field(default=None)
    # Run the engine core (schedulers, executors, models) in a process of its own, so the event
    # loop serving clients never shares an interpreter lock with the one launching GPU work. Off:
    # the same core runs in this process, behind a memory link (tests, small CPU setups).
    core_process: bool = attrs.field(default=False)
    # Seconds an engine core gets to end its requests and stop; then a core process is killed, and
    # an in-process core's wedged step is abandoned: no shutdown waits forever on a step.
    stop_timeout: float = attrs.field(default=10.0)
    # Per-request limits the ingress applies before a request reaches an engine core, so that no
    # client can make a step, the frontend or the event loop slow or fail for the others
    # (docs/protocol.md, "Request limits"). Each bounds work that grows with the field.
    max_n: int = attrs.field(default=64, validator=_limit(1))  # samples per request (OpenAI: 128)
    max_logprobs: int = attrs.field(default=MAX_LOGPROBS, validator=_limit(0, MAX_LOGPROBS))  # as vLLM
    max_stop_strings: int = attrs.field(default=16, validator=_limit(0))  # checked per token per sample
    max_stop_string_chars: int = attrs.field(default=128, validator=_limit(1))  # held-back text per sample
    max_stop_token_ids: int = attrs.field(default=64, validator=_limit(0))  # masked per step before min_tokens
    # n × min(max_tokens, max_model_len - prompt tokens): the tokens one request can make in all.
    max_request_tokens: int = attrs.field(default=1 << 18, validator=_limit(1))

    @core_process.validator
    def _check_core_process(self, _: Any, value: bool) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"core_process must be True or False, got {value!r}")

    @stop_timeout.validator
    def _check_stop_timeout(self, _: Any, value: float) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise ConfigError(f"stop_timeout must be a positive number of seconds, got {value!r}")

    @cpu_threads.validator
    def _check_threads(self, _: Any, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"cpu_threads must be an integer >= 1 or None (auto), got {value!r}")

    @max_pending_per_model.validator
    def _check_pending(self, _: Any, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"max_pending_per_model must be an integer >= 1, got {value!r}")


@attrs.frozen
class LoadProgress:
    """One model-loading event, for progress displays."""

    index: int  # 0-based position in the list of models
    total: int
    model: str  # what was asked for (path, preset, or "demo")
    phase: Literal["loading", "loaded"]
    seconds: float  # time spent so far on this model
    kv_rule: str
