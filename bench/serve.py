"""``mini-vllm bench serve``: latency against load, measured at the client over the WebSocket
protocol or the OpenAI-compatible HTTP API.

A load generator opens several connections to a server (``--url``, or one it starts in this
process when no URL is given), sends requests at their arrival times and timestamps every frame
that comes back. The workload is ONLINE-1000 (``engine/workloads.py``) or the user's own JSONL
(``--dataset``); arrivals are gamma-distributed gaps (``--request-rate``, ``--burstiness``; 1 is
Poisson) and ``--max-concurrency`` caps the requests in flight.

``--backend`` picks the protocol: ``websocket`` (the default: ``generate`` frames, many requests
multiplexed on each connection) or ``openai`` (``POST /v1/completions`` with ``stream: true`` on
the same port, ``bench/openai_load.py``: one request at a time per HTTP/1.1 keep-alive
connection, so a request waits for a free one). Several backends run the same requests at the
same arrival times in turn on the same server, and the table and the JSON put them side by side.

The metrics are vLLM's serving benchmark's, measured at the client:

- TTFT: from sending the request to the first frame (SSE chunk) that carries a token;
- TPOT, per request: (E2E - TTFT) / (output tokens - 1);
- ITL: every gap between two token frames (chunks) of a request (the server merges tokens into one
  frame when a client falls behind, so a gap may cover several tokens, as in vLLM's benchmark);
- E2E: from sending to the ``done`` frame (the stream's ``data: [DONE]``);
- each as mean, median, p90 and p99; request and output-token throughput over the wall time from
  the first send to the last ``done``; goodput: requests per second that met every ``--goodput``
  target (``ttft:MS tpot:MS e2el:MS``).

Around each run it asks the server for its statistics (the ``stats`` frame, over a WebSocket
for either backend): the event loop's lag while the run lasted (every frame goes through that
loop), engine steps and preemptions.

``--sweep`` runs a ladder of request rates (``--request-rate`` given several times, or found from
an all-at-once run's throughput) and draws output tok/s against p50 and p99 TPOT and TTFT as a PNG
(``bench plot`` redraws it from the JSON, and overlays several runs, e.g. one per knob setting).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import shlex
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from mini_vllm.bench import openai_load
from mini_vllm.bench.command import HelpFormatter, fail, interruptible, unwritable, write_text
from mini_vllm.bench.env import device_description, versions
from mini_vllm.engine.errors import ConfigError, MiniVllmError
from mini_vllm.engine.workloads import arrival_times, online_1000
from mini_vllm.transport import protocol

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ONLINE_1000 = "ONLINE-1000"
SLO_METRICS = ("ttft", "tpot", "e2el")
ENGINE_COUNTERS = ("steps", "num_preemptions", "prompt_tokens_computed", "generation_tokens")
# The rate ladder of a sweep without explicit rates: fractions of the all-at-once throughput.
SWEEP_FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
Backend = Literal["websocket", "openai"]
BACKENDS: tuple[Backend, ...] = ("websocket", "openai")


# ---- the workload ---------------------------------------------------------------------------------


@attrs.frozen
class ServeRequest:
    prompt: str | None
    prompt_token_ids: tuple[int, ...] | None
    output_len: int

    def frame(self, request_id: str, model: str | None, ignore_eos: bool) -> str:
        body: dict[str, Any] = {"type": "generate", "id": request_id, "max_tokens": self.output_len, "temperature": 0}
        if ignore_eos:
            body["ignore_eos"] = True
        if model is not None:
            body["model"] = model
        if self.prompt is not None:
            body["prompt"] = self.prompt
        else:
            body["prompt_token_ids"] = list(self.prompt_token_ids or ())
        return json.dumps(body)

    def openai_body(self, model: str | None, ignore_eos: bool) -> bytes:
        """The same request as ``frame``, as a streamed ``POST /v1/completions`` body."""
        return openai_load.completion_body(
            model=model, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids, max_tokens=self.output_len,
            temperature=0, ignore_eos=ignore_eos,
        )


def online_requests(vocab_size: int, num_prompts: int) -> list[ServeRequest]:
    return [
        ServeRequest(None, tuple(r.prompt_token_ids), r.output_len) for r in online_1000(vocab_size, num_prompts)
    ]


def warmup_requests(like: Sequence[ServeRequest], vocab_size: int) -> list[ServeRequest]:
    rng = random.Random(3)
    return [
        ServeRequest(None, tuple(rng.randrange(vocab_size) for _ in range(
            len(r.prompt_token_ids) if r.prompt_token_ids is not None else 256)), min(r.output_len, 8))
        for r in like
    ]


def load_dataset(path: Path, num_prompts: int | None, default_max_tokens: int) -> list[ServeRequest]:
    """A JSONL file: one object per line with ``prompt`` (text) or ``prompt_token_ids``, and
    optionally ``max_tokens``. Blank lines are skipped; anything else is an error naming the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read dataset {path}: {exc}") from None
    out: list[ServeRequest] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: each line must be a JSON object")
        prompt, ids = row.get("prompt"), row.get("prompt_token_ids")
        if (prompt is None) == (ids is None):
            raise ConfigError(f"{where}: give exactly one of 'prompt' (text) or 'prompt_token_ids'")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
        if ids is not None and (
            not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        ):
            raise ConfigError(f"{where}: 'prompt_token_ids' must be a non-empty list of integers")
        max_tokens = row.get("max_tokens", default_max_tokens)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ConfigError(f"{where}: 'max_tokens' must be an integer >= 1")
        out.append(ServeRequest(prompt, None if ids is None else tuple(ids), max_tokens))
        if num_prompts is not None and len(out) == num_prompts:
            break
    if not out:
        raise ConfigError(f"dataset {path} holds no requests")
    return out


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    targets: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ConfigError(f"--goodput takes METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ConfigError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ConfigError(f"--goodput {item!r}: the target must be > 0 ms")
        targets[name] = ms
    return targets


# ---- what one request saw ---------------------------------------------------------------------------------


@attrs.define
class Tracker:
    """The client's view of one request: when it was sent and when each frame came back."""

    index: int
    prompt_len: int | None
    output_len: int
    sent: float = math.nan
    token_times: list[float] = attrs.field(factory=list)  # one per token frame
    tokens: int = 0
    done: float = math.nan
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    error: str | None = None
    finished: trio.Event = attrs.field(factory=trio.Event)

    def on_frame(self, now: float, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "token":
            n = len(frame.get("token_ids") or ())
            if n:
                self.token_times.append(now)
                self.tokens += n
        elif kind == "done":
            self.done = now
            self.finish_reason = frame.get("finish_reason")
            usage = frame.get("usage") or {}
            self.prompt_tokens = usage.get("prompt_tokens")
            if self.finish_reason == "error":
                err = frame.get("error") or {}
                self.error = f"{err.get('code', 'error')}: {err.get('message', '')}"
            self.finished.set()
        elif kind == "error":
            self.error = f"{frame.get('code')}: {frame.get('message')}"
            self.done = now
            self.finished.set()

    def fail(self, reason: str) -> None:
        if not self.finished.is_set():
            self.error = reason
            self.finished.set()

    # The OpenAI stream's events (``openai_load.CompletionObserver``).

    def on_sent(self, now: float) -> None:
        self.sent = now

    def on_output(self, now: float, token_count: int) -> None:
        self.token_times.append(now)
        self.tokens += token_count

    def on_end(self, now: float, completion: openai_load.Completion) -> None:
        if self.finished.is_set():
            return
        self.done = now
        self.tokens = completion.output_tokens  # the ids counted, or the usage's count without ids
        self.finish_reason = completion.finish_reason
        self.prompt_tokens = completion.prompt_tokens
        self.error = completion.error
        self.finished.set()

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason in ("length", "stop") and self.tokens > 0

    @property
    def ttft_ms(self) -> float:
        return 1e3 * (self.token_times[0] - self.sent)

    @property
    def e2e_ms(self) -> float:
        return 1e3 * (self.done - self.sent)

    @property
    def tpot_ms(self) -> float | None:
        return (self.e2e_ms - self.ttft_ms) / (self.tokens - 1) if self.tokens > 1 else None

    def itls_ms(self) -> list[float]:
        return [1e3 * (b - a) for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as vLLM's benchmark uses)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None, "max": None}
    return {
        "mean": round(sum(values) / len(values), 3),
        "median": round(percentile(values, 50), 3),
        "p90": round(percentile(values, 90), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
    }


def meets(t: Tracker, targets: dict[str, float]) -> bool:
    values = {"ttft": t.ttft_ms, "tpot": t.tpot_ms or 0.0, "e2el": t.e2e_ms}
    return all(values[k] <= v for k, v in targets.items())


def summarize(trackers: Sequence[Tracker], targets: dict[str, float]) -> dict[str, Any]:
    """The run's metrics from what the client saw (the accounting is in the module docstring)."""
    ok = [t for t in trackers if t.ok]
    sent = [t.sent for t in trackers if not math.isnan(t.sent)]
    ends = [t.done for t in trackers if not math.isnan(t.done)]
    duration = (max(ends) - min(sent)) if sent and ends else 0.0
    output_tokens = sum(t.tokens for t in ok)
    prompt_tokens = sum(t.prompt_tokens or t.prompt_len or 0 for t in ok)
    itls = [gap for t in ok for gap in t.itls_ms()]
    good = sum(1 for t in ok if meets(t, targets)) if targets else None
    errors: dict[str, int] = {}
    messages: dict[str, str] = {}
    for t in trackers:
        if not t.ok:
            reason = t.error or f"finish_reason={t.finish_reason}"
            key = reason.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
            messages.setdefault(key, reason[:500])
    per_s = (lambda x: round(x / duration, 3)) if duration > 0 else (lambda x: 0.0)
    return {
        "num_requests": len(trackers),
        "completed": len(ok),
        "failed": len(trackers) - len(ok),
        "errors": errors,
        "error_examples": messages,  # the first message of each kind of error
        "duration_s": round(duration, 3),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(output_tokens + prompt_tokens),
        "goodput": None if good is None else per_s(good),
        "goodput_targets_ms": targets,
        "ttft_ms": distribution([t.ttft_ms for t in ok]),
        "tpot_ms": distribution([x for t in ok if (x := t.tpot_ms) is not None]),
        "itl_ms": distribution(itls),
        "e2el_ms": distribution([t.e2e_ms for t in ok]),
        "token_frames": sum(len(t.token_times) for t in ok),
        "requests": {  # per request, for other analyses (ms; null where undefined)
            "ttft_ms": [round(t.ttft_ms, 2) if t.ok else None for t in trackers],
            "tpot_ms": [round(x, 3) if t.ok and (x := t.tpot_ms) is not None else None for t in trackers],
            "e2el_ms": [round(t.e2e_ms, 2) if t.ok else None for t in trackers],
        },
    }


# ---- the load generator -------------------------------------------------------------------------------------


@attrs.define
class _Reply:
    """The answer to a question frame (``stats``)."""

    frame: dict[str, Any] = attrs.field(factory=dict)
    finished: trio.Event = attrs.field(factory=trio.Event)

    def on_frame(self, now: float, frame: dict[str, Any]) -> None:
        self.frame = frame
        self.finished.set()

    def fail(self, reason: str) -> None:
        self.finished.set()


class _Connection:
    """One WebSocket; a reader task routes frames by request id to their trackers."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.routes: dict[str, Tracker | _Reply] = {}
        self.closed: str | None = None

    async def reader(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                now = trio.current_time()
                frame = json.loads(message)
                tracker = self.routes.get(frame.get("id")) if isinstance(frame, dict) else None
                if tracker is None:
                    continue
                tracker.on_frame(now, frame)
                if tracker.finished.is_set():
                    del self.routes[frame["id"]]
        except ConnectionClosed as exc:
            self.closed = f"connection closed: {exc.reason}"
        finally:
            self.closed = self.closed or "connection closed"
            for tracker in self.routes.values():
                tracker.fail(self.closed)
            self.routes.clear()


@attrs.define
class _Progress:
    label: str
    total: int
    done: int = 0
    tokens: int = 0
    in_flight: int = 0

    async def run(self, start: float, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            elapsed = trio.current_time() - start
            print(
                f"[{self.label}] {self.done:,}/{self.total:,} done, {self.in_flight:,} in flight, "
                f"{self.tokens / elapsed if elapsed else 0:,.0f} output tok/s, {elapsed:.0f} s",
                file=sys.stderr, flush=True,
            )


async def _server_stats(conn: _Connection, reset: bool) -> dict[str, Any] | None:
    """Ask the server for its statistics; None when it does not answer the ``stats`` frame."""
    reply = _Reply()
    rid = f"stats-{time.monotonic_ns()}"
    conn.routes[rid] = reply
    await conn.ws.send_message(protocol.stats_request(rid, reset_loop_lag=reset))
    with trio.move_on_after(10):
        await reply.finished.wait()
    conn.routes.pop(rid, None)
    return reply.frame if reply.frame.get("type") == "stats" else None


def _lag_and_engine(before: dict[str, Any] | None, after: dict[str, Any] | None, model: str | None) -> dict[str, Any]:
    if before is None or after is None:
        return {}
    service = after["service"]
    out: dict[str, Any] = {"loop_lag_ms": service.get("loop_lag")}
    schedulers = {s["model"]: s for s in service["schedulers"]}
    earlier = {s["model"]: s for s in before["service"]["schedulers"]}
    name = model if model in schedulers else next(iter(schedulers), None)
    if name is not None and name in earlier:
        a, b = earlier[name]["engine"], schedulers[name]["engine"]
        # Differences of the cumulative counters only: a gauge's difference (running, blocks) means nothing.
        out["engine"] = {k: b[k] - a[k] for k in ENGINE_COUNTERS if k in a and k in b}
        # The engine core's own loop (schedule and land, on its event loop) and its device jobs
        # (launch and wait, on its executor thread), in seconds over the run.
        out["core_loop_busy_s"] = round(schedulers[name]["busy_seconds"] - earlier[name]["busy_seconds"], 3)
        executors = {e["name"]: e for e in service.get("executors", ())}
        executors_before = {e["name"]: e for e in before["service"].get("executors", ())}
        if name in executors and name in executors_before:
            out["core_device_jobs_s"] = round(executors[name]["busy_seconds"] - executors_before[name]["busy_seconds"], 3)
    out["frames_sent"] = after["server"]["frames_sent"] - before["server"]["frames_sent"]
    return out


@attrs.frozen
class Replay:
    """What the client saw of one replay: every request's tracker, and the server's statistics
    just before and after (None where it did not answer)."""

    trackers: list[Tracker]
    offsets: list[float]  # each request's planned send time after ``start``
    start: float  # trio.current_time() when sending began
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    pool: openai_load.PoolStats | None = None  # the HTTP connections' (backend openai)


async def run_one_rate(
    url: str,
    requests: Sequence[ServeRequest],
    *,
    model: str | None,
    request_rate: float,
    burstiness: float,
    max_concurrency: int | None,
    connections: int,
    targets: dict[str, float],
    ignore_eos: bool = True,
    label: str = "run",
    progress_interval: float | None = 5.0,
    backend: Backend = "websocket",
    api_key: str | None = None,
) -> dict[str, Any]:
    """Replay ``requests`` against ``url`` open-loop at one rate; the run's summary."""
    run = await replay(
        url, requests, model=model, request_rate=request_rate, burstiness=burstiness,
        max_concurrency=max_concurrency, connections=connections, ignore_eos=ignore_eos, label=label,
        progress_interval=progress_interval, backend=backend, api_key=api_key,
    )
    summary = summarize(run.trackers, targets)
    server = _lag_and_engine(run.before, run.after, model)
    record = {
        "backend": backend,
        "request_rate": None if math.isinf(request_rate) else request_rate,  # null: all at once
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
        "send_lag_ms": distribution([1e3 * (t.sent - run.start - o) for t, o in zip(run.trackers, run.offsets, strict=True)
                                     if not math.isnan(t.sent)]),
        **summary,
        "server": server,
    }
    if run.pool is not None:
        server.pop("frames_sent", None)  # WebSocket frames: this run sent none but the stats
        record["http_client"] = {
            "connections": run.pool.connections,
            "connects": run.pool.connects,
            "stale_retries": run.pool.stale_retries,
            # Waits for a free connection: part of send_lag_ms, not of TTFT (which starts at the send).
            "requests_waited": run.pool.waited,
            "connection_wait_ms": distribution([1e3 * w for w in run.pool.wait_s]),
        }
    return record


async def replay(
    url: str,
    requests: Sequence[ServeRequest],
    *,
    model: str | None,
    request_rate: float,
    burstiness: float,
    max_concurrency: int | None,
    connections: int,
    ignore_eos: bool = True,
    label: str = "run",
    progress_interval: float | None = 5.0,
    round_robin: bool = False,
    ready: Callable[[], Awaitable[None]] | None = None,
    stats: bool = True,
    backend: Backend = "websocket",
    api_key: str | None = None,
) -> Replay:
    """Send ``requests`` to ``url`` over ``connections`` connections at their arrival times and track
    every frame (backend ``websocket``) or SSE chunk (``openai``). Over WebSockets each request goes
    on the connection with the fewest requests in flight, or with ``round_robin`` on connection
    ``i % connections`` (a fixed spread); over HTTP on the next free connection. ``ready`` is
    awaited once the connections are open, before the first send, and ``stats=False`` asks the
    server for no statistics (both for ``bench throughput``'s client processes, which start together)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if round_robin and backend != "websocket":
        raise ConfigError("round_robin spreads WebSocket connections: an HTTP request takes the next free connection")
    sender = _Sender(
        requests, [Tracker(i, None if r.prompt_token_ids is None else len(r.prompt_token_ids), r.output_len)
                   for i, r in enumerate(requests)],
        arrival_times(len(requests), request_rate, burstiness),
        trio.Semaphore(max_concurrency) if max_concurrency else None, _Progress(label, len(requests)),
        progress_interval,
    )
    if backend == "openai":
        return await _replay_openai(sender, url, model=model, connections=connections, ignore_eos=ignore_eos,
                                    ready=ready, stats=stats, api_key=api_key)
    return await _replay_websocket(sender, url, model=model, connections=connections, ignore_eos=ignore_eos,
                                   label=label, round_robin=round_robin, ready=ready, stats=stats, api_key=api_key)


@attrs.frozen
class _Sender:
    """The open loop both backends share: each request at its arrival time, at most
    ``limit`` in flight; ``send(i)`` returns once request ``i`` has ended."""

    requests: Sequence[ServeRequest]
    trackers: list[Tracker]
    offsets: list[float]
    limit: trio.Semaphore | None
    progress: _Progress
    progress_interval: float | None

    async def run(self, send: Callable[[int], Awaitable[None]]) -> float:
        """Send everything; when sending began (``trio.current_time()``)."""
        progress = self.progress

        async def one(i: int) -> None:
            if self.limit is not None:
                await self.limit.acquire()
            try:
                progress.in_flight += 1
                await send(i)
            finally:
                progress.in_flight -= 1
                progress.done += 1
                progress.tokens += self.trackers[i].tokens
                if self.limit is not None:
                    self.limit.release()

        start = trio.current_time()
        async with trio.open_nursery() as runs:
            if self.progress_interval:
                runs.start_soon(progress.run, start, self.progress_interval)
            async with trio.open_nursery() as senders:
                for i, offset in enumerate(self.offsets):
                    await trio.sleep_until(start + offset)
                    senders.start_soon(one, i)
            runs.cancel_scope.cancel()
        return start


async def _replay_websocket(
    sender: _Sender, url: str, *, model: str | None, connections: int, ignore_eos: bool, label: str,
    round_robin: bool, ready: Callable[[], Awaitable[None]] | None, stats: bool, api_key: str | None,
) -> Replay:
    async with trio.open_nursery() as outer:
        conns: list[_Connection] = []
        for _ in range(connections):
            ws = await outer.start(_open_ws, url, api_key)
            conn = _Connection(ws)
            conns.append(conn)
            outer.start_soon(conn.reader)
        before = await _server_stats(conns[0], reset=True) if stats else None
        if ready is not None:
            await ready()

        async def send(i: int) -> None:
            tracker = sender.trackers[i]
            conn = conns[i % len(conns)] if round_robin else min(conns, key=lambda c: len(c.routes))
            rid = f"{label}-{i}"
            conn.routes[rid] = tracker
            frame = sender.requests[i].frame(rid, model, ignore_eos)
            tracker.sent = trio.current_time()
            try:
                await conn.ws.send_message(frame)
            except ConnectionClosed as exc:
                tracker.fail(f"connection closed: {exc.reason}")
            await tracker.finished.wait()

        start = await sender.run(send)
        after = await _server_stats(conns[0], reset=False) if stats else None
        for conn in conns:
            await conn.ws.aclose()
        outer.cancel_scope.cancel()
    return Replay(sender.trackers, sender.offsets, start, before, after)


async def _replay_openai(
    sender: _Sender, url: str, *, model: str | None, connections: int, ignore_eos: bool,
    ready: Callable[[], Awaitable[None]] | None, stats: bool, api_key: str | None,
) -> Replay:
    # The bodies are made before the clock starts: their JSON is not the server's latency.
    bodies = [r.openai_body(model, ignore_eos) for r in sender.requests]
    async with openai_load.open_pool(openai_load.http_endpoint(url), connections, api_key=api_key) as pool:
        before = await _server_stats_once(url, reset=True, api_key=api_key) if stats else None
        if ready is not None:
            await ready()

        async def send(i: int) -> None:
            await pool.stream_completion(bodies[i], sender.trackers[i])

        start = await sender.run(send)
        after = await _server_stats_once(url, reset=False, api_key=api_key) if stats else None
    return Replay(sender.trackers, sender.offsets, start, before, after, pool.statistics())


def _auth_headers(api_key: str | None) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", b"Bearer " + api_key.encode())] if api_key else []


async def _open_ws(
    url: str, api_key: str | None = None, *, task_status: trio.TaskStatus[WebSocketConnection] = trio.TASK_STATUS_IGNORED
) -> None:
    """Hold one connection open inside the caller's nursery until it is cancelled."""
    async with open_websocket_url(
        url, max_message_size=64 << 20, disconnect_timeout=2, extra_headers=_auth_headers(api_key)
    ) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


async def _server_stats_once(url: str, reset: bool, api_key: str | None) -> dict[str, Any] | None:
    """The server's statistics over a WebSocket of their own (an HTTP run holds none open); None
    when the server does not answer."""
    try:
        async with open_websocket_url(
            url, connect_timeout=10, disconnect_timeout=2, extra_headers=_auth_headers(api_key)
        ) as ws:
            conn = _Connection(ws)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.reader)
                frame = await _server_stats(conn, reset)
                nursery.cancel_scope.cancel()
            return frame
    except (HandshakeError, ConnectionClosed, OSError):
        return None


# ---- the command -----------------------------------------------------------------------------------------------


@attrs.frozen
class ServeBenchConfig:
    url: str | None
    model: str | None  # the name to send (the server's default model when None)
    dataset: Path | None
    num_prompts: int | None
    dataset_max_tokens: int
    request_rates: tuple[float, ...]
    burstiness: float
    max_concurrency: int | None
    connections: int
    targets: dict[str, float]
    sweep: bool
    label: str
    warmup_requests: int = 16
    ignore_eos: bool = True  # exact output lengths, as ONLINE-1000 defines them
    backends: tuple[Backend, ...] = ("websocket",)  # run in turn, on the same server
    api_key: str | None = attrs.field(default=None, repr=False)  # sent as "Authorization: Bearer"; never shown

    def __attrs_post_init__(self) -> None:
        if self.url is not None and not _is_ws_url(self.url):
            raise ConfigError(f"--url must be ws://HOST:PORT (or wss://), got {self.url!r}")
        if not self.backends or any(b not in BACKENDS for b in self.backends):
            raise ConfigError(f"--backend takes {' or '.join(BACKENDS)}, got {list(self.backends)}")
        if len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"--backend names each backend once, got {list(self.backends)}")
        if not self.ignore_eos and self.dataset is None:
            raise ConfigError("--no-ignore-eos needs --dataset: ONLINE-1000 defines exact output lengths")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if not self.request_rates or any(not r > 0 for r in self.request_rates):
            raise ConfigError(f"--request-rate must be > 0 or inf, got {list(self.request_rates)}")
        if not self.burstiness > 0:
            raise ConfigError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.connections < 1:
            raise ConfigError(f"--connections must be >= 1, got {self.connections}")
        if self.warmup_requests < 0:
            raise ConfigError(f"--warmup-requests must be >= 0, got {self.warmup_requests}")
        if self.dataset_max_tokens < 1:
            raise ConfigError(f"--dataset-max-tokens must be >= 1, got {self.dataset_max_tokens}")


def _is_ws_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme in ("ws", "wss") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number in range
        return False


def _backends(text: str) -> list[Backend]:
    """``--backend websocket,openai`` (or the flag repeated)."""
    names = [name.strip() for name in text.split(",")]
    out: list[Backend] = []
    for name in names:
        if name == "websocket" or name == "openai":
            out.append(name)
        else:
            raise argparse.ArgumentTypeError(
                f"{name!r} is not a backend: give {' or '.join(BACKENDS)} (a comma list, or the flag repeated)"
            )
    return out


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (requests/s, or inf)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0 (or inf), got {text!r}")
    return value


def add_bench_serve(bench_subparsers: Any) -> None:
    from mini_vllm.transport.flags import add_client_api_key, add_engine_flags

    p = bench_subparsers.add_parser(
        "serve", help="ONLINE-1000 over WebSockets or OpenAI HTTP: TTFT, TPOT, ITL, E2E, goodput; --sweep draws "
                      "the curves",
        description=(__doc__ or "").split("\n\n")[0], formatter_class=HelpFormatter,
    )
    s = p.add_argument_group("server")
    s.add_argument("--url", default=None, help="a running server (ws://HOST:PORT); default: start one in this process")
    s.add_argument("--model", default=None,
                   help="the model: its name on a running server, or what to load in-process (path, preset, demo) "
                        "(default: the server's only model; in-process, the demo model)")
    s.add_argument("--connections", type=int, default=32,
                   help="connections to spread requests over: a WebSocket carries many requests at once, an "
                        "HTTP/1.1 connection (--backend openai) one: then at most this many are in flight")
    s.add_argument("--backend", type=_backends, action="append", default=None, metavar="NAME[,NAME]",
                   help="how to send the requests: websocket (generate frames) or openai (streamed POST "
                        "/v1/completions on the same port); several run the same workload in turn, side by side "
                        "(default: websocket)")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", type=Path, default=None,
                   help="JSONL, one {\"prompt\": ...} or {\"prompt_token_ids\": [...]} (+ \"max_tokens\") per line; "
                        "default: ONLINE-1000")
    w.add_argument("--num-prompts", type=int, default=None, help="the first N requests (default: all 1000 / the file)")
    w.add_argument("--dataset-max-tokens", type=int, default=256, help="output length of dataset lines without one")
    w.add_argument("--request-rate", type=_rate, action="append", default=None, metavar="RATE",
                   help="requests/s, or inf for all at once (default inf); repeat for several runs")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, <1 burstier")
    w.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight (default: no limit)")
    w.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens (default; ONLINE-1000 requires it); --no-ignore-eos lets a "
                        "real model stop at EOS on your --dataset")
    w.add_argument("--warmup-requests", type=int, default=16,
                   help="unmeasured short requests first (a fresh server compiles kernels on first use)")
    w.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                   help="targets for goodput, e.g. ttft:500 tpot:50 (also the sweep's p99 targets; default: none)")
    w.add_argument("--sweep", action="store_true",
                   help="a ladder of rates up to saturation (the given --request-rate values, or fractions of the "
                        "all-at-once throughput) and a PNG of throughput against latency")
    p.add_argument("--label", default=None, help="what this run is, for tables and plots (default: the model)")
    p.add_argument("--output", default=None,
                   help="the JSON file (default: serve-LABEL-DATE.json in the current directory)")
    p.add_argument("--plot", default=None, help="the PNG of a sweep (default: next to the JSON)")
    add_client_api_key(p)  # never written to the JSON: the command there shows it as REDACTED
    add_engine_flags(p)  # for the in-process server (without --url)
    p.add_argument("--max-requests-per-connection", type=int, default=256, help="in-process server only")
    p.set_defaults(func=run)


