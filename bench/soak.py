"""``mini-vllm bench soak``: many clients, random disconnects and cancels, and every greedy answer checked.

``--concurrency`` simulated clients, each on its own WebSocket, send greedy requests (temperature
0, ``ignore_eos``) from a fixed pool of prompts of varied lengths and ``max_tokens`` for
``--duration`` seconds. Each pool entry's expected answer is learnt first, by running it alone on a
clean connection; afterwards every answer must carry exactly those ids and that text. With
probability ``--disconnect-rate`` a client drops its connection mid-stream (and opens a new one),
with ``--cancel-rate`` it sends ``cancel`` mid-stream and must then get the request's end: ``done``
with ``cancelled``, or a normal finish when the cancel raced the end. Whatever arrived before a
disconnect or a cancel must be a prefix of the expected answer.

After the load it waits for the server to become idle (its ``stats`` frame: nothing queued or
running) and reports the KV blocks still in use, which must be 0, and the server's resident
memory before and after when ``stats`` carries it. A request without an end within
``--request-timeout`` is lost; the exit status is 1 when anything was lost or wrong, or blocks
stayed in use.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import random
import shlex
import sys
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from mini_vllm.actors.task_group import open_task_group
from mini_vllm.bench.command import HelpFormatter, fail, interruptible, unwritable, write_text
from mini_vllm.engine.errors import ConfigError
from mini_vllm.transport import protocol
from mini_vllm.transport.flags import EXIT_ERROR, EXIT_OK, positive_int

MAX_EXAMPLES = 5  # per kind of problem, in the JSON and the table
_MAX_FRAME = 64 << 20  # what this client accepts from the server (a stats frame of a big server is large)
_OVERLOAD_CODES = frozenset({"overloaded", "too_many_requests"})
_WORDS = (
    "the quick brown fox jumps over the lazy dog while mini vllm streams tokens over web sockets and "
    "every block of the cache returns to the pool"
).split()
# (words, max_tokens): short and long prompts, one token to long answers, so that cancels and
# disconnects land at every stage of a request (prefill, first token, deep into decoding).
_POOL_SHAPES = (
    (1, 1), (2, 8), (4, 32), (8, 3), (16, 64), (32, 16), (64, 128), (3, 100),
    (128, 24), (12, 48), (200, 8), (6, 128),
)  # fmt: skip


# ---- the pool of prompts -----------------------------------------------------------------------


@attrs.frozen
class PoolEntry:
    prompt: str
    max_tokens: int

    def frame(self, request_id: str, model: str | None) -> str:
        sampling = {"max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
        return protocol.generate_request(request_id, prompt=self.prompt, model=model, sampling=sampling)


def prompt_pool(max_model_len: int | None = None) -> list[PoolEntry]:
    """The fixed pool; entries that cannot fit ``max_model_len`` are left out (UTF-8 bytes bound the
    tokens of byte-level tokenizers from above; the server refuses the rest while learning)."""
    entries = []
    for k, (words, max_tokens) in enumerate(_POOL_SHAPES):
        prompt = " ".join(_WORDS[(k + i) % len(_WORDS)] for i in range(words))
        if max_model_len is None or len(prompt.encode()) + 8 + max_tokens <= max_model_len:
            entries.append(PoolEntry(prompt, max_tokens))
    return entries


@attrs.frozen
class Expected:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str


# ---- one connection ----------------------------------------------------------------------------


@attrs.define
class Stream:
    """What one request (or question) has received so far."""

    token_ids: list[int] = attrs.field(factory=list)
    text: list[str] = attrs.field(factory=list)
    first_token_at: float | None = None
    end: dict[str, Any] | None = None  # the frame that ended it: done, error, models or stats
    closed: str | None = None  # the connection closed before the end
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def on_frame(self, now: float, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "token":
            ids = frame.get("token_ids")
            if isinstance(ids, list) and ids:
                self.token_ids.extend(ids)
                if self.first_token_at is None:
                    self.first_token_at = now
            self.text.append(str(frame.get("text", "")))
        elif kind in ("done", "error", "models", "stats"):
            self.end = frame
        self._wake()

    def on_closed(self, reason: str) -> None:
        if self.end is None:
            self.closed = reason
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @property
    def over(self) -> bool:
        return self.end is not None or self.closed is not None

    async def wait_for(self, ready: Callable[[Stream], bool]) -> None:
        while not ready(self) and not self.over:
            await self._changed.wait()


class Wire:
    """One WebSocket; a reader task routes the server's frames by id to their ``Stream``."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.routes: dict[str, Stream] = {}
        self.closed: str | None = None  # set when the server closed it (or the TCP connection broke)
        self.unrouted: Counter[str] = Counter()  # frames for no request of ours, by type (or error code)

    def track(self, request_id: str) -> Stream:
        stream = Stream()
        self.routes[request_id] = stream
        return stream

    async def send(self, frame: str) -> bool:
        """False when the connection is closed."""
        if self.closed is not None:
            return False
        try:
            await self.ws.send_message(frame)
        except ConnectionClosed as exc:
            self.closed = self.closed or close_reason(exc)
            return False
        return True

    async def reader(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                now = trio.current_time()
                try:
                    frame = json.loads(message)
                except (ValueError, TypeError):
                    self.unrouted["not JSON"] += 1
                    continue
                rid = frame.get("id") if isinstance(frame, dict) else None
                stream = self.routes.get(rid) if isinstance(rid, str) else None
                if stream is None:
                    kind = frame.get("type") if isinstance(frame, dict) else None
                    self.unrouted[f"error {frame.get('code')}" if kind == "error" else str(kind)] += 1
                    continue
                stream.on_frame(now, frame)
                if stream.end is not None:
                    del self.routes[rid]
        except ConnectionClosed as exc:
            self.closed = close_reason(exc)
        finally:
            for stream in self.routes.values():
                stream.on_closed(self.closed or "closed by this client")
            self.routes.clear()


def close_reason(exc: ConnectionClosed) -> str:
    reason = exc.reason
    return f"closed {reason.code} {reason.name}" + (f": {reason.reason}" if reason.reason else "")


def connect_failure(exc: BaseException) -> str:
    """Why a connection could not be opened, in a few words (a key of a table). trio-websocket says
    little itself: the socket's error is in the causes, inside trio's group of attempts."""
    if isinstance(exc, ConnectionRejected):
        return f"handshake refused (HTTP {exc.status_code})"
    if isinstance(exc, DisconnectionTimeout):
        return "the close handshake timed out"
    errors: list[OSError] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(errors) < 16:
        e = todo.pop(0)
        if e is None:
            continue
        if isinstance(e, OSError):
            errors.append(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.append(e.__cause__)
    if any(isinstance(e, ConnectionRefusedError) for e in errors):
        return "connection refused"
    deepest = next((e for e in reversed(errors) if e.strerror), None)
    if deepest is not None:
        return str(deepest.strerror)
    return f"handshake failed ({type(exc).__name__})" if isinstance(exc, HandshakeError) else str(exc) or type(exc).__name__


@contextlib.asynccontextmanager
async def open_wire(url: str, connect_timeout: float = 30.0) -> AsyncIterator[Wire]:
    """A connection with its reader; closed (close handshake) when the body ends."""
    async with open_websocket_url(
        url, max_message_size=_MAX_FRAME, connect_timeout=connect_timeout, disconnect_timeout=2
    ) as ws, open_task_group() as tasks:
        wire = Wire(ws)
        tasks.start_soon(wire.reader)
        yield wire


async def ask(wire: Wire, kind: str, request_id: str, seconds: float) -> dict[str, Any] | None:
    """The answer to a ``models`` or ``stats`` frame, or None when none came in time."""
    stream = wire.track(request_id)
    frame = protocol.models_request(request_id) if kind == "models" else protocol.stats_request(request_id)
    if not await wire.send(frame):
        return None
    with trio.move_on_after(seconds):
        await stream.wait_for(lambda s: s.end is not None)
    wire.routes.pop(request_id, None)
    return stream.end if stream.end is not None and stream.end.get("type") == kind else None


async def run_alone(wire: Wire, entry: PoolEntry, request_id: str, model: str | None, seconds: float) -> Stream:
    """Send one request and wait for its end (or ``seconds`` pass: then ``end`` and ``closed`` are None)."""
    stream = wire.track(request_id)
    if await wire.send(entry.frame(request_id, model)):
        with trio.move_on_after(seconds):
            await stream.wait_for(lambda s: s.end is not None)
    else:
        stream.on_closed(wire.closed or "closed")
    wire.routes.pop(request_id, None)
    return stream


def expected_of(stream: Stream) -> Expected | None:
    """The answer a clean run gave, if it ended normally."""
    end = stream.end or {}
    if end.get("type") != "done" or end.get("finish_reason") not in ("length", "stop"):
        return None
    return Expected(tuple(stream.token_ids), "".join(stream.text), str(end["finish_reason"]))


def end_error_code(end: dict[str, Any]) -> str | None:
    """The error code of an ``error`` frame or of a ``done`` with finish reason error; else None."""
    if end.get("type") == "error":
        return str(end.get("code"))
    if end.get("type") == "done" and end.get("finish_reason") == "error":
        return str((end.get("error") or {}).get("code", "error"))
    return None


def mismatch(want: Expected, got: Stream, whole: bool) -> str | None:
    """How ``got`` differs from ``want`` (``whole``: a finished answer; else a prefix), or None."""
    ids, text = tuple(got.token_ids), "".join(got.text)
    if whole:
        usage = ((got.end or {}).get("usage") or {}).get("completion_tokens")
        if ids != want.token_ids:
            return f"token ids differ from index {_first_difference(ids, want.token_ids)}"
        if text != want.text:
            return "same ids, different text"
        if (got.end or {}).get("finish_reason") != want.finish_reason:
            return f"finish reason {(got.end or {}).get('finish_reason')!r}, expected {want.finish_reason!r}"
        if usage != len(ids):
            return f"usage.completion_tokens {usage} for {len(ids)} ids"
        return None
    if ids != want.token_ids[: len(ids)]:
        return f"not a prefix: token ids differ from index {_first_difference(ids, want.token_ids)}"
    if not want.text.startswith(text):
        return "not a prefix: the text differs"
    return None


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ---- the server's statistics -------------------------------------------------------------------


def is_idle(stats: dict[str, Any]) -> bool:
    """Nothing queued or running in any model, and no request in flight at the server (the fields
    that this server's ``stats`` has; a field it lacks is not waited for)."""
    service, server = stats.get("service") or {}, stats.get("server") or {}
    for s in service.get("schedulers") or ():
        if s.get("pending", 0) or (s.get("engine") or {}).get("num_requests", 0):
            return False
    return not server.get("requests_in_flight", 0)


def kv_blocks_in_use(stats: dict[str, Any]) -> int | None:
    try:
        return sum(int(m["blocks"]["used_blocks"]) for m in stats["service"]["blocks"]["models"])
    except (KeyError, TypeError, ValueError):
        return None


def resident_memory(stats: dict[str, Any]) -> dict[str, float]:
    """Every numeric field of ``stats`` whose name says resident memory (``rss``, ``resident``), by
    its path; empty when the server reports none (then nothing is measured)."""
    found: dict[str, float] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                key = str(k)
                here = f"{path}.{key}" if path else key
                if isinstance(v, int | float) and not isinstance(v, bool) and ("rss" in key.lower() or "resident" in key.lower()):
                    found[here] = v
                else:
                    walk(v, here)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")

    walk(stats, "")
    return found


def _stats_body(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k not in ("type", "id")}


async def server_stats(url: str, seconds: float) -> dict[str, Any] | None:
    """One ``stats`` answer over a fresh connection; None when the server cannot be reached or is silent."""
    try:
        with trio.move_on_after(seconds + 5):
            async with open_wire(url, connect_timeout=seconds) as wire:
                frame = await ask(wire, "stats", "soak-stats", seconds)
                return None if frame is None else _stats_body(frame)
    except (HandshakeError, OSError):
        return None
    return None


@attrs.frozen
class AfterLoad:
    idle: bool | None  # None: the server did not answer stats
    waited_s: float
    kv_blocks_in_use: int | None
    requests_in_flight: int | None
    connections_open: int | None  # besides this one
    stats: dict[str, Any] | None


async def wait_idle(url: str, seconds: float, poll: float = 0.1) -> AfterLoad:
    """Ask for ``stats`` until the server is idle or ``seconds`` (connections left open are reported,
    not waited for: on a shared server others may be connected)."""
    start = trio.current_time()
    stats: dict[str, Any] | None = None
    idle: bool | None = None
    try:
        async with open_wire(url, connect_timeout=seconds) as wire:
            with trio.move_on_after(seconds):
                for k in itertools.count():
                    frame = await ask(wire, "stats", f"idle-{k}", seconds)
                    if frame is None:
                        break
                    stats = _stats_body(frame)
                    idle = is_idle(stats)
                    if idle:
                        break
                    await trio.sleep(poll)
    except (HandshakeError, OSError):
        pass
    server = (stats or {}).get("server") or {}
    opened = server.get("connections_open")
    return AfterLoad(
        idle=idle, waited_s=round(trio.current_time() - start, 3),
        kv_blocks_in_use=None if stats is None else kv_blocks_in_use(stats),
        requests_in_flight=server.get("requests_in_flight"),
        connections_open=None if opened is None else max(0, int(opened) - 1),
        stats=stats,
    )


async def served_model(url: str, model: str | None, seconds: float) -> dict[str, Any]:
    """The model's entry of the server's ``models`` answer; ConfigError saying why when there is none."""
    try:
        with trio.move_on_after(seconds + 5):
            async with open_wire(url, connect_timeout=seconds) as wire:
                frame = await ask(wire, "models", "models", seconds)
    except (HandshakeError, OSError) as exc:
        raise ConfigError(f"cannot connect to {url}: {connect_failure(exc)} (is `mini-vllm serve` running there?)") from None
    models = (frame or {}).get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"the server at {url} did not answer 'models' within {seconds:g} s")
    if model is None:
        if len(models) != 1:
            raise ConfigError(f"the server serves {len(models)} models: pick one with --model")
        return dict(models[0])
    for m in models:
        if m.get("name") == model:
            return dict(m)
    raise ConfigError(f"the server has no model {model!r} (it has {', '.join(str(m.get('name')) for m in models)})")


async def learn(
    url: str, pool: Sequence[PoolEntry], model: str | None, seconds: float
) -> tuple[list[tuple[PoolEntry, Expected]], list[str]]:
    """Each entry's answer when it runs alone on a clean connection; entries that failed, with why."""
    learnt: list[tuple[PoolEntry, Expected]] = []
    skipped: list[str] = []
    async with open_wire(url, connect_timeout=seconds) as wire:
        for k, entry in enumerate(pool):
            stream = await run_alone(wire, entry, f"learn-{k}", model, seconds)
            want = expected_of(stream)
            if want is None:
                why = stream.closed or (end_error_code(stream.end) if stream.end else f"no end within {seconds:g} s")
                skipped.append(f"entry {k} ({len(entry.prompt)} chars, max_tokens {entry.max_tokens}): {why}")
            else:
                learnt.append((entry, want))
    return learnt, skipped


# ---- the soak ----------------------------------------------------------------------------------


@attrs.frozen
class SoakConfig:
    url: str
    duration: float
    concurrency: int
    disconnect_rate: float
    cancel_rate: float
    seed: int = 0
    model: str | None = None
    request_timeout: float = 120.0
    idle_timeout: float = 60.0
    max_requests: int | None = None
    progress_interval: float | None = 10.0

    def __attrs_post_init__(self) -> None:
        check_ws_url(self.url)
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise ConfigError(f"--duration must be a number of seconds > 0, got {self.duration}")
        if self.concurrency < 1:
            raise ConfigError(f"--concurrency must be >= 1, got {self.concurrency}")
        for flag, p in (("--disconnect-rate", self.disconnect_rate), ("--cancel-rate", self.cancel_rate)):
            if not 0 <= p <= 1:
                raise ConfigError(f"{flag} must be a probability in [0, 1], got {p}")
        if self.disconnect_rate + self.cancel_rate > 1:
            raise ConfigError(
                f"--disconnect-rate + --cancel-rate must be <= 1 (each request does at most one), "
                f"got {self.disconnect_rate} + {self.cancel_rate}"
            )
        check_seconds(("--request-timeout", self.request_timeout), ("--idle-timeout", self.idle_timeout))
        if self.max_requests is not None and self.max_requests < 1:
            raise ConfigError(f"--max-requests must be >= 1, got {self.max_requests}")


def check_seconds(*flags: tuple[str, float]) -> None:
    """Each (flag, value) a finite number of seconds > 0, or a ConfigError naming the flag."""
    for flag, t in flags:
        if not (math.isfinite(t) and t > 0):
            raise ConfigError(f"{flag} must be a number of seconds > 0, got {t}")


def check_ws_url(url: str) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        ok = parts.scheme in ("ws", "wss") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number in range
        ok = False
    if not ok:
        raise ConfigError(f"--url must be ws://HOST:PORT (or wss://), got {url!r}")


@attrs.define
class Tally:
    """What the clients saw, shared by all of them (one trio thread: no locks needed)."""

    sent: int = 0
    completed_exact: int = 0
    completed_wrong: int = 0
    cancelled: int = 0
    cancel_raced_end: int = 0  # cancels that arrived after the end (within completed_*)
    disconnected: int = 0
    lost: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)
    lost_why: Counter[str] = attrs.field(factory=Counter)
    connect_failures: Counter[str] = attrs.field(factory=Counter)
    server_closed: Counter[str] = attrs.field(factory=Counter)  # connections the server closed, by reason
    unrouted: Counter[str] = attrs.field(factory=Counter)
    wrong_examples: list[dict[str, Any]] = attrs.field(factory=list)
    lost_examples: list[dict[str, Any]] = attrs.field(factory=list)

    def example(self, into: list[dict[str, Any]], item: dict[str, Any]) -> None:
        if len(into) < MAX_EXAMPLES:
            into.append(item)


