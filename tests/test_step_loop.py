"""The one step loop (engine/step_loop.py) on a recording stand-in: the order of its calls one step
ahead and serially, landing first when the next step needs real tokens, both drivers (inline and
awaited) alike, and a failed job forgotten."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from mini_vllm.engine.step_loop import StepLoop, StepResult

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """Steps 0, 1, 2, ... until ``steps`` are scheduled; records every call."""

    def __init__(self, steps: int, ahead: bool = True) -> None:
        self.calls: list[str] = []
        self.left = steps
        self.next = 0
        self.ahead = ahead
        self.fail_launch: int | None = None

    def has_unfinished_requests(self) -> bool:
        return self.left > 0

    def can_schedule_ahead(self) -> bool:
        return self.ahead

    def schedule(self, in_flight: Any = None) -> int | None:
        if self.left == 0:
            return None
        self.left -= 1
        batch, self.next = self.next, self.next + 1
        self.calls.append(f"schedule {batch}" + (f" ahead of {in_flight}" if in_flight is not None else ""))
        return batch

    def launch(self, batch: int) -> int:
        if batch == self.fail_launch:
            raise RuntimeError("the device failed")
        self.calls.append(f"launch {batch}")
        return batch

    def collect(self, handle: int) -> str:
        self.calls.append(f"collect {handle}")
        return f"tokens {handle}"

    def process(self, batch: int, output: str) -> list[Any]:
        self.calls.append(f"land {batch}")
        return [output]

    def batch_shape(self, batch: int) -> tuple[int, int, bool]:
        return 1, 1, True


def run_inline(loop: StepLoop, target: Recorder) -> list[Any]:
    deltas = []
    while loop.has_work(target):
        deltas.extend(loop.run(target).deltas)
    return deltas


def test_one_step_ahead_launches_the_next_step_before_landing_this_one() -> None:
    target = Recorder(3)
    loop = StepLoop(pipelined=True)
    loop.timings = []
    assert run_inline(loop, target) == ["tokens 0", "tokens 1", "tokens 2"]
    assert target.calls == [
        "schedule 0", "launch 0",
        "schedule 1 ahead of 0", "launch 1", "collect 0", "land 0",
        "schedule 2 ahead of 1", "launch 2", "collect 1", "land 1",
        "collect 2", "land 2",
    ]
    assert len(loop.timings) == 3 and not loop.in_flight


def test_serial_lands_each_step_before_the_next() -> None:
    target = Recorder(2)
    assert run_inline(StepLoop(pipelined=False), target) == ["tokens 0", "tokens 1"]
    assert target.calls == ["schedule 0", "launch 0", "collect 0", "land 0",
                            "schedule 1", "launch 1", "collect 1", "land 1"]


def test_a_step_that_needs_real_tokens_lands_the_one_in_flight_first() -> None:
    target = Recorder(3)
    loop = StepLoop(pipelined=True)
    loop.run(target)  # step 0 in flight
    target.ahead = False  # e.g. a request with penalties arrived
    loop.run(target)
    assert target.calls[2:] == ["collect 0", "land 0", "schedule 1", "launch 1"]


def test_the_awaited_driver_runs_the_same_calls() -> None:
    inline = Recorder(3)
    run_inline(StepLoop(pipelined=True), inline)
    awaited = Recorder(3)
    loop = StepLoop(pipelined=True)

    async def drive() -> None:  # as the scheduler actor does, the jobs on a worker thread
        while loop.has_work(awaited):
            steps = loop.step(awaited)
            try:
                job = next(steps)
                while True:
                    job = steps.send(await trio.to_thread.run_sync(job))
            except StopIteration as done:
                assert isinstance(done.value, StepResult)

    trio.run(drive)
    assert awaited.calls == inline.calls


def test_a_failed_job_leaves_nothing_in_flight() -> None:
    target = Recorder(3)
    loop = StepLoop(pipelined=True)
    loop.run(target)
    target.fail_launch = 1
    with pytest.raises(RuntimeError, match="the device failed"):
        loop.run(target)
    assert not loop.in_flight  # step 0's tokens are lost with the job: the driver rolls back