def config_from(args: argparse.Namespace) -> ServeBenchConfig:
    from mini_vllm.transport.flags import api_key_from

    model = args.model
    label = args.label or (Path(model).name if model else "demo")
    backends = [b for group in (args.backend or [["websocket"]]) for b in group]
    return ServeBenchConfig(
        url=args.url, model=model if args.url else None, dataset=args.dataset, num_prompts=args.num_prompts,
        dataset_max_tokens=args.dataset_max_tokens, request_rates=tuple(args.request_rate or (math.inf,)),
        burstiness=args.burstiness, max_concurrency=args.max_concurrency, connections=args.connections,
        targets=parse_goodput(args.goodput), sweep=args.sweep, label=label, warmup_requests=args.warmup_requests,
        ignore_eos=args.ignore_eos, backends=tuple(dict.fromkeys(backends)),  # a name given twice runs once
        api_key=api_key_from(args),
    )


async def _models(url: str, api_key: str | None = None) -> list[dict[str, Any]]:
    try:
        async with open_websocket_url(url, disconnect_timeout=2, extra_headers=_auth_headers(api_key)) as ws:
            await ws.send_message(protocol.models_request("m"))
            reply = json.loads(await ws.get_message())
    except ConnectionRejected as exc:  # the server is there and said no (a missing or wrong API key: 401)
        answer = openai_load.status_error(exc.status_code, b"", exc.body or b"", truncated=False)
        hint = ": give its key with --api-key (or MINI_VLLM_API_KEY)" if exc.status_code == 401 else ""
        raise ConfigError(f"the server at {url} refused the WebSocket handshake with {answer}{hint}") from None
    except HandshakeError as exc:  # not an OSError: it would escape run() as a traceback
        raise ConfigError(f"cannot connect to {url}: {exc.__cause__ or exc!r}: is a server running there "
                          f"(mini-vllm serve)? Without --url, bench serve starts one in this process") from None
    if reply.get("type") != "models":
        raise ConfigError(f"the server at {url} answered 'models' with {reply}")
    return list(reply["models"])