class Soak:
    def __init__(self, config: SoakConfig, pool: Sequence[tuple[PoolEntry, Expected]], model: str | None) -> None:
        self.config = config
        self.pool = list(pool)
        self.model = model
        self.tally = Tally()
        self.in_flight = 0
        self._started = 0  # requests begun (counted before their send, so --max-requests is never passed)
        self._stop_at = math.inf

    def _stopping(self) -> bool:
        limit = self.config.max_requests
        return trio.current_time() >= self._stop_at or (limit is not None and self._started >= limit)

    async def run(self) -> float:
        """Run the clients; the seconds it took."""
        start = trio.current_time()
        self._stop_at = start + self.config.duration
        async with trio.open_nursery() as nursery:
            if self.config.progress_interval:
                nursery.start_soon(self._progress, start, self.config.progress_interval)
            async with trio.open_nursery() as clients:
                for k in range(self.config.concurrency):
                    clients.start_soon(self._client, k)
            nursery.cancel_scope.cancel()
        return trio.current_time() - start

    async def _progress(self, start: float, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            t = self.tally
            print(
                f"[bench soak] {trio.current_time() - start:.0f} s: {t.sent:,} sent, {t.completed_exact:,} exact, "
                f"{t.completed_wrong} wrong, {t.cancelled:,} cancelled, {t.disconnected:,} disconnected, "
                f"{t.lost} lost, {sum(t.errors.values()):,} errors, {self.in_flight} in flight",
                file=sys.stderr, flush=True,
            )

    async def _client(self, k: int) -> None:
        rng = random.Random(f"{self.config.seed}:client:{k}")  # a str seed is hashed the same in every run
        n = 0
        while not self._stopping():
            try:
                async with open_wire(self.config.url, connect_timeout=self.config.request_timeout) as wire:
                    try:
                        while not self._stopping():
                            n += 1
                            self._started += 1
                            if not await self._one(wire, rng, f"c{k}-{n}"):
                                break
                    finally:
                        self.tally.unrouted.update(wire.unrouted)
                        if wire.closed is not None:
                            self.tally.server_closed[wire.closed] += 1
            except (HandshakeError, OSError) as exc:
                self.tally.connect_failures[connect_failure(exc)] += 1
                await trio.sleep(0.5)  # a server that refuses connections is not hammered

    async def _one(self, wire: Wire, rng: random.Random, rid: str) -> bool:
        """One request; False when this connection is done (dropped on purpose, or closed)."""
        index = rng.randrange(len(self.pool))
        entry, want = self.pool[index]
        r = rng.random()
        action = "disconnect" if r < self.config.disconnect_rate else (
            "cancel" if r < self.config.disconnect_rate + self.config.cancel_rate else "complete")
        trigger = rng.randint(1, len(want.token_ids) - 1) if len(want.token_ids) >= 2 else 0
        if not trigger:
            action = "complete"  # a one-token answer has no middle to act in
        stream = wire.track(rid)
        if not await wire.send(entry.frame(rid, self.model)):
            wire.routes.pop(rid, None)
            return False
        self.tally.sent += 1
        self.in_flight += 1
        try:
            with trio.move_on_after(self.config.request_timeout):
                if action == "complete":
                    await stream.wait_for(lambda s: s.end is not None)
                else:
                    await stream.wait_for(lambda s: s.end is not None or len(s.token_ids) >= trigger)
                    if stream.end is None and stream.closed is None:
                        if action == "disconnect":
                            if self._check_prefix(index, want, stream, "disconnected"):
                                self.tally.disconnected += 1
                            return False  # leaving open_wire closes the connection mid-stream
                        if await wire.send(protocol.cancel_request(rid)):
                            await stream.wait_for(lambda s: s.end is not None)
        finally:
            self.in_flight -= 1
            wire.routes.pop(rid, None)
        return await self._account(index, want, stream, action, wire)

    async def _account(self, index: int, want: Expected, stream: Stream, action: str, wire: Wire) -> bool:
        t = self.tally
        end = stream.end
        if end is None:
            why = stream.closed or wire.closed or f"no end within {self.config.request_timeout:g} s"
            t.lost += 1
            t.lost_why[why.split(":")[0]] += 1
            t.example(t.lost_examples, {"pool_entry": index, "action": action, "why": why,
                                        "tokens_received": len(stream.token_ids)})
            return False  # the connection's state is unknown: start a fresh one
        code = end_error_code(end)
        if code is not None:
            t.errors[code] += 1
            if code in _OVERLOAD_CODES:  # honour the server's hint, within reason
                after = end.get("retry_after")
                ok = isinstance(after, int | float) and not isinstance(after, bool) and math.isfinite(after)
                await trio.sleep(min(max(float(after), 0.0), 5.0) if ok else 0.1)
            return True
        if end.get("finish_reason") == "cancelled":
            if action != "cancel":
                self._wrong(index, want, stream, "cancelled without a cancel")
            elif self._check_prefix(index, want, stream, "cancelled"):
                t.cancelled += 1
            return True
        if action == "cancel":
            t.cancel_raced_end += 1
        problem = mismatch(want, stream, whole=True)
        if problem is None:
            t.completed_exact += 1
        else:
            self._wrong(index, want, stream, problem)
        return True

    def _check_prefix(self, index: int, want: Expected, stream: Stream, what: str) -> bool:
        problem = mismatch(want, stream, whole=False)
        if problem is not None:
            self._wrong(index, want, stream, f"{what}: {problem}")
        return problem is None

    def _wrong(self, index: int, want: Expected, stream: Stream, problem: str) -> None:
        t = self.tally
        t.completed_wrong += 1
        t.example(t.wrong_examples, {
            "pool_entry": index,
            "problem": problem,
            "expected_ids": list(want.token_ids[:32]),
            "got_ids": stream.token_ids[:32],
            "expected_len": len(want.token_ids),
            "got_len": len(stream.token_ids),
            "finish_reason": (stream.end or {}).get("finish_reason"),
        })


async def soak(config: SoakConfig) -> dict[str, Any]:
    """Learn the pool's answers, run the clients, wait for idle; the record (without the environment)."""
    info = await served_model(config.url, config.model, min(config.request_timeout, 30.0))
    model = None if config.model is None else str(info["name"])
    pool = prompt_pool(info.get("max_model_len"))
    learnt, skipped = await learn(config.url, pool, model, config.request_timeout)
    if not learnt:
        raise ConfigError(f"no prompt of the pool could be learnt: {'; '.join(skipped)}")
    before = await server_stats(config.url, 30.0)
    print(f"[bench soak] learnt {len(learnt)} answers; {config.concurrency} clients for {config.duration:g} s ...",
          file=sys.stderr, flush=True)
    run = Soak(config, learnt, model)
    took = await run.run()
    after = await wait_idle(config.url, config.idle_timeout)
    t = run.tally
    memory_before = resident_memory(before or {})
    memory_after = resident_memory(after.stats or {})
    record: dict[str, Any] = {
        "url": config.url,
        "model": info.get("name"),
        "config": {
            "duration_s": config.duration, "concurrency": config.concurrency,
            "disconnect_rate": config.disconnect_rate, "cancel_rate": config.cancel_rate, "seed": config.seed,
            "request_timeout_s": config.request_timeout, "idle_timeout_s": config.idle_timeout,
            "max_requests": config.max_requests,
        },
        "pool": [{"prompt_chars": len(e.prompt), "max_tokens": e.max_tokens, "expected_tokens": len(w.token_ids),
                  "finish_reason": w.finish_reason} for e, w in learnt],
        "pool_skipped": skipped,
        "load_s": round(took, 3),
        "requests": {
            "sent": t.sent, "completed_exact": t.completed_exact, "completed_wrong": t.completed_wrong,
            "cancelled": t.cancelled, "cancel_raced_end": t.cancel_raced_end, "disconnected": t.disconnected,
            "lost": t.lost, "errors": sum(t.errors.values()),
        },
        "errors_by_code": dict(t.errors),
        "lost_by_reason": dict(t.lost_why),
        "wrong_examples": t.wrong_examples,
        "lost_examples": t.lost_examples,
        "connect_failures": dict(t.connect_failures),
        "connections_closed_by_server": dict(t.server_closed),
        "unrouted_frames": dict(t.unrouted),
        "after_load": {
            "idle": after.idle, "waited_s": after.waited_s, "kv_blocks_in_use": after.kv_blocks_in_use,
            "requests_in_flight": after.requests_in_flight, "other_connections_open": after.connections_open,
        },
        "memory": {
            "reported_by_server": bool(memory_before or memory_after),
            "before": memory_before or None,
            "after": memory_after or None,
            # Per process (the frontend's and each engine core's rss_bytes): growth over the load.
            "growth_pct": {k: round(100 * (memory_after[k] - v) / v, 2)
                           for k, v in memory_before.items() if k in memory_after and v > 0} or None,
            **({} if memory_before or memory_after else {
                "note": "the server's stats frame carries no resident-memory field: nothing measured"}),
        },
    }
    record["failures"] = soak_failures(record)
    record["ok"] = not record["failures"]
    return record


def soak_failures(record: dict[str, Any]) -> list[str]:
    r, after = record["requests"], record["after_load"]
    out = []
    if r["lost"]:
        out.append(f"{r['lost']} requests lost")
    if r["completed_wrong"]:
        out.append(f"{r['completed_wrong']} answers wrong")
    if after["idle"] is not True:
        out.append("the server did not become idle" if after["idle"] is False else "the server did not answer stats")
    if after["kv_blocks_in_use"]:
        out.append(f"{after['kv_blocks_in_use']} KV blocks still in use after the load")
    if r["sent"] == 0:
        out.append("no request was sent")
    return out


# ---- the command -------------------------------------------------------------------------------


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a probability: {text!r} (a number in [0, 1])") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a probability must be in [0, 1], got {text!r}")
    return value


