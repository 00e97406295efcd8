"""Per-request timings and counts, recorded in the frontend for every request, whatever its protocol.

The ingress opens a ``RequestTiming`` when it admits a request (its arrival: before tokenizing, as
vLLM's ``arrival_time``); the request's ``RequestStream`` feeds it as the engine core's news lands:
when the core first scheduled it, each push of new tokens (one per engine step), and the end. The
figures accumulate per model in ``ModelMetrics``: counters and histograms with vLLM's fixed bucket
boundaries, cumulative since the service started. ``RequestMetrics.snapshot()`` hands them out as
frozen records; ``transport/metrics.py`` turns those into Prometheus' exposition (no Prometheus here).

Every time is the frontend's ``time.monotonic()``. The core's own timestamps (when it scheduled a
request) reach the frontend as ages ("that long before this message left"), so no interval ever
mixes two processes' clocks.

The unit is the request, whatever its ``n``: one observation per request for the per-request
histograms; its finish reason is the worst of its samples' (error > abort > length > stop).

Cost: nothing per token; per engine step and request, one call that makes two float comparisons
and two integer adds in the common case. The requests that got their previous tokens in the
previous batch (one ``CoreStep`` of the core) all share one inter-token interval, so it is counted
there and put in its bucket once per batch, not once per request.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Literal

import attrs

from mini_vllm.actors.request_stream import FinishReason
from mini_vllm.engine.sampling_params import SamplingParams

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so that dashboards and alerts made for
# vLLM read the same buckets here.
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)
INTER_TOKEN_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)
N_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20)

# vLLM's ``finished_reason`` label values, in the order a request's samples' reasons rank.
FinishLabel = Literal["stop", "length", "abort", "error"]
FINISH_LABELS: tuple[FinishLabel, ...] = ("stop", "length", "abort", "error")
_LABEL_OF: dict[FinishReason, FinishLabel] = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def one_two_five_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's buckets for token counts)."""
    if max_value < 1:
        raise ValueError(f"max_value must be >= 1, got {max_value}")
    bounds: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(bounds)
            bounds.append(mantissa * scale)
        scale *= 10


@attrs.frozen
class HistogramSnapshot:
    bounds: tuple[float, ...]  # upper bounds ("le"), strictly increasing; +Inf is implied
    cumulative: tuple[int, ...]  # observations <= each bound, then all of them (the +Inf bucket)
    sum: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class Histogram:
    """Counts per fixed bucket and the sum, since creation (Prometheus' cumulative histogram)."""

    __slots__ = ("_counts", "_sum", "bounds")

    def __init__(self, bounds: Sequence[float]) -> None:
        edges = tuple(float(b) for b in bounds)
        if not edges or not all(math.isfinite(b) for b in edges) or any(a >= b for a, b in itertools.pairwise(edges)):
            raise ValueError(f"histogram bounds must be finite and strictly increasing, got {bounds!r}")
        self.bounds = edges
        self._counts = [0] * (len(edges) + 1)  # the last one: above every bound
        self._sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Count ``value`` ``times`` times (in the first bucket whose bound is >= value)."""
        self._counts[bisect_left(self.bounds, value)] += times
        self._sum += value * times

    def snapshot(self) -> HistogramSnapshot:
        cumulative, total = [], 0
        for c in self._counts:
            total += c
            cumulative.append(total)
        return HistogramSnapshot(self.bounds, tuple(cumulative), self._sum)


@attrs.frozen
class ModelMetricsSnapshot:
    """One model's request figures since the service started (see ``ModelMetrics``)."""

    model: str
    prompt_tokens: int
    generation_tokens: int
    finished: tuple[tuple[FinishLabel, int], ...]  # every label of FINISH_LABELS, in that order
    time_to_first_token: HistogramSnapshot
    inter_token_latency: HistogramSnapshot
    e2e_latency: HistogramSnapshot
    queue_time: HistogramSnapshot
    prefill_time: HistogramSnapshot
    decode_time: HistogramSnapshot
    inference_time: HistogramSnapshot
    time_per_output_token: HistogramSnapshot
    request_prompt_tokens: HistogramSnapshot
    request_generation_tokens: HistogramSnapshot
    request_max_generation_tokens: HistogramSnapshot
    request_n: HistogramSnapshot
    request_max_tokens: HistogramSnapshot

    def finished_count(self, label: FinishLabel) -> int:
        return dict(self.finished)[label]