async def _bench(config: ServeBenchConfig, url: str) -> dict[str, Any]:
    models = await _models(url, config.api_key)
    if config.model is None and len(models) != 1:
        raise ConfigError(f"the server serves {len(models)} models: pick one with --model")
    info = models[0] if config.model is None else next((m for m in models if m["name"] == config.model), None)
    if info is None:
        raise ConfigError(f"the server has no model {config.model!r} (it has {', '.join(m['name'] for m in models)})")
    if config.dataset is not None:
        requests = load_dataset(config.dataset, config.num_prompts, config.dataset_max_tokens)
        workload = f"dataset:{config.dataset.name}"
    else:
        requests = online_requests(int(info["vocab_size"]), config.num_prompts or 1000)
        workload = ONLINE_1000 if len(requests) == 1000 else f"{ONLINE_1000}[:{len(requests)}]"
    too_long = [i for i, r in enumerate(requests)
                if r.prompt_token_ids is not None and len(r.prompt_token_ids) + r.output_len > info["max_model_len"]]
    if too_long:
        raise ConfigError(
            f"{len(too_long)} requests need more than the model's max_model_len ({info['max_model_len']}) "
            f"for prompt + output: serve it with a larger --max-model-len"
        )

    if "openai" in config.backends:
        await _check_openai(url, info["name"], config.api_key)

    async def at(backend: Backend, rate: float, k: int) -> dict[str, Any]:
        label = f"{config.label} @ {'inf' if math.isinf(rate) else f'{rate:g}'} req/s"
        if config.backends != ("websocket",):
            label += f" over {backend}"
        print(f"[bench serve] {label}: {len(requests)} requests ...", file=sys.stderr, flush=True)
        run = await run_one_rate(
            url, requests, model=info["name"], request_rate=rate, burstiness=config.burstiness,
            max_concurrency=config.max_concurrency, connections=config.connections, targets=config.targets,
            ignore_eos=config.ignore_eos, label=f"r{k}" if backend == "websocket" else f"{backend}-r{k}",
            backend=backend, api_key=config.api_key,
        )
        print(_row(run, with_backend=config.backends != ("websocket",)), file=sys.stderr, flush=True)
        for note in _notes(run):
            print(f"[bench serve] note: {note}", file=sys.stderr, flush=True)
        return run

    warmups: dict[str, dict[str, Any]] = {}
    for backend in config.backends if config.warmup_requests else ():
        # Unmeasured: the first requests of a fresh server pay for kernel compilation and allocations
        # (and each protocol's first use, for its own). Their prompts are fresh random ids of the
        # workload's lengths, never the measured prompts, which a prefix cache would then serve for free.
        warm = warmup_requests(requests[: config.warmup_requests], int(info["vocab_size"]))
        print(f"[bench serve] warm-up over {backend}: {len(warm)} short requests ...", file=sys.stderr, flush=True)
        w = await run_one_rate(
            url, warm, model=info["name"], request_rate=math.inf, burstiness=1.0, max_concurrency=None,
            connections=min(config.connections, len(warm)), targets={}, label=f"warmup-{backend}",
            progress_interval=None, backend=backend, api_key=config.api_key,
        )
        warmups[backend] = {"num_requests": w["num_requests"], "completed": w["completed"], "duration_s": w["duration_s"]}

    runs: list[dict[str, Any]] = []
    rates = list(config.request_rates)
    if config.sweep and rates == [math.inf]:  # find saturation first, then a ladder below it
        saturated = [await at(backend, math.inf, 0) for backend in config.backends]
        runs.extend(saturated)
        # One ladder for every backend (the same workload at the same rates), up to the fastest's saturation.
        top = max(r["request_throughput"] for r in saturated)
        if not top > 0:
            raise ConfigError("the all-at-once run completed no request: nothing to sweep")
        rates = [round(f * top, 2) for f in SWEEP_FRACTIONS]
    first = 1 if runs else 0
    for backend in config.backends:  # each backend's whole ladder in turn
        for k, rate in enumerate(rates, start=first):
            runs.append(await at(backend, rate, k))
    order = {b: i for i, b in enumerate(config.backends)}
    runs.sort(key=lambda r: (math.inf if r["request_rate"] is None else r["request_rate"], order[r["backend"]]))
    return {"model_info": info, "workload": workload, "backends": list(config.backends),
            "warmup": _warmup_record(warmups), "runs": runs}


