"""``GET /metrics``: Prometheus' text exposition, with vLLM's metric names and ``model_name`` label.

A dashboard or alert made for vLLM reads this server unchanged (docs/metrics.md lists what is
exposed and what cannot be). Nothing is kept here between scrapes: each scrape reads

- the service's ``statistics()`` for the gauges and the engine's own counters (running and waiting
  requests, KV-cache usage, prefix-cache queries and hits, preemptions), as the engine cores last
  reported them;
- ``service.request_metrics`` (``actors/request_metrics.py``) for the per-request counters and
  histograms, recorded in the frontend for every request whatever its protocol.

The registry is the server's own (never prometheus_client's global one): two servers in one
process expose their own figures. It also carries prometheus_client's process, platform and GC
collectors, as vLLM's does; they describe this (the frontend's) process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mini_vllm.actors.request_metrics import HistogramSnapshot, ModelMetricsSnapshot
from mini_vllm.actors.scheduler import SchedulerStats
from mini_vllm.actors.service import Service
from mini_vllm.transport.http import HttpRequest, HttpResponder, Routes

MODEL_LABEL = "model_name"
# Always the classic text format, whatever the scrape's Accept: every Prometheus reads it, and it
# keeps the names' colons (prometheus_client 0.26 writes OpenMetrics with "vllm:" made "vllm_").
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, help, the snapshot's field) of each per-request histogram.
_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", "time_to_first_token"),
    ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", "inter_token_latency"),
    # vLLM's earlier name for the same histogram, which its example Grafana dashboard still reads
    # (examples/online_serving/prometheus_grafana/grafana.json: "Time Per Output Token Latency").
    ("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds (deprecated name of "
     "vllm:inter_token_latency_seconds).", "inter_token_latency"),
    ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", "e2e_latency"),
    ("vllm:request_queue_time_seconds", "Histogram of time spent waiting to be first scheduled, from arrival.",
     "queue_time"),
    ("vllm:request_prefill_time_seconds", "Histogram of time from first scheduled to the first token.",
     "prefill_time"),
    ("vllm:request_decode_time_seconds", "Histogram of time from the first token to the last.", "decode_time"),
    ("vllm:request_inference_time_seconds", "Histogram of time from first scheduled to the last token.",
     "inference_time"),
    ("vllm:request_time_per_output_token_seconds", "Histogram of each request's mean time per output token.",
     "time_per_output_token"),
    ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", "request_prompt_tokens"),
    ("vllm:request_generation_tokens", "Number of generation tokens processed.", "request_generation_tokens"),
    ("vllm:request_max_num_generation_tokens", "Histogram of the longest sample's tokens in each request.",
     "request_max_generation_tokens"),
    ("vllm:request_params_n", "Histogram of the n request parameter.", "request_n"),
    ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", "request_max_tokens"),
)


class ServiceCollector(Collector):
    """Builds every ``vllm:`` metric family from the service at scrape time."""

    def __init__(self, service: Service) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        stats = self._service.statistics().schedulers
        requests = self._service.request_metrics.snapshot()
        yield from _engine_families(stats)
        yield from _request_families(requests)


def _engine_families(stats: tuple[SchedulerStats, ...]) -> Iterator[Metric]:
    running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.",
                                labels=[MODEL_LABEL])
    waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                labels=[MODEL_LABEL])
    usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                              labels=[MODEL_LABEL])
    # The earlier name of the same gauge, read by vLLM's example dashboard's "Cache Utilization".
    gpu_usage = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "KV-cache usage (deprecated name of "
                                  "vllm:kv_cache_usage_perc). 1 means 100 percent usage.", labels=[MODEL_LABEL])
    queries = CounterMetricFamily("vllm:prefix_cache_queries",
                                  "Prefix cache queries, in terms of number of queried tokens (full blocks).",
                                  labels=[MODEL_LABEL])
    hits = CounterMetricFamily("vllm:prefix_cache_hits",
                               "Prefix cache hits, in terms of number of cached tokens.", labels=[MODEL_LABEL])
    preemptions = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                      labels=[MODEL_LABEL])
    for s in stats:
        label = [s.model]
        engine, blocks = s.engine, s.blocks
        running.add_metric(label, engine.num_running)
        waiting.add_metric(label, num_waiting(s))
        usage.add_metric(label, blocks.used_blocks / blocks.num_blocks if blocks.num_blocks else 0.0)
        gpu_usage.add_metric(label, blocks.used_blocks / blocks.num_blocks if blocks.num_blocks else 0.0)
        # Our prefix cache counts whole blocks; vLLM's counters count tokens.
        queries.add_metric(label, blocks.prefix_queries * blocks.block_size)
        hits.add_metric(label, blocks.prefix_hits * blocks.block_size)
        preemptions.add_metric(label, engine.num_preemptions)
    yield from (running, waiting, usage, gpu_usage, queries, hits, preemptions)


def num_waiting(stats: SchedulerStats) -> int:
    """The engine's waiting sequences, and the admitted requests that have not reached it yet (on
    their way to the core; the frontend's count runs ahead of the core's last report)."""
    return stats.engine.num_waiting + max(0, stats.pending - stats.engine.num_requests)


def _request_families(models: tuple[ModelMetricsSnapshot, ...]) -> Iterator[Metric]:
    prompt = CounterMetricFamily("vllm:prompt_tokens", "Number of prefill tokens processed.", labels=[MODEL_LABEL])
    generation = CounterMetricFamily("vllm:generation_tokens", "Number of generation tokens processed.",
                                     labels=[MODEL_LABEL])
    success = CounterMetricFamily("vllm:request_success", "Count of finished requests, by finish reason.",
                                  labels=[MODEL_LABEL, "finished_reason"])
    for m in models:
        prompt.add_metric([m.model], m.prompt_tokens)
        generation.add_metric([m.model], m.generation_tokens)
        for reason, count in m.finished:
            success.add_metric([m.model, reason], count)
    yield from (prompt, generation, success)
    for name, documentation, field in _HISTOGRAMS:
        family = HistogramMetricFamily(name, documentation, labels=[MODEL_LABEL])
        for m in models:
            histogram: HistogramSnapshot = getattr(m, field)
            family.add_metric([m.model], _buckets(histogram), histogram.sum)
        yield family


def _buckets(h: HistogramSnapshot) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, +Inf last, with ``le`` written as prometheus_client writes it."""
    pairs: list[tuple[str, float]] = [
        (floatToGoString(b), c) for b, c in zip(h.bounds, h.cumulative[:-1], strict=True)
    ]
    pairs.append(("+Inf", h.count))
    return pairs


def metrics_registry(service: Service) -> CollectorRegistry:
    """A registry of this server's own: the service's metrics and the frontend process's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def metrics_routes(service: Service) -> Routes:
    """``GET /metrics`` for the front door."""
    registry = metrics_registry(service)

    async def metrics(request: HttpRequest, responder: HttpResponder) -> None:
        # A few dozen families from in-memory records: well under a millisecond, on the event loop.
        await responder.send(200, generate_latest(registry), CONTENT_TYPE)

    return {("GET", "/metrics"): metrics}


__all__ = ["CONTENT_TYPE", "MODEL_LABEL", "ServiceCollector", "metrics_registry", "metrics_routes", "num_waiting"]
