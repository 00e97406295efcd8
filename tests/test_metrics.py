"""``GET /metrics``: vLLM's names and buckets, gauges from the engine cores' statistics, and the
frontend's per-request records (counts, timings) for every request whatever its protocol, with the
engine core in this process and in its own."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from conftest_serving import SMALL_KV_BLOCKS, build_engine, running_server, wait_blocks_released
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mini_vllm.actors import Overloaded, ServiceConfig, open_service
from mini_vllm.actors.core import DELTA, SCHEDULED, CoreStream, Outbox
from mini_vllm.actors.request_metrics import (
    FINISH_LABELS,
    INTER_TOKEN_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    RequestMetrics,
    one_two_five_buckets,
)
from mini_vllm.actors.request_stream import RequestStream
from mini_vllm.actors.service import Generation, Service
from mini_vllm.engine import EngineArgs, SamplingParams
from mini_vllm.engine.outputs import RequestDelta, SampleDelta
from mini_vllm.transport.client import connect
from mini_vllm.transport.http import Headers, HttpRequest
from mini_vllm.transport.metrics import CONTENT_TYPE, metrics_routes

pytestmark = pytest.mark.timeout(120)
MODEL = "demo"
# Long enough for whole 16-token blocks (the byte-level tokenizer: a token per byte), so that the
# second request with it hits the prefix cache.
PROMPT = "The quick brown fox jumps over the lazy dog, again and again and again."
LONG = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}


# ---- a route's view: a fake responder and a parsed scrape ------------------------------------------
@attrs.define
class RecordingResponder:
    """What a route sent: one whole response (a metrics route never streams)."""

    status: int | None = None
    body: bytes = b""
    content_type: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def started(self) -> bool:
        return self.status is not None

    async def send(self, status: int, body: bytes, content_type: str, headers: Headers = ()) -> None:
        if self.started:
            raise AssertionError("the route answered twice")
        self.status, self.body, self.content_type, self.headers = status, body, content_type, tuple(headers)

    async def start_stream(self, status: int, content_type: str, headers: Headers = ()) -> None:
        raise AssertionError("/metrics answers with one body")

    async def write(self, data: bytes) -> None:
        raise AssertionError("/metrics answers with one body")

    async def end_stream(self) -> None:
        raise AssertionError("/metrics answers with one body")


class Scrape:
    """One parsed exposition: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families: dict[str, Metric] = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        labels.setdefault("model_name", MODEL)
        found = [
            s.value for f in self.families.values() for s in f.samples
            if s.name == sample and s.labels == labels
        ]
        if len(found) != 1:
            raise AssertionError(f"{sample}{labels}: {len(found)} samples")
        return found[0]

    def buckets(self, histogram: str) -> list[tuple[str, float]]:
        return [
            (s.labels["le"], s.value) for s in self.families[histogram].samples
            if s.name == histogram + "_bucket" and s.labels["model_name"] == MODEL
        ]


async def scrape(service: Service) -> Scrape:
    route = metrics_routes(service)[("GET", "/metrics")]
    responder = RecordingResponder()
    await route(HttpRequest("GET", "/metrics", "", (), b"", "127.0.0.1"), responder)
    assert responder.status == 200
    assert responder.content_type == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    return Scrape(responder.body.decode())


# ---- the recorder alone, on made-up times --------------------------------------------------------
def test_a_value_counts_in_the_first_bucket_at_or_above_it() -> None:
    h = Histogram((0.1, 1.0, 10.0))
    for v in (0.0, 0.1, 0.10001, 1.0, 5.0, 11.0):
        h.observe(v)
    h.observe(2.0, times=3)
    snap = h.snapshot()
    assert snap.bounds == (0.1, 1.0, 10.0)
    assert snap.cumulative == (2, 4, 8, 9)  # le 0.1, le 1, le 10, +Inf
    assert snap.count == 9
    assert snap.sum == pytest.approx(0.1 + 0.10001 + 1.0 + 5.0 + 11.0 + 6.0)


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0), (1.0, math.inf), (math.nan,)])
def test_bounds_must_be_finite_and_increasing(bounds: Sequence[float]) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram(bounds)