def _warmup_record(warmups: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """One backend's warm-up as it is; several summed, each kept under ``by_backend``."""
    if not warmups:
        return None
    if len(warmups) == 1:
        return next(iter(warmups.values()))
    return {
        "num_requests": sum(w["num_requests"] for w in warmups.values()),
        "completed": sum(w["completed"] for w in warmups.values()),
        "duration_s": round(sum(w["duration_s"] for w in warmups.values()), 3),
        "by_backend": warmups,
    }


def _notes(run: dict[str, Any]) -> list[str]:
    """What a reader of the numbers must know about this run: a client pool that held requests
    back, or a prefix cache that served prompts from an earlier run's KV."""
    notes = []
    client = run.get("http_client")
    if client and client["requests_waited"]:
        notes.append(
            f"{client['requests_waited']:,} of {run['num_requests']:,} requests waited for a free HTTP connection "
            f"(p99 {_fmt(client['connection_wait_ms']['p99'])} ms, in send_lag_ms and not in TTFT): HTTP/1.1 "
            f"carries one request per connection; --connections {run['num_requests']} sends them all, "
            f"--max-concurrency {client['connections']} makes the websocket run alike"
        )
    computed = (run.get("server") or {}).get("engine", {}).get("prompt_tokens_computed")
    if computed is not None and run["prompt_tokens"] and computed < 0.99 * run["prompt_tokens"]:
        notes.append(
            f"the server computed {computed:,} of {run['prompt_tokens']:,} prompt tokens: its prefix cache served "
            "the rest, from an earlier run of the same prompts (serve with --no-enable-prefix-caching to compare "
            "runs that replay them)"
        )
    return notes


async def _check_openai(url: str, model: str, api_key: str | None) -> None:
    """Before any run: the server answers the OpenAI API on its port and lists the model."""
    endpoint = openai_load.http_endpoint(url)
    try:
        async with openai_load.open_pool(endpoint, 1, api_key=api_key) as pool:
            listing = await pool.get_json(openai_load.MODELS_PATH)
    except openai_load.HttpStatusError as exc:
        raise ConfigError(f"--backend openai: {endpoint.url} answered GET {openai_load.MODELS_PATH} with {exc} "
                          f"(does the server serve the OpenAI API on its port?)") from None
    except MiniVllmError as exc:
        raise ConfigError(f"--backend openai: {exc}") from None
    data = listing.get("data") if isinstance(listing, dict) else None
    ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else None
    if ids is None:
        raise ConfigError(f"--backend openai: {endpoint.url}{openai_load.MODELS_PATH} is not OpenAI's model list: "
                          f"{str(listing)[:200]}")
    if model not in ids:
        raise ConfigError(f"--backend openai: {endpoint.url}{openai_load.MODELS_PATH} does not list {model!r} "
                          f"(it lists {', '.join(map(str, ids)) or 'none'})")


async def _bench_in_process(config: ServeBenchConfig, args: argparse.Namespace) -> dict[str, Any]:
    from mini_vllm.actors import ServiceConfig, open_service
    from mini_vllm.actors.task_group import open_task_group
    from mini_vllm.engine.config import PRESETS
    from mini_vllm.transport.flags import engine_args_from
    from mini_vllm.transport.server import Server, ServerLimits

    engine_args = engine_args_from(args, args.model)
    if args.model in PRESETS and engine_args.load_format == "auto":
        engine_args = attrs.evolve(engine_args, load_format="dummy")
    # Admit every request: queueing under overload is what is measured, not refusals.
    service_config = ServiceConfig(max_pending_per_model=max(config.num_prompts or 1000, 256) + 16)
    # One client, many requests: no fair share between clients to refuse it with. Every HTTP
    # connection of the pool counts against max_connections, beside the WebSockets.
    limits = ServerLimits(max_requests_per_connection=args.max_requests_per_connection, client_key="off",
                          max_connections=max(ServerLimits().max_connections, config.connections + 16))
    async with open_service([engine_args], service_config) as service, open_task_group() as nursery:
        server = Server(service, limits)  # WebSocket and the OpenAI API on its one port
        await nursery.start(server.run, "127.0.0.1", 0)
        record = await _bench(config, server.url)
        record["server_config"] = {"in_process": True, "engine_args": _jsonable(attrs.asdict(engine_args)),
                                   "max_requests_per_connection": args.max_requests_per_connection}
        nursery.cancel_scope.cancel()
    return record


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, str | int | float | bool | type(None)) else str(v) for k, v in d.items()}


