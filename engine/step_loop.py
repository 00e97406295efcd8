"""The step loop: schedule -> launch -> collect -> land, the one pipeline every driver runs.

On a GPU a launch returns at once, so the loop queues step N+1 on the device before it lands step
N: while the device works, the CPU lands N's tokens and then schedules N+2 (N+1's tokens are
placeholders until it lands). On the CPU a launch *is* the whole step, so the loop runs the halves
in order there (``pipelined=False``). When a request's next step needs the real tokens of the step
in flight (penalties count output tokens), that step lands first.

The loop is a generator of device jobs, so that one loop serves two drivers: ``StepLoop.run``
calls each job inline (the offline ``LLM``, ``LLMEngine.step``, the benchmarks), and the
scheduler actor hands each to its model's executor thread and awaits it, keeping its event loop
free while the device works. Everything else (scheduling, landing) runs on the driver's thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

import attrs

DeviceJob = Callable[[], Any]


@attrs.frozen
class StepTiming:
    """Host time of one step (benchmarks turn this on with ``loop.timings = []``)."""

    num_seqs: int  # sequences in the step launched
    num_tokens: int
    decode_only: bool
    schedule_s: float  # scheduling + input preparation
    launch_s: float  # filling buffers and enqueueing the device work
    wait_s: float  # blocked on the previous step's tokens (the GPU still busy)
    process_s: float  # landing tokens, stops, deltas


@attrs.frozen
class StepResult:
    deltas: list[Any]  # what ``process`` returned for every step landed in this turn
    progressed: bool  # something was launched or landed; False: nothing can run until a request changes


class Steppable(Protocol):
    """What the loop drives: ``LLMEngine``, or a stand-in (the memory benchmark's policy replay)."""

    def has_unfinished_requests(self) -> bool: ...
    def can_schedule_ahead(self) -> bool: ...
    def schedule(self, in_flight: Any = None) -> Any: ...  # a batch (None: nothing can run)
    def launch(self, batch: Any) -> Any: ...  # a handle; the only calls that touch the device are
    def collect(self, handle: Any) -> Any: ...  # these two
    def process(self, batch: Any, output: Any) -> list[Any]: ...
    def batch_shape(self, batch: Any) -> tuple[int, int, bool]: ...  # sequences, tokens, decode only


@attrs.frozen
class _InFlight:
    batch: Any
    handle: Any


class StepLoop:
    """The loop's state (the step in flight); each call is given what it drives, so that an engine
    can own its loop without a reference cycle."""

    def __init__(self, pipelined: bool) -> None:
        self.pipelined = pipelined
        self.timings: list[StepTiming] | None = None
        self._in_flight: _InFlight | None = None
        self._device_s = (0.0, 0.0)  # the last job's (launch, wait), written by the job itself

    @property
    def in_flight(self) -> bool:
        """A step is launched and not yet landed."""
        return self._in_flight is not None

    def has_work(self, target: Steppable) -> bool:
        return self._in_flight is not None or target.has_unfinished_requests()

    def reset(self) -> None:
        """Forget the step in flight: a job or a landing raised, and its output is lost."""
        self._in_flight = None

    def run(self, target: Steppable) -> StepResult:
        """One turn of the loop with every device job run inline."""
        steps = self.step(target)
        try:
            job = next(steps)
            while True:
                job = steps.send(job())
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except BaseException:
            self.reset()
            raise

    def step(self, target: Steppable) -> Generator[DeviceJob, Any, StepResult]:
        """One turn: yields device jobs for the driver to run, and is sent each job's result."""
        deltas: list[Any] = []
        landed_first = False
        if self._in_flight is not None and (not self.pipelined or not target.can_schedule_ahead()):
            previous, self._in_flight = self._in_flight, None
            output = yield lambda: target.collect(previous.handle)
            deltas.extend(target.process(previous.batch, output))
            landed_first = True
        t0 = time.perf_counter()
        ahead = self._in_flight.batch if self._in_flight is not None else None
        batch = target.schedule(ahead) if target.has_unfinished_requests() else None
        t1 = time.perf_counter()
        previous, self._in_flight = self._in_flight, None
        if batch is None and previous is None:
            return StepResult(deltas, landed_first)
        # One job: queue this step behind the one in flight on the device, then wait for that one's
        # tokens. Not pipelined, the step waits for its own tokens at once.
        handle, output = yield lambda: self._launch_then_collect(target, batch, previous)
        t2 = time.perf_counter()
        if self.pipelined:
            self._in_flight = _InFlight(batch, handle) if batch is not None else None
            landing = previous
        else:
            landing = _InFlight(batch, handle)
        if landing is not None:
            deltas.extend(target.process(landing.batch, output))
        if self.timings is not None and batch is not None:
            num_seqs, num_tokens, decode_only = target.batch_shape(batch)
            launch_s, wait_s = self._device_s
            self.timings.append(StepTiming(num_seqs, num_tokens, decode_only, t1 - t0, launch_s, wait_s,
                                           time.perf_counter() - t2))
        return StepResult(deltas, True)

    def _launch_then_collect(self, target: Steppable, batch: Any, previous: _InFlight | None) -> tuple[Any, Any]:
        # Runs on the driver's device thread: the only place that touches the device.
        t0 = time.perf_counter()
        handle = target.launch(batch) if batch is not None else None
        t1 = time.perf_counter()
        waited_for = handle if not self.pipelined else previous.handle if previous is not None else None
        output = target.collect(waited_for) if waited_for is not None else None
        self._device_s = (t1 - t0, time.perf_counter() - t1)
        return handle, output