def test_token_buckets_and_timing_buckets_are_vllms() -> None:
    assert one_two_five_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert one_two_five_buckets(4096)[-2:] == (1000, 2000)
    assert (TTFT_BUCKETS[0], TTFT_BUCKETS[-1], len(TTFT_BUCKETS)) == (0.001, 2560.0, 22)
    assert (INTER_TOKEN_BUCKETS[0], INTER_TOKEN_BUCKETS[-1], len(INTER_TOKEN_BUCKETS)) == (0.01, 80.0, 19)
    assert (REQUEST_LATENCY_BUCKETS[0], REQUEST_LATENCY_BUCKETS[-1], len(REQUEST_LATENCY_BUCKETS)) == (0.3, 7680.0, 21)
    with pytest.raises(ValueError, match="max_value must be >= 1"):
        one_two_five_buckets(0)


def test_request_timings_land_in_their_histograms() -> None:
    """Two requests on made-up times; a and b share batches (one core message each) at 2.0 and 2.5."""
    metrics = RequestMetrics({"m": 100})
    params = SamplingParams(max_tokens=10)
    a = metrics.start("m", 0.0, 7, params)
    b = metrics.start("m", 0.5, 3, params)
    a.mark_scheduled(0.25)
    b.mark_scheduled(1.0)
    a.tokens(1.0, 1)  # a's first token
    a.tokens(2.0, 1)  # a: 1.0 since its last
    b.tokens(2.0, 1)  # b's first token
    a.tokens(2.5, 1)  # both 0.5 since the batch before: counted once for the batch
    b.tokens(2.5, 1)
    a.tokens(2.5, 1)  # a second step in the same message: 0
    b.tokens(4.0, 2)  # b: 1.5
    a.ended(4.0, "length", 4, 4)
    b.ended(5.0, "stop", 4, 4)
    (m,) = metrics.snapshot()
    assert metrics.snapshot() == (m,)  # a snapshot counts nothing twice
    assert m.model == "m" and (m.prompt_tokens, m.generation_tokens) == (10, 8)
    assert dict(m.finished) == {"stop": 1, "length": 1, "abort": 0, "error": 0}
    itl = m.inter_token_latency
    assert (itl.count, itl.sum) == (5, pytest.approx(1.0 + 0.5 + 0.0 + 0.5 + 1.5))
    assert dict(zip(itl.bounds, itl.cumulative, strict=False))[0.01] == 1  # the 0
    assert dict(zip(itl.bounds, itl.cumulative, strict=False))[0.5] == 3
    assert dict(zip(itl.bounds, itl.cumulative, strict=False))[1.0] == 4
    expected = {
        "time_to_first_token": 1.0 + 1.5,
        "e2e_latency": 4.0 + 4.5,
        "queue_time": 0.25 + 0.5,
        "prefill_time": 0.75 + 1.0,
        "decode_time": 1.5 + 2.0,
        "inference_time": 2.25 + 3.0,
        "time_per_output_token": 1.5 / 3 + 2.0 / 3,
        "request_prompt_tokens": 10,
        "request_generation_tokens": 8,
        "request_max_generation_tokens": 8,
        "request_n": 2,
        "request_max_tokens": 20,
    }
    for field, total in expected.items():
        h = getattr(m, field)
        assert (h.count, h.sum) == (2, pytest.approx(total)), field


def test_a_request_never_scheduled_spent_its_life_queued() -> None:
    metrics = RequestMetrics({"m": 16})
    metrics.start("m", 1.0, 5, SamplingParams()).ended(4.0, "cancelled", 0, 0)
    (m,) = metrics.snapshot()
    assert m.finished_count("abort") == 1 and m.prompt_tokens == 0
    assert (m.queue_time.count, m.queue_time.sum) == (1, 3.0)
    assert (m.e2e_latency.count, m.time_to_first_token.count, m.prefill_time.count) == (1, 0, 0)


