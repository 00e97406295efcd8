"""Event-loop lag: how late a task that asked to wake up at time t actually runs.

A tiny actor sleeps until a deadline over and over and records how late it woke. Lag is what
every client feels on top of real work: a blocked loop delays every frame of every connection.
The window is bounded, so memory stays constant however long the server runs.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import attrs
import trio


@attrs.frozen
class LoopLagStats:
    interval_seconds: float
    samples: int  # in the current window
    mean_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[rank]


class LoopLagMonitor:
    def __init__(self, interval: float = 0.01, window: int = 30_000) -> None:  # 5 min at 10 ms
        self.interval = interval
        self._lags: collections.deque[float] = collections.deque(maxlen=window)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        deadline = trio.current_time()
        while True:
            deadline = max(deadline + self.interval, trio.current_time())
            await trio.sleep_until(deadline)
            self._lags.append(trio.current_time() - deadline)

    def reset(self) -> None:
        """Start a new measurement window (e.g. when a load phase begins)."""
        self._lags.clear()

    def statistics(self) -> LoopLagStats:
        values = sorted(self._lags)
        return LoopLagStats(
            interval_seconds=self.interval,
            samples=len(values),
            mean_ms=1000 * sum(values) / len(values) if values else 0.0,
            p50_ms=1000 * _percentile(values, 0.50),
            p99_ms=1000 * _percentile(values, 0.99),
            max_ms=1000 * (values[-1] if values else 0.0),
        )


@attrs.frozen
class LagUnderLoad:
    """Loop lag while idle and while a batch of requests streams, with the work done meanwhile."""

    requests: int
    max_tokens: int
    seconds: float
    generated_tokens: int
    steps: int
    mean_step_ms: float  # executor time per step: the lag every client would see if steps ran on the loop
    idle: LoopLagStats
    loaded: LoopLagStats


async def measure_loop_lag_under_load(
    service: Any,  # actors.Service (imported lazily: service imports this module)
    *,
    requests: int = 32,
    max_tokens: int = 64,
    prompt: str = "The event loop must stay responsive while the model runs.",
    model: str | None = None,
    idle_seconds: float = 1.0,
) -> LagUnderLoad:
    """Measure the loop lag idle, then while ``requests`` concurrent requests each stream ``max_tokens``."""
    monitor = service.loop_lag
    if monitor is None:
        raise RuntimeError("the service runs no loop-lag monitor (ServiceConfig.loop_lag_interval is None)")
    monitor.reset()
    if idle_seconds > 0:
        await trio.sleep(idle_seconds)
    idle = monitor.statistics()
    name = service.resolve_model(model)
    before = service.statistics().scheduler(name)
    executor_before = _executor(service, name)
    tokens = 0

    async def one() -> None:
        nonlocal tokens
        async for delta in service.generate(prompt, model=name, max_tokens=max_tokens, ignore_eos=True, temperature=0):
            tokens += sum(len(s.token_ids) for s in delta.samples)

    monitor.reset()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(requests):
            nursery.start_soon(one)
    seconds = trio.current_time() - started
    loaded = monitor.statistics()
    after = service.statistics().scheduler(name)
    executor_after = _executor(service, name)
    steps = after.steps - before.steps
    busy = executor_after.busy_seconds - executor_before.busy_seconds
    return LagUnderLoad(
        requests=requests,
        max_tokens=max_tokens,
        seconds=seconds,
        generated_tokens=tokens,
        steps=steps,
        mean_step_ms=1000 * busy / steps if steps else 0.0,
        idle=idle,
        loaded=loaded,
    )


def _executor(service: Any, name: str) -> Any:
    for e in service.statistics().executors:
        if e.name == name:
            return e
    raise KeyError(name)