@interruptible("serve")
def run(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except ConfigError as exc:
        return fail("serve", str(exc))
    started = dt.datetime.now(dt.UTC)
    out = Path(args.output or f"serve-{_slug(config.label)}-{started:%Y%m%d-%H%M}.json")
    error = unwritable(out, "--output")
    if error:  # before with_suffix, which refuses a name like "."
        return fail("serve", error)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    error = unwritable(png, "--plot") if config.sweep else None
    if error:
        return fail("serve", error)
    try:
        if config.url is not None:
            record = trio.run(_bench, config, config.url)
            record["server_config"] = {"in_process": False, "url": config.url}
        else:
            record = trio.run(_bench_in_process, config, args)
    except (ConfigError, OSError) as exc:
        print(f"mini-vllm bench serve: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a failed engine load or a handshake refusal arrive wrapped in groups
        leaves = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
        if not all(isinstance(e, MiniVllmError | OSError) for e in leaves):
            raise
        print(f"mini-vllm bench serve: error: {'; '.join(str(e) for e in leaves)}", file=sys.stderr)
        return EXIT_FAILED
    record = {
        "benchmark": "serve",
        "label": config.label,
        "model": record["model_info"]["name"],
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "mini-vllm " + " ".join(shlex.quote(a) for a in _redacted(getattr(args, "argv", sys.argv[1:]))),
        "versions": versions(),
        **device_description(),
        "burstiness": config.burstiness,
        "goodput_targets_ms": config.targets,
        **record,
    }
    if config.sweep:
        record["sweep"] = _sweeps(record["runs"], config)
    failed = write_text("serve", out, json.dumps(record, indent=1) + "\n")
    if failed is not None:
        return failed
    print_table(record)
    print(f"wrote {out}")
    if config.sweep:
        try:
            drawn = plot_sweeps([record], png, title=f"{record['model']} under {record['workload']}")
        except OSError as exc:
            return fail("serve", f"cannot write {png}: {exc.strerror or exc}", EXIT_FAILED)
        if drawn:
            print(f"wrote {png}")
    return EXIT_OK if all(r["completed"] for r in record["runs"]) else EXIT_FAILED


def _redacted(argv: Sequence[str]) -> list[str]:
    """The command line without the value of --api-key (the JSON is shared; the key is a secret)."""
    out: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            out.append("REDACTED")
            hide = False
        elif arg == "--api-key":
            out.append(arg)
            hide = True
        elif arg.startswith("--api-key="):
            out.append("--api-key=REDACTED")
        else:
            out.append(arg)
    return out


def _sweeps(runs: Sequence[dict[str, Any]], config: ServeBenchConfig) -> dict[str, Any]:
    """One backend: its summary as it is; several: one summary per backend under ``by_backend``."""
    if len(config.backends) == 1:
        return sweep_summary(runs, config.targets)
    return {"by_backend": {b: sweep_summary([r for r in runs if r["backend"] == b], config.targets)
                           for b in config.backends}}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in text).strip("-") or "run"


def sweep_summary(runs: Sequence[dict[str, Any]], targets: dict[str, float]) -> dict[str, Any]:
    """The saturation throughput, and the highest rate whose p99s met every target."""
    within = [
        r for r in runs
        if r["request_rate"] is not None and r["failed"] == 0
        and all((r[f"{k}_ms"]["p99"] or math.inf) <= v for k, v in targets.items())
    ]
    best = max(within, key=lambda r: r["request_rate"], default=None)
    return {
        "max_output_throughput": max(r["output_throughput"] for r in runs),
        "max_request_throughput": max(r["request_throughput"] for r in runs),
        "p99_targets_ms": targets,
        "highest_rate_within_p99_targets": None if best is None or not targets else best["request_rate"],
        "its_output_throughput": None if best is None or not targets else best["output_throughput"],
    }


# ---- output ---------------------------------------------------------------------------------------------------

_HEADER = (
    f"{'rate':>7} {'done':>9} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>7} "
    f"{'ITL p99':>8} {'E2E p50':>8} {'p99':>8} {'goodput':>8} {'lag p99':>8}"
)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _backend(run: dict[str, Any]) -> str:
    return str(run.get("backend", "websocket"))  # records written before --backend existed: websocket


def _row(r: dict[str, Any], with_backend: bool = False) -> str:
    lag = (r.get("server") or {}).get("loop_lag_ms") or {}
    rate = "inf" if r["request_rate"] is None else f"{r['request_rate']:g}"
    return (
        (f"{_backend(r):<9} " if with_backend else "")
        + f"{rate:>7} {r['completed']:>4}/{r['num_requests']:<4} {r['request_throughput']:>7.2f} "
        f"{r['output_throughput']:>10,.0f} {_fmt(r['ttft_ms']['median']):>9} {_fmt(r['ttft_ms']['p99']):>8} "
        f"{_fmt(r['tpot_ms']['median'], 2):>9} {_fmt(r['tpot_ms']['p99'], 2):>7} {_fmt(r['itl_ms']['p99']):>8} "
        f"{_fmt(r['e2el_ms']['median'], 0):>8} {_fmt(r['e2el_ms']['p99'], 0):>8} {_fmt(r['goodput'], 2):>8} "
        f"{_fmt(lag.get('p99_ms'), 2):>8}"
    )


def print_table(record: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    where = record.get("gpu") or record.get("cpu")
    print(f"\n{record['label']}: {record['workload']} on {where}, latencies in ms, burstiness {record['burstiness']}",
          file=out)
    with_backend = {_backend(r) for r in record["runs"]} != {"websocket"}
    print((f"{'backend':<9} " if with_backend else "") + _HEADER, file=out)
    for r in record["runs"]:
        print(_row(r, with_backend), file=out)
    for r in record["runs"]:
        if r.get("failed"):
            rate = "inf" if r["request_rate"] is None else f"{r['request_rate']:g}"
            examples = r.get("error_examples") or {}
            for key, count in r["errors"].items():
                print(f"  {_backend(r)} @ {rate}: {count:,} failed with {examples.get(key, key)}", file=out)
    if "sweep" in record:
        sweeps = record["sweep"].get("by_backend") or {"": record["sweep"]}
        for backend, s in sweeps.items():
            print(f"{backend + ': ' if backend else ''}max output throughput {s['max_output_throughput']:,.0f} tok/s; ",
                  end="", file=out)
            if s["p99_targets_ms"]:
                targets = " and ".join(f"p99 {k.upper()} <= {v:g} ms" for k, v in s["p99_targets_ms"].items())
                best = s["highest_rate_within_p99_targets"]
                print(f"highest rate with {targets}: {'none' if best is None else f'{best:g} req/s'}", file=out)
            else:
                print("no --goodput targets given", file=out)


def plot_sweeps(records: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Output tok/s against p50/p99 TPOT and TTFT, one line per record; False if matplotlib is missing."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state to change
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install 'mini-vllm[bench]'); "
              "'mini-vllm bench plot FILE.json' draws it later", file=sys.stderr)
        return False
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    lines = [  # one line per record and backend: several backends of one run are drawn apart
        (f"{record['label']} {backend}" if len(backends) > 1 else record["label"],
         [r for r in record["runs"] if r["completed"] and _backend(r) == backend])
        for record in records
        for backends in [list(dict.fromkeys(_backend(r) for r in record["runs"]))]
        for backend in backends
    ]
    for (name, runs), color in zip(lines, matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] * 4, strict=False):
        x = [r["output_throughput"] for r in runs]
        for ax, metric in zip(axes, ("tpot_ms", "ttft_ms"), strict=True):
            ax.plot(x, [r[metric]["median"] for r in runs], "o-", color=color, label=f"{name} p50")
            ax.plot(x, [r[metric]["p99"] for r in runs], "s--", color=color, alpha=0.7, label=f"{name} p99")
    for ax, name in zip(axes, ("TPOT (ms)", "TTFT (ms)"), strict=True):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    targets = records[0].get("goodput_targets_ms") or {}
    for ax, key in zip(axes, ("tpot", "ttft"), strict=True):
        if key in targets:
            ax.axhline(targets[key], color="grey", linestyle=":", label=f"target {targets[key]:g} ms")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def add_bench_plot(bench_subparsers: Any) -> None:
    p = bench_subparsers.add_parser(
        "plot", help="draw (or overlay) bench serve sweeps, or bench throughput runs against the floor, from their JSON",
        formatter_class=HelpFormatter)
    p.add_argument("files", nargs="+", type=Path, metavar="FILE.json",
                   help="bench serve results (overlaid), or bench throughput results of GPU runs (a panel each)")
    p.add_argument("--output", required=True, type=Path, help="the PNG (required)")
    p.add_argument("--title", default=None, help="the figure's title (default: the first file's model and workload)")
    p.add_argument("--labels", nargs="+", default=None, help="one per file (default: each run's label)")
    p.set_defaults(func=run_plot)