def test_the_stream_reports_its_samples_worst_reason_once_and_a_rejection_not_at_all() -> None:
    metrics = RequestMetrics({"m": 64})
    params = SamplingParams(n=2, max_tokens=8)

    def stream(n: int = 2) -> RequestStream:
        return RequestStream("r", "m", n, lambda _: None, metrics.start("m", 0.0, 3, params))

    s = stream()  # one sample stops, the other runs to its length
    s.push_parts(3, False, [(0, (5,), "", None, "stop"), (1, (6,), "", None, None)], now=1.0)
    s.push_parts(3, True, [(1, (7,), "", None, "length")], now=2.0)
    s.finish_cancelled(3.0)  # already ended: not counted again
    s = stream()
    s.push_parts(3, False, [(0, (5,), "", None, None)], now=1.0)
    s.fail("model_error", "boom", 2.0)
    s = stream(1)
    s.push_parts(3, False, [(0, (5,), "", None, None)], now=1.0)
    s.cancel()
    s.push_parts(3, True, [(0, (6,), "", None, "length")], now=2.0)  # landed after the abort left
    stream().reject(Overloaded("full"))
    (m,) = metrics.snapshot()
    assert dict(m.finished) == {"stop": 0, "length": 1, "abort": 1, "error": 1}
    assert m.generation_tokens == 3 + 1 + 1  # nothing after the cancel
    assert m.e2e_latency.count == 3 and m.request_max_generation_tokens.sum == 2 + 1 + 1


def test_the_core_says_once_when_a_request_was_first_scheduled() -> None:
    outbox = Outbox()
    stream = CoreStream("r", outbox)
    outbox.streams["r"] = stream
    for finished in (False, True):
        stream.push(RequestDelta("r", (SampleDelta(0, (1,), "", None, None),), 3, finished, scheduled_at=12.5))
    events = outbox.take()
    assert [e[0] for e in events] == [SCHEDULED, DELTA, DELTA]
    assert events[0] == (SCHEDULED, "r", 12.5)


def test_the_engine_stamps_a_request_when_first_scheduled(demo_model_dir: Path) -> None:
    engine = build_engine(demo_model_dir)
    try:
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
        before = time.monotonic()
        (first,) = engine.step()
        after = time.monotonic()
        assert first.scheduled_at is not None and before <= first.scheduled_at <= after
        while not (delta := engine.step()[0]).finished:
            assert delta.scheduled_at == first.scheduled_at
        assert delta.scheduled_at == first.scheduled_at
    finally:
        engine.close()


# ---- through the service ---------------------------------------------------------------------------
def _args(model_dir: Path, **kw: Any) -> EngineArgs:
    return EngineArgs(model=str(model_dir), model_name=MODEL, num_kv_blocks=SMALL_KV_BLOCKS, device="cpu", **kw)


async def _drain(generation: Generation) -> tuple[list[int], Any, str | None]:
    ids: list[int] = []
    usage, reason = None, None
    async for delta in generation:
        (sample,) = delta.samples
        ids.extend(sample.token_ids)
        reason = sample.finish_reason or reason
        usage = delta.usage
    return ids, usage, reason


