"""The service's configuration and its loading events: shared by the frontend and the engine core."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from mini_vllm.engine.errors import ConfigError


@attrs.frozen
class ServiceConfig:
    max_pending_per_model: int = attrs.field(default=256)  # admitted and unfinished requests per model
    loop_lag_interval: float | None = 0.01  # None: do not run the lag monitor
    # torch's intra-op threads when a model runs on the CPU. None: one fewer than the cores, so the
    # event loop keeps a core (on 2 cores, 2 torch threads tripled the demo's TPOT under load:
    # 22 ms against 6.5 ms with 1, docs/serving.md). Process-wide, as torch's setting is.
    cpu_threads: int | None = attrs.field(default=None)
    # Run the engine core (schedulers, executors, models) in a process of its own, so the event
    # loop serving clients never shares an interpreter lock with the one launching GPU work. Off:
    # the same core runs in this process, behind a memory link (tests, small CPU setups).
    core_process: bool = attrs.field(default=False)

    @core_process.validator
    def _check_core_process(self, _: Any, value: bool) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"core_process must be True or False, got {value!r}")

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
