"""What the decode profiles count as the GPU's work, on a made-up profile: kernels, not the
``engine.step`` annotation that torch also places on the GPU timeline (counted, it made the GPU
look 99.6 % busy), not copies; and the busy share with host and GPU time per step."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import torch

from mini_vllm.bench.trace import STEP_LABEL, device_kernels, summarize, trace_line

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


@attrs.frozen
class Range:
    start: float
    end: float


@attrs.frozen
class Event:
    name: str
    time_range: Range
    device_type: Any = CUDA
    is_user_annotation: bool = False


class Profile:
    def __init__(self, events: list[Event]) -> None:
        self._events = events

    def events(self) -> list[Event]:
        return self._events


def two_steps() -> Profile:
    # Two 10 ms host steps; each launches 3 ms of kernels; an annotation spans each step on the
    # GPU timeline as well as on the host's; a copy runs beside the kernels.
    events = []
    for step in range(2):
        t0 = step * 10_000.0
        events += [
            Event(STEP_LABEL, Range(t0, t0 + 10_000), CPU),
            Event(STEP_LABEL, Range(t0, t0 + 10_000), CUDA, is_user_annotation=True),
            Event("nvjet_matmul", Range(t0 + 100, t0 + 2_100)),
            Event("_decode_split_kernel", Range(t0 + 2_100, t0 + 3_100)),
            Event("Memcpy HtoD (Pinned -> Device)", Range(t0 + 3_000, t0 + 9_000)),
            Event("empty", Range(t0 + 5, t0 + 5)),  # no duration: no work
        ]
    return Profile(events)


def test_only_kernels_count_as_the_gpus_work() -> None:
    kernels = device_kernels(two_steps())
    assert [name for _, _, name in kernels] == ["nvjet_matmul", "_decode_split_kernel"] * 2
    # Torch builds without the attribute: the step label alone keeps the annotation out.
    bare = Profile([Event(STEP_LABEL, Range(0, 10_000)), Event("k", Range(1, 2))])
    assert [name for _, _, name in device_kernels(bare)] == ["k"]


def test_busy_share_and_time_per_step_on_both_sides() -> None:
    summary = summarize(device_kernels(two_steps()), 2, [0.010, 0.012])
    assert summary["gpu_busy_us_per_step"] == pytest.approx(3_000.0)
    assert summary["host_us_per_step"] == pytest.approx(11_000.0)
    # 6 ms of kernels between 0.1 ms and 13.1 ms: busy 6 of 13 ms, one gap of 7 ms between the steps.
    assert summary["gpu_busy_fraction"] == pytest.approx(6 / 13, abs=1e-4)
    assert summary["gaps"] == 1 and summary["gap_us_max"] == pytest.approx(7_000.0)
    assert trace_line(summary) == "GPU busy 46.2% over 2 decode steps; per step GPU 3.00 ms, host 11.00 ms"