def positive(unit: str) -> Callable[[str], float]:
    """An argparse type: a finite number of ``unit`` > 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {unit}: {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a number of {unit} > 0, got {text!r}")
        return value

    return parse


def add_bench_soak(bench_subparsers: Any) -> None:
    p = bench_subparsers.add_parser(
        "soak", help="concurrent clients with random disconnects and cancels; every greedy answer checked",
        description=(__doc__ or "").split("\n\n")[0], formatter_class=HelpFormatter,
    )
    p.add_argument("--url", required=True, help="the server, ws://HOST:PORT (required: no default)")
    p.add_argument("--model", default=None, help="the model's name (default: the server's only model)")
    p.add_argument("--duration", type=positive("seconds"), default=60.0, help="seconds of load")
    p.add_argument("--concurrency", type=positive_int, default=8, help="simulated clients, one connection each")
    p.add_argument("--disconnect-rate", type=_probability, default=0.1,
                   help="probability that a request's client drops its connection mid-stream")
    p.add_argument("--cancel-rate", type=_probability, default=0.1,
                   help="probability that a request is cancelled mid-stream")
    p.add_argument("--seed", type=int, default=0, help="picks prompts, actions and the moments to act")
    p.add_argument("--max-requests", type=positive_int, default=None,
                   help="stop after this many requests even before --duration (default: no limit)")
    p.add_argument("--request-timeout", type=positive("seconds"), default=120.0,
                   help="seconds a request may take to end before it counts as lost")
    p.add_argument("--idle-timeout", type=positive("seconds"), default=60.0,
                   help="seconds to wait for the server to become idle after the load")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="the JSON file (default: soak-DATE.json in the current directory)")
    p.set_defaults(func=run_soak)


@interruptible("soak")
def run_soak(args: argparse.Namespace) -> int:
    try:
        config = SoakConfig(
            url=args.url, duration=args.duration, concurrency=args.concurrency,
            disconnect_rate=args.disconnect_rate, cancel_rate=args.cancel_rate, seed=args.seed, model=args.model,
            request_timeout=args.request_timeout, idle_timeout=args.idle_timeout, max_requests=args.max_requests,
        )
    except ConfigError as exc:
        return fail("soak", str(exc))
    return run_tool("soak", soak, config, print_soak, args)


def run_tool(name: str, tool: Callable[[Any], Awaitable[dict[str, Any]]], config: Any,
             show: Callable[[dict[str, Any]], None], args: argparse.Namespace) -> int:
    """``bench soak`` and ``bench fuzz`` alike: run ``tool(config)``, write its record as JSON
    (``--json``), print its table; exit 1 when it found a problem."""
    started = dt.datetime.now(dt.UTC)
    out = Path(args.json or f"{name}-{started:%Y%m%d-%H%M}.json")
    error = unwritable(out, "--json")
    if error:
        return fail(name, error)
    try:
        body = trio.run(tool, config)
    except ConfigError as exc:
        return fail(name, str(exc), EXIT_ERROR)
    record = {"benchmark": name, **environment(started, args), **body}
    failed = write_text(name, out, json.dumps(record, indent=1) + "\n")
    if failed is not None:
        return failed
    show(record)
    print(f"wrote {out}")
    return EXIT_OK if record["ok"] else EXIT_ERROR


def environment(started: dt.datetime, args: argparse.Namespace) -> dict[str, Any]:
    """Date, command, versions and this (the client's) machine, as every bench record has them."""
    from mini_vllm.bench.env import device_description, versions

    return {
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "mini-vllm " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
        "versions": versions(),
        "client_machine": device_description(),
    }


def counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1])) or "-"