class ModelMetrics:
    """The running figures of one served model. Only the frontend's event loop writes them."""

    def __init__(self, model: str, max_model_len: int) -> None:
        self.model = model
        self.prompt_tokens = 0  # of requests whose prefill finished (their first token arrived)
        self.generation_tokens = 0  # tokens that reached the requests' streams (what usage counts)
        self.finished: dict[FinishLabel, int] = dict.fromkeys(FINISH_LABELS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(INTER_TOKEN_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = Histogram(REQUEST_LATENCY_BUCKETS)
        self.prefill = Histogram(REQUEST_LATENCY_BUCKETS)
        self.decode = Histogram(REQUEST_LATENCY_BUCKETS)
        self.inference = Histogram(REQUEST_LATENCY_BUCKETS)
        self.tpot = Histogram(INTER_TOKEN_BUCKETS)
        tokens = one_two_five_buckets(max_model_len)
        self.request_prompt_tokens = Histogram(tokens)
        self.request_generation_tokens = Histogram(tokens)
        self.request_max_generation_tokens = Histogram(tokens)
        self.request_n = Histogram(N_BUCKETS)
        self.request_max_tokens = Histogram(tokens)
        # The batch being landed (the time its pushes carry) and the one before. A request whose
        # previous tokens came in the previous batch waits exactly ``batch_at - batch_prev``: such
        # intervals are counted in ``itl_pending`` and observed together (see ``flush``).
        self.batch_prev = -math.inf
        self.batch_at = -math.inf
        self.itl_pending = 0

    def new_batch(self, now: float) -> None:
        self.flush()
        self.batch_prev, self.batch_at = self.batch_at, now

    def flush(self) -> None:
        """Observe the inter-token intervals counted in the current batch so far."""
        if self.itl_pending:
            self.itl.observe(self.batch_at - self.batch_prev, self.itl_pending)
            self.itl_pending = 0

    def snapshot(self) -> ModelMetricsSnapshot:
        self.flush()
        return ModelMetricsSnapshot(
            model=self.model,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            finished=tuple((label, self.finished[label]) for label in FINISH_LABELS),
            time_to_first_token=self.ttft.snapshot(),
            inter_token_latency=self.itl.snapshot(),
            e2e_latency=self.e2e.snapshot(),
            queue_time=self.queue.snapshot(),
            prefill_time=self.prefill.snapshot(),
            decode_time=self.decode.snapshot(),
            inference_time=self.inference.snapshot(),
            time_per_output_token=self.tpot.snapshot(),
            request_prompt_tokens=self.request_prompt_tokens.snapshot(),
            request_generation_tokens=self.request_generation_tokens.snapshot(),
            request_max_generation_tokens=self.request_max_generation_tokens.snapshot(),
            request_n=self.request_n.snapshot(),
            request_max_tokens=self.request_max_tokens.snapshot(),
        )


class RequestTiming:
    """One request's timestamps (frontend clock), fed by its stream; it writes its model's figures."""

    __slots__ = ("_metrics", "arrival", "first_token", "last_token", "max_tokens", "n", "prompt_tokens", "scheduled")

    def __init__(self, metrics: ModelMetrics, arrival: float, prompt_tokens: int, n: int, max_tokens: int) -> None:
        self._metrics = metrics
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.n = n
        self.max_tokens = max_tokens
        self.scheduled: float | None = None  # when the engine core first put it in a batch
        self.first_token: float | None = None
        self.last_token: float | None = None

    def mark_scheduled(self, at: float) -> None:
        if self.scheduled is None:
            self.scheduled = max(at, self.arrival)

    def tokens(self, now: float, count: int) -> None:
        """``count`` new tokens (all samples together) arrived at ``now``: one engine step's."""
        m = self._metrics
        if now != m.batch_at:
            m.new_batch(now)
        last = self.last_token
        if last is None:
            self.first_token = now
            m.ttft.observe(now - self.arrival)
            m.prompt_tokens += self.prompt_tokens
        elif last == m.batch_prev:
            m.itl_pending += 1  # the interval every request of the previous batch shares
        else:
            m.itl.observe(now - last)
        self.last_token = now
        m.generation_tokens += count

    def ended(self, now: float, reason: FinishReason, generation_tokens: int, longest_sample: int) -> None:
        """The request ended at ``now`` (finished, aborted or failed after it started)."""
        m = self._metrics
        arrival = self.arrival
        end = max(now, arrival)
        m.finished[_LABEL_OF[reason]] += 1
        m.e2e.observe(end - arrival)
        scheduled, first, last = self.scheduled, self.first_token, self.last_token
        # Never in a batch (aborted while queued): its whole life was spent waiting.
        m.queue.observe((scheduled if scheduled is not None else end) - arrival)
        if scheduled is not None and first is not None and last is not None:
            m.prefill.observe(max(first - scheduled, 0.0))
            m.decode.observe(last - first)
            m.inference.observe(max(last - scheduled, 0.0))
            m.tpot.observe((last - first) / (longest_sample - 1) if longest_sample > 1 else 0.0)
        m.request_prompt_tokens.observe(self.prompt_tokens)
        m.request_generation_tokens.observe(generation_tokens)
        m.request_max_generation_tokens.observe(longest_sample)
        m.request_n.observe(self.n)
        m.request_max_tokens.observe(self.max_tokens)


class RequestMetrics:
    """The recorder: one ``ModelMetrics`` per served model, for the service's lifetime."""

    def __init__(self, models: Mapping[str, int]) -> None:
        """``models``: each served model's name and its max_model_len (the token buckets' top)."""
        self._models = {name: ModelMetrics(name, max_len) for name, max_len in models.items()}

    def start(self, model: str, arrival: float, prompt_tokens: int, params: SamplingParams) -> RequestTiming:
        """The timing of a request admitted for ``model``; nothing is counted before it ends or
        gets tokens (a request refused after this call leaves no trace)."""
        return RequestTiming(self._models[model], arrival, prompt_tokens, params.n, params.max_tokens)

    def snapshot(self) -> tuple[ModelMetricsSnapshot, ...]:
        return tuple(m.snapshot() for m in self._models.values())


__all__ = [
    "FINISH_LABELS",
    "INTER_TOKEN_BUCKETS",
    "N_BUCKETS",
    "REQUEST_LATENCY_BUCKETS",
    "TTFT_BUCKETS",
    "FinishLabel",
    "Histogram",
    "HistogramSnapshot",
    "ModelMetrics",
    "ModelMetricsSnapshot",
    "RequestMetrics",
    "RequestTiming",
    "one_two_five_buckets",
]