def _draw(args: argparse.Namespace, draw: Callable[[], bool], writer: str) -> int:
    """Run one of the pictures' ``draw`` (False: matplotlib is missing) and report it as the command does."""
    try:
        if not draw():
            return EXIT_FAILED
    except OSError as exc:
        return fail("plot", f"cannot write {args.output}: {exc.strerror or exc}", EXIT_FAILED)
    except (KeyError, TypeError) as exc:  # valid JSON, but not the shape the benchmark writes
        return fail("plot", f"a file lacks what {writer} writes ({type(exc).__name__}: {exc}): "
                            f"give files written by mini-vllm {writer}")
    print(f"wrote {args.output}")
    return EXIT_OK


@interruptible("plot")
def run_plot(args: argparse.Namespace) -> int:
    # torch: not for a plain serve plot's import
    from mini_vllm.bench.throughput import is_against_floor_record, plot_against_floor

    error = unwritable(args.output, "--output")
    if error:
        return fail("plot", error)
    records = []
    kinds: set[bool] = set()
    for f in args.files:
        try:
            record = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"mini-vllm bench plot: error: cannot read {f}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        throughput = is_against_floor_record(record)
        if record.get("benchmark") != "serve" and not throughput:
            print(f"mini-vllm bench plot: error: {f} is not a bench serve result, nor a bench throughput result "
                  "set against the floor (a GPU run's)", file=sys.stderr)
            return EXIT_USAGE
        kinds.add(throughput)
        records.append(record)
    if len(kinds) > 1:
        print("mini-vllm bench plot: error: give bench serve results or bench throughput results, not both",
              file=sys.stderr)
        return EXIT_USAGE
    if kinds == {True}:
        if args.labels is not None:
            print("mini-vllm bench plot: error: --labels names bench serve runs; a throughput panel is titled by "
                  "its model", file=sys.stderr)
            return EXIT_USAGE
        return _draw(args, lambda: plot_against_floor(
            records, args.output,
            args.title or f"{records[0]['workload']}: the offline loop's time by kind of step, against the floor"),
            "bench throughput")
    if args.labels is not None:
        if len(args.labels) != len(records):
            print("mini-vllm bench plot: error: give one --labels entry per file", file=sys.stderr)
            return EXIT_USAGE
        records = [{**r, "label": label} for r, label in zip(records, args.labels, strict=True)]
    return _draw(args, lambda: plot_sweeps(records, args.output,
                                           args.title or f"{records[0]['model']} under {records[0]['workload']}"),
                 "bench serve")