def _memory_line(memory: dict[str, Any]) -> str:
    if not memory["reported_by_server"]:
        return "not reported by the server's stats"
    before, after, growth = memory["before"] or {}, memory["after"] or {}, memory.get("growth_pct") or {}

    def mib(v: Any) -> str:
        return f"{v / 2**20:,.1f} MiB" if isinstance(v, int | float) else "-"

    return "; ".join(f"{k} {mib(before.get(k))} -> {mib(after.get(k))}"
                     + (f" ({growth[k]:+.2f} %)" if k in growth else "") for k in sorted({*before, *after}))


def print_soak(record: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    c, r, a = record["config"], record["requests"], record["after_load"]
    print(f"\nbench soak: {record['url']} ({record['model']}), {c['duration_s']:g} s, {c['concurrency']} clients, "
          f"disconnect {c['disconnect_rate']:g}, cancel {c['cancel_rate']:g}, seed {c['seed']}", file=out)
    rows = [
        ("requests sent", r["sent"], f"{len(record['pool'])} prompts, each learnt alone first"),
        ("completed exact", r["completed_exact"], ""),
        ("completed wrong", r["completed_wrong"], "; ".join(e["problem"] for e in record["wrong_examples"][:2])),
        ("cancelled", r["cancelled"], f"and {r['cancel_raced_end']} cancels raced the end (counted as completed)"),
        ("disconnected", r["disconnected"], ""),
        ("lost", r["lost"], counts(record["lost_by_reason"]) if r["lost"] else ""),
        ("errors", r["errors"], counts(record["errors_by_code"]) if r["errors"] else ""),
        ("KV blocks in use after", "-" if a["kv_blocks_in_use"] is None else a["kv_blocks_in_use"],
         f"idle: {a['idle']} after {a['waited_s']:g} s, {a['other_connections_open']} other connections open"),
        ("server memory", "", _memory_line(record["memory"])),
    ]
    if record["connections_closed_by_server"]:
        rows.append(("closed by the server", sum(record["connections_closed_by_server"].values()),
                     counts(record["connections_closed_by_server"])))
    if record["connect_failures"]:
        rows.append(("connect failures", sum(record["connect_failures"].values()), counts(record["connect_failures"])))
    for name, value, note in rows:
        print(f"  {name:<24} {value!s:>8}  {note}".rstrip(), file=out)
    print("  result: " + ("OK" if record["ok"] else "FAILED: " + "; ".join(record["failures"])), file=out)