async def test_every_family_is_there_before_any_request(demo_model_dir: Path) -> None:
    async with open_service([_args(demo_model_dir)], ServiceConfig(loop_lag_interval=None)) as service:
        got = await scrape(service)
        (model,) = service.models()
    for reason in FINISH_LABELS:
        assert got.value("vllm:request_success_total", finished_reason=reason) == 0
    for counter in ("prompt_tokens", "generation_tokens", "num_preemptions", "prefix_cache_queries",
                    "prefix_cache_hits"):
        assert got.value(f"vllm:{counter}_total") == 0, counter
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert got.value(f"vllm:{gauge}") == 0, gauge
    assert got.families["vllm:e2e_request_latency_seconds"].type == "histogram"
    assert got.buckets("vllm:time_to_first_token_seconds")[:2] == [("0.001", 0), ("0.005", 0)]
    assert got.buckets("vllm:e2e_request_latency_seconds")[-1] == ("+Inf", 0)
    # Token counts: 1, 2, 5, 10, ... up to the model's max_model_len
    top = one_two_five_buckets(model.max_model_len)
    assert [le for le, _ in got.buckets("vllm:request_prompt_tokens")] == [f"{float(b)}" for b in top] + ["+Inf"]
    assert "\nvllm:prompt_tokens_total{" in got.text  # the names keep their colon
    assert got.families["process_resident_memory_bytes"].samples[0].value > 0


# Every series vLLM's example Grafana dashboard queries (examples/online_serving/prometheus_grafana/
# grafana.json in vLLM's repository), each selected by model_name there.
DASHBOARD_SERIES = (
    "vllm:e2e_request_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:time_per_output_token_seconds_bucket", "vllm:time_per_output_token_seconds_sum",
    "vllm:time_per_output_token_seconds_count", "vllm:num_requests_running", "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket", "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count", "vllm:gpu_cache_usage_perc", "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket", "vllm:request_success_total", "vllm:request_queue_time_seconds_sum",
    "vllm:request_prefill_time_seconds_sum", "vllm:request_decode_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum",
)


async def test_every_series_of_vllms_grafana_dashboard_is_served(demo_model_dir: Path) -> None:
    async with open_service([_args(demo_model_dir)], ServiceConfig(loop_lag_interval=None)) as service:
        generation = service.generate("Hi", max_tokens=3, temperature=0, ignore_eos=True)
        async for _ in generation:
            pass
        got = await scrape(service)
    served = {(s.name, s.labels.get("model_name")) for family in got.families.values() for s in family.samples}
    missing = [name for name in DASHBOARD_SERIES if (name, "demo") not in served]
    assert not missing, missing
    # The deprecated names carry the same figures as their successors.
    assert got.value("vllm:gpu_cache_usage_perc") == got.value("vllm:kv_cache_usage_perc")
    assert got.buckets("vllm:time_per_output_token_seconds") == got.buckets("vllm:inter_token_latency_seconds")


@pytest.mark.parametrize("core_process", [False, True], ids=["core-in-process", "core-process"])
async def test_metrics_follow_the_requests(demo_model_dir: Path, core_process: bool) -> None:
    """One batch slot: a long request runs while a second waits (the gauges), then is aborted; the
    second runs to its length, a third stops at a stop token. Every count equals the usage sent."""
    config = ServiceConfig(core_process=core_process, loop_lag_interval=None)
    async with open_service([_args(demo_model_dir, max_num_seqs=1)], config) as service:
        usages, finished = [], []
        with trio.fail_after(60):
            running = service.generate("Hello there", **LONG)
            await running.__anext__()
            async with trio.open_nursery() as nursery:
                queued: dict[str, Any] = {}

                async def second() -> None:
                    queued["ids"], queued["usage"], queued["reason"] = await _drain(
                        service.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
                    )

                nursery.start_soon(second)
                for _ in range(LONG["max_tokens"] - 2):  # until the core reports the second one waiting
                    await running.__anext__()
                    during = await scrape(service)
                    if during.value("vllm:num_requests_waiting") == 1:
                        break
                else:
                    raise AssertionError("the second request never showed as waiting")
                assert during.value("vllm:num_requests_running") == 1
                assert 0 < during.value("vllm:kv_cache_usage_perc") <= 1
                running.cancel()
                ids, usage, reason = await _drain(running)
                usages.append(usage)
                finished.append(reason)
            usages.append(queued["usage"])
            finished.append(queued["reason"])
            stop_at = queued["ids"][2]  # the same greedy tokens again, ended by a stop token
            ids, usage, reason = await _drain(
                service.generate(PROMPT, max_tokens=5, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])
            )
            assert ids == queued["ids"][: queued["ids"].index(stop_at) + 1]
            usages.append(usage)
            finished.append(reason)
            await wait_blocks_released(service)
            got = await scrape(service)
        stats = service.statistics().scheduler(MODEL)

    assert finished == ["cancelled", "length", "stop"]
    for reason, count in {"stop": 1, "length": 1, "abort": 1, "error": 0}.items():
        assert got.value("vllm:request_success_total", finished_reason=reason) == count, reason
    prompt_tokens = sum(u.prompt_tokens for u in usages)
    completion = [u.completion_tokens for u in usages]
    assert got.value("vllm:prompt_tokens_total") == prompt_tokens
    assert got.value("vllm:generation_tokens_total") == sum(completion)
    assert got.value("vllm:request_prompt_tokens_sum") == prompt_tokens
    assert got.value("vllm:request_generation_tokens_sum") == sum(completion)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert got.value(f"vllm:{histogram}_count") == 3, histogram
    # One push per engine step and token (the CPU runs serially): an interval between each two.
    assert got.value("vllm:inter_token_latency_seconds_count") == sum(c - 1 for c in completion)
    seconds = {
        name: got.value(f"vllm:{name}_sum")
        for name in ("time_to_first_token_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                     "request_decode_time_seconds", "request_inference_time_seconds",
                     "inter_token_latency_seconds", "e2e_request_latency_seconds")
    }
    assert all(v >= 0 for v in seconds.values()), seconds
    # The intervals add up: queue + prefill = TTFT, prefill + decode = inference, the
    # inter-token intervals make up the decode, and nothing outlasts the whole request.
    ttft, queue, prefill = (seconds[k] for k in ("time_to_first_token_seconds", "request_queue_time_seconds",
                                                 "request_prefill_time_seconds"))
    assert queue + prefill == pytest.approx(ttft, abs=1e-6)
    assert prefill + seconds["request_decode_time_seconds"] == pytest.approx(
        seconds["request_inference_time_seconds"], abs=1e-6)
    assert seconds["inter_token_latency_seconds"] == pytest.approx(seconds["request_decode_time_seconds"], abs=1e-6)
    assert seconds["e2e_request_latency_seconds"] >= ttft + seconds["request_decode_time_seconds"] - 1e-6
    buckets = [count for _, count in got.buckets("vllm:e2e_request_latency_seconds")]
    assert buckets == sorted(buckets) and buckets[-1] == 3
    # The gauges and the engine's counters are the core's statistics (the prefix cache in tokens).
    assert got.value("vllm:num_requests_running") == 0 and got.value("vllm:num_requests_waiting") == 0
    assert got.value("vllm:kv_cache_usage_perc") == 0
    blocks = stats.blocks
    assert blocks.prefix_hits > 0  # the third request reused the second one's prompt blocks
    assert got.value("vllm:prefix_cache_hits_total") == blocks.prefix_hits * blocks.block_size
    assert got.value("vllm:prefix_cache_queries_total") == blocks.prefix_queries * blocks.block_size
    assert got.value("vllm:num_preemptions_total") == stats.engine.num_preemptions


async def test_websocket_requests_are_counted_too(demo_model_dir: Path) -> None:
    async with running_server([_args(demo_model_dir)], config=ServiceConfig(loop_lag_interval=None)) as (
        service, server,
    ):
        with trio.fail_after(30):
            async with connect(server.url) as client:
                done = await client.complete("Hello", max_tokens=4, temperature=0, ignore_eos=True)
            got = await scrape(service)
    assert got.value("vllm:request_success_total", finished_reason="length") == 1
    assert got.value("vllm:generation_tokens_total") == len(done.token_ids) == 4
    assert got.value("vllm:time_to_first_token_seconds_count") == 1
