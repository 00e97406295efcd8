"""``mini-vllm bench fuzz --protocol http``: hostile HTTP requests on the server's one port, beside a good client.

``--requests`` requests, each built from ``--seed`` and its number alone (``build_case``: the same
number gives the same bytes), go over ``--connections`` concurrent clients, one request per TCP
connection: malformed request lines and headers, oversized heads, bad or lying ``Content-Length``,
broken chunked bodies, bodies that are not JSON or not objects, valid ``/v1/completions``,
``/v1/chat/completions``, ``/tokenize`` and ``/detokenize`` bodies with one or two fields mutated,
wrong methods and unknown paths, and streams whose client leaves after the first chunk.

Each answer owed must come within ``--reply-timeout`` and be what docs/protocol.md promises: a
status line, an OpenAI-shaped JSON error for a 4xx, a 200 whose JSON body or SSE stream is well
formed (a stream ends with ``data: [DONE]``). Findings: a 5xx, an answer owed and not given (a
timeout, a connection closed or reset first), a malformed answer. Meanwhile a good client sends one
greedy ``/v1/completions`` request after another, and each answer must equal the one learnt before
the fuzzing began; at the end ``/health`` must answer 200, the good request must still be answered
exactly, and (when ``/metrics`` is reachable) ``vllm:num_requests_running`` must come back to 0.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import attrs
import h11
import trio

from mini_vllm.bench.fuzz import (
    BIG_INTS,
    INT_LITERALS,
    NON_FINITE,
    NOT_JSON,
    ODD_KEYS,
    ODD_VALUES,
    SURROGATES,
    Draft,
)
from mini_vllm.bench.openai_load import http_endpoint
from mini_vllm.bench.soak import MAX_EXAMPLES, check_seconds, check_ws_url, counts
from mini_vllm.engine.errors import ConfigError

Owed = Literal["answer", "optional"]  # "optional": the request breaks off on purpose, nothing is owed
_RECEIVE = 65536
_MAX_ANSWER_BYTES = 8 << 20  # an answer longer than this is a finding, not something to buffer forever
_HEAD_SHOWN = 160
_GOOD_BODY: dict[str, Any] = {
    "prompt": "The well-behaved client asks the same question every time", "max_tokens": 6, "temperature": 0,
    "ignore_eos": True, "return_token_ids": True,
}
# max_tokens values above the room the prompt leaves are valid (the answer ends at max_model_len):
# they make answers of seconds, not errors, so the mutations use others.
_LONG_MAX_TOKENS = frozenset(json.dumps(v) for v in BIG_INTS if isinstance(v, int | float) and not isinstance(v, bool)
                             and 3 < v < 2**63)
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
_INT_FIELDS = ("max_tokens", "n", "top_k", "seed", "logprobs", "min_tokens", "priority")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty")
_HUGE: tuple[tuple[str, Any], ...] = (
    ("n", 65), ("n", 10**6), ("n", 2**63), ("max_tokens", 2**63), ("max_tokens", 2**64), ("max_tokens", 10**30),
    ("max_tokens", 0), ("n", 0), ("n", -1),
)
_BAD_LINES: tuple[bytes, ...] = (
    b"GET\r\n", b"GET /\r\n", b"GET / HTTP/9.9\r\n", b"GET / HTTP/1.1 extra\r\n", b" GET / HTTP/1.1\r\n",
    b"G\x00T / HTTP/1.1\r\n", b"GET /\x7f HTTP/1.1\r\n", b"\xff\xfe / HTTP/1.1\r\n", b"GET  / HTTP/1.1\r\n",
    b"POST /v1/completions HTTP/1.1\n", b"HTTP/1.1 200 OK\r\n", b"GET http://[::1 HTTP/1.1\r\n",
    b"PRI * HTTP/2.0\r\n", b"GET / HTTP/1.1\r", b"\r\n\r\nGET / HTTP/1.1\r\n", b"get / http/1.1\r\n",
)
_BAD_HEADERS: tuple[bytes, ...] = (
    b"NoColon\r\n", b"Bad Name: x\r\n", b": empty\r\n", b"X: a\x00b\r\n", b"X: \xff\r\n", b" folded: x\r\n",
    b"X: a\r\n continued\r\n", b"Host: a\r\nHost: b\r\n", b"Transfer-Encoding: gzip\r\n",
    b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n", b"X\r\n", b"X:\tv\r\n",
)
# RFC 9112 6.1: a transfer coding the server does not know is answered 501 (so 501 is right there).
_UNKNOWN_CODING = (b"Transfer-Encoding: gzip\r\n",)
_BAD_LENGTHS: tuple[bytes, ...] = (b"-1", b"abc", b"1e3", b"0x10", b" ", b"", b"99999999999999999999", b"+5",
                                   b"5, 6", b"18446744073709551616")
_BAD_CHUNKS: tuple[bytes, ...] = (
    b"zz\r\nabc\r\n0\r\n\r\n", b"5\r\nab\r\n0\r\n\r\n", b"-1\r\n\r\n", b"3\r\nabcdef\r\n0\r\n\r\n",
    b"3;\x00\r\nabc\r\n0\r\n\r\n", b"\r\n\r\n",
)


# ---- requests --------------------------------------------------------------------------------


@attrs.frozen
class FuzzTarget:
    """What the requests need to know of the server."""

    authority: str  # the Host header
    model: str


@attrs.frozen
class HttpCase:
    index: int
    family: str
    what: str
    data: bytes
    owed: Owed = "answer"
    leave_after_first_chunk: bool = False
    method: str = "POST"  # how the answer is framed (a HEAD answer has no body)
    may_501: bool = False  # a transfer coding the server need not know

    def head(self) -> str:
        text = self.data[:_HEAD_SHOWN].decode("ascii", "backslashreplace")
        return text if len(self.data) <= _HEAD_SHOWN else f"{text}... ({len(self.data):,} bytes)"

    def describe(self) -> dict[str, Any]:
        return {"request": self.index, "family": self.family, "what": self.what, "head": self.head()}


def _request(method: str, path: str, target: FuzzTarget, body: bytes | None = None,
             headers: tuple[bytes, ...] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1\r\n".encode(), b"Host: " + target.authority.encode() + b"\r\n",
             b"Connection: close\r\n", *headers]
    if body is not None:
        lines += [b"Content-Type: application/json\r\n", b"Content-Length: %d\r\n" % len(body)]
    return b"".join(lines) + b"\r\n" + (body or b"")


def _base_body(route: str, target: FuzzTarget, rng: random.Random) -> dict[str, Any]:
    common = {"model": target.model}
    if route == "/v1/completions":
        return {**common, "prompt": "fuzz me", "max_tokens": 3, "temperature": 0, "stream": rng.random() < 0.5}
    if route == "/v1/chat/completions":
        return {**common, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
                "stream": rng.random() < 0.5}
    if route == "/tokenize":
        return {**common, "prompt": "hello there"}
    return {**common, "tokens": [1, 2, 3]}


def _mutate(rng: random.Random, d: Draft, route: str) -> str:
    """One mutation of a valid body (``d.frame``), in place; what it did."""
    f = d.frame or {}
    generating = route.startswith("/v1/")
    pick = rng.choice(("wrong type", "bad int", "non-finite", "surrogate", "unknown field", "missing field",
                       "huge", "unknown model"))
    if pick == "wrong type":
        field = rng.choice(sorted(f) + (["n", "stop", "ignore_eos"] if generating else []))
        f[field] = rng.choice(ODD_VALUES)
        if field == "max_tokens" and f[field] is None:
            f[field] = "3"  # null means "the room left in max_model_len": a long answer, not a hostile one
        return f"{field} = {json.dumps(f[field])}"
    if pick == "bad int":
        field = rng.choice(_INT_FIELDS) if generating else "tokens"
        text = rng.choice(INT_LITERALS) if rng.random() < 0.3 else json.dumps(rng.choice(BIG_INTS))
        if field == "max_tokens" and text in _LONG_MAX_TOKENS:
            text = json.dumps(-int(float(text)))  # a valid, merely long answer is not what this family is for
        f[field] = [d.literal(text)] if field == "tokens" else d.literal(text)
        return f"{field} = {text if len(text) < 20 else f'<{len(text)}-char literal>'}"
    if pick == "non-finite":
        field = rng.choice((*_FLOAT_FIELDS, *_INT_FIELDS)) if generating else rng.choice(sorted(f))
        text = rng.choice(NON_FINITE)
        f[field] = d.literal(text)
        return f"{field} = {text}"
    if pick == "surrogate":
        bad = rng.choice(SURROGATES)
        field = rng.choice([k for k, v in f.items() if isinstance(v, str)] + ["key"])
        if field == "key":
            f[bad] = 1
        else:
            f[field] = bad
        d.ascii = True  # the escape is what a client can send
        return f"lone surrogate {bad.encode('ascii', 'backslashreplace').decode()} in {field}"
    if pick == "unknown field":
        key = rng.choice(ODD_KEYS)
        f[key] = rng.choice(ODD_VALUES)
        return f"unknown field {key[:20]!r}"
    if pick == "missing field":
        key = rng.choice(sorted(set(f) - {"max_tokens"}))  # without it, the answer fills max_model_len
        del f[key]
        return f"no {key}"
    if pick == "huge" and generating:
        field, value = rng.choice(_HUGE)
        f[field] = value
        return f"{field} = {value}"
    f["model"] = rng.choice(("no-such-model", "", f"{f.get('model')} ", "DEMO" * 50))
    return f"model = {f['model'][:30]!r}"


def _mutated_body(rng: random.Random, target: FuzzTarget) -> tuple[bytes, str, str]:
    route = rng.choice(_ROUTES)
    d = Draft(_base_body(route, target, rng))
    whats = [_mutate(rng, d, route) for _ in range(rng.randint(1, 2))]
    rendered = d.render()
    body = rendered if isinstance(rendered, bytes) else rendered.encode("utf-8", "surrogatepass")
    return body, route, "; ".join(whats)


def _family_mutated(rng: random.Random, target: FuzzTarget) -> tuple[bytes, str, Owed]:
    body, route, what = _mutated_body(rng, target)
    return _request("POST", route, target, body), f"{route}: {what}", "answer"


def _family_valid(rng: random.Random, target: FuzzTarget) -> tuple[bytes, str, Owed]:
    route = rng.choice(_ROUTES)
    return _request("POST", route, target, json.dumps(_base_body(route, target, rng)).encode()), route, "answer"


def _family_raw_head(rng: random.Random, target: FuzzTarget) -> tuple[bytes, str, Owed]:
    host = b"Host: " + target.authority.encode() + b"\r\n"
    if rng.random() < 0.5:
        line = rng.choice(_BAD_LINES)
        return line + host + b"\r\n", f"request line {line[:30]!r}", "answer"
    header = rng.choice(_BAD_HEADERS)
    body = b"0\r\n\r\n" if b"chunked" in header else b""  # a server that takes the chunked body needs its end
    return b"GET /health HTTP/1.1\r\n" + host + header + b"\r\n" + body, f"header {header[:30]!r}", "answer"


def _family_oversized_head(rng: random.Random, target: FuzzTarget) -> tuple[bytes, str, Owed]:
    size = rng.choice((40_000, 100_000, 400_000))
    if rng.random() < 0.5:
        return _request("GET", "/health", target, headers=(b"X-Big: " + b"a" * size + b"\r\n",)), \
            f"one {size:,}-byte header", "answer"
    many = tuple(b"X-H%d: v\r\n" % i for i in range(size // 10))
    if rng.random() < 0.5:
        return _request("GET", "/" + "p" * size, target), f"{size:,}-byte path", "answer"
    return _request("GET", "/health", target, headers=many), f"{len(many):,} headers", "answer"


def _family_bad_length(rng: random.Random, target: FuzzTarget) -> tuple[bytes, str, Owed]:
    body = json.dumps(_base_body("/tokenize", target, rng)).encode()
    head = b"POST /tokenize HTTP/1.1\r\nHost: " + target.authority.encode() + b"\r\nConnection: close\r\n"
    pick = rng.random()
    if pick < 0.4:
        value = rng.choice(_BAD_LENGTHS)
        return head + b"Content-Length: " + value + b"\r\n\r\n" + body, f"Content-Length: {value!r}", "answer"
    if pick < 0.6:
        return (head + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(body), len(body) + 1) + body,
                "two different Content-Lengths", "answer")
    if pick < 0.8:  # says less than it sends: the rest is garbage where the next request would start
        return (head + b"Content-Length: %d\r\n\r\n" % (len(body) // 2) + body, "Content-Length shorter than the body",
                "answer")
    # Says more than it sends, then closes its side: the server sees the end mid-body.
    return (head + b"Content-Length: %d\r\n\r\n" % (len(body) + rng.choice((1, 1000, 10**9))) + body,
            "Content-Length longer than the body, then EOF", "optional")


def _family_bad_chunked(rng: random.Random, target: FuzzTarget) -> tuple[bytes, str, Owed]:
    head = (b"POST /tokenize HTTP/1.1\r\nHost: " + target.authority.encode()
            + b"\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
    if rng.random() < 0.7:
        chunk = rng.choice(_BAD_CHUNKS)
        return head + chunk, f"chunked body {chunk[:24]!r}", "answer"
    # Cut short, then the client closes its side (a server may well wait for the rest until then).
    cut = rng.choice((b"5\r\n{\"mod", b"ffffffffffffffffffff\r\n", b"10\r\n", b"3\r\nabc\r\n", b"3\nabc\n0\n\n"))
    return head + cut, f"chunked body {cut[:24]!r} cut short, then EOF", "optional"


def _family_not_json(rng: random.Random, target: FuzzTarget) -> tuple[bytes, str, Owed]:
    route = rng.choice(_ROUTES)
    pick = rng.random()
    if pick < 0.5:
        text = rng.choice(NOT_JSON)
        return _request("POST", route, target, text.encode()), f"{route}: not JSON {text[:20]!r}", "answer"
    if pick < 0.75:
        value = rng.choice(("[]", "[1, 2]", '"text"', "42", "null", "true", '[{"model": "x"}]'))
        return _request("POST", route, target, value.encode()), f"{route}: not an object {value}", "answer"
    raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return _request("POST", route, target, raw), f"{route}: {len(raw)} random bytes", "answer"


def _family_wrong_route(rng: random.Random, target: FuzzTarget) -> tuple[bytes, str, Owed]:
    if rng.random() < 0.5:
        method, path = rng.choice((("GET", "/v1/completions"), ("PUT", "/v1/chat/completions"),
                                   ("DELETE", "/tokenize"), ("POST", "/health"), ("PATCH", "/v1/models"),
                                   ("POST", "/metrics"), ("BREW", "/v1/completions"), ("TRACE", "/")))
    else:
        method = rng.choice(("GET", "POST"))
        path = rng.choice(("/v2/completions", "/v1/completions/", "/v1//completions", "/%00", "/../../etc/passwd",
                           "/v1/completions?x=%zz", "/" + "é" * 10, "//", "/v1/embeddings", "*"))
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    return _request(method, path, target, body), f"{method} {path}", "answer"


def _family_leave_stream(rng: random.Random, target: FuzzTarget) -> tuple[bytes, str, Owed]:
    route = rng.choice(_ROUTES[:2])
    body = _base_body(route, target, rng)
    body.update(stream=True, max_tokens=rng.choice((16, 64)), ignore_eos=True, n=rng.randint(1, 3))
    return _request("POST", route, target, json.dumps(body).encode()), f"{route}: leaves after the first chunk", \
        "optional"


Family = Callable[[random.Random, FuzzTarget], tuple[bytes, str, Owed]]
FAMILIES: dict[str, Family] = {
    "raw_head": _family_raw_head, "oversized_head": _family_oversized_head, "bad_length": _family_bad_length,
    "bad_chunked": _family_bad_chunked, "not_json": _family_not_json, "mutated_body": _family_mutated,
    "valid": _family_valid, "wrong_route": _family_wrong_route, "leave_stream": _family_leave_stream,
}
# mutated bodies are the richest family: they get more of the requests
_WEIGHTS = {"mutated_body": 5, "valid": 1, "leave_stream": 1}


def build_case(seed: int, index: int, target: FuzzTarget) -> HttpCase:
    """Request ``index`` of a run with ``seed``: the same numbers (and server) give the same bytes."""
    rng = random.Random(f"http-fuzz:{seed}:{index}")
    names = list(FAMILIES)
    family = rng.choices(names, [_WEIGHTS.get(n, 2) for n in names])[0]
    data, what, owed = FAMILIES[family](rng, target)
    method = data.split(b" ", 1)[0].decode("ascii", "replace")
    may_501 = any(coding in data.split(b"\r\n\r\n", 1)[0] + b"\r\n" for coding in _UNKNOWN_CODING)
    return HttpCase(index, family, what, data, owed, family == "leave_stream", method, may_501)


# ---- answers ---------------------------------------------------------------------------------


@attrs.define
class Answer:
    """What one request got back."""

    status: int | None = None
    content_type: str = ""
    body: bytes = b""
    problem: str | None = None  # a finding's kind, with ``detail``
    detail: str = ""


def _send_framing_request(conn: h11.Connection, method: str) -> None:
    """h11 frames the answer by the request it believes went out; the bytes that did go out are ours."""
    framing_method = method if method in ("HEAD", "GET", "POST") else "POST"
    conn.send(h11.Request(method=framing_method, target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())


async def _send_all(stream: trio.SocketStream, case: HttpCase) -> None:
    # The server may answer (431, 400) and close before it read everything: that is not a failure here.
    try:
        await stream.send_all(case.data)
        if case.owed == "optional" and not case.leave_after_first_chunk:
            await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


async def _read_answer(stream: trio.SocketStream, case: HttpCase) -> Answer:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_ANSWER_BYTES)
    _send_framing_request(conn, case.method)
    answer = Answer()
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return Answer(answer.status, problem="malformed_answer", detail=f"not HTTP: {exc}")
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(_RECEIVE)
            except (trio.BrokenResourceError, OSError) as exc:
                return Answer(answer.status, problem="closed_without_answer", detail=f"connection broke: {exc!r}")
            if not data and answer.status is None:
                return Answer(problem="closed_without_answer", detail="closed before a status line")
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            answer.status = event.status_code
            answer.content_type = dict(event.headers).get(b"content-type", b"").decode("latin-1")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > _MAX_ANSWER_BYTES:
                return Answer(answer.status, problem="malformed_answer", detail="an answer of over 8 MiB")
            if case.leave_after_first_chunk and answer.status == 200 and b"\n\n" in body:
                answer.body = bytes(body)
                return answer  # the client leaves here, on purpose
        elif isinstance(event, h11.EndOfMessage):
            answer.body = bytes(body)
            return answer
        elif isinstance(event, h11.ConnectionClosed):
            if answer.status is None:
                return Answer(problem="closed_without_answer", detail="closed before a status line")
            return Answer(answer.status, problem="malformed_answer", detail="closed mid-answer")


def _error_shape_problem(body: bytes) -> str | None:
    try:
        value = json.loads(body)
    except ValueError:
        return f"a 4xx body that is not JSON: {body[:80]!r}"
    error = value.get("error") if isinstance(value, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"not OpenAI's error shape: {body[:120]!r}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return f"an error without a message or type: {body[:120]!r}"
    return None


def sse_problem(body: bytes, complete: bool = True) -> str | None:
    """What is wrong with an SSE body of ``data: {json}`` events ending in ``data: [DONE]`` (None: nothing)."""
    events = [e for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    if complete and not body.replace(b"\r\n", b"\n").endswith(b"\n\n"):
        return "an SSE stream that does not end with a blank line"
    if not complete:
        events = events[:-1] if not body.endswith(b"\n\n") else events
    done = False
    for event in events:
        data = b"\n".join(line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if done:
            return "an event after [DONE]"
        if data == b"[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            return f"an SSE event that is not JSON: {data[:80]!r}"
        if not isinstance(chunk, dict):
            return f"an SSE event that is not an object: {data[:80]!r}"
        if "error" in chunk:
            return f"an in-band error: {data[:120]!r}"
    if complete and not done:
        return "an SSE stream that does not end with data: [DONE]"
    return None


def judge(case: HttpCase, answer: Answer) -> tuple[str, str] | None:
    """The finding (kind, detail) of ``case``'s answer, or None when it is what the protocol promises."""
    if answer.problem is not None:
        if case.owed == "optional" and answer.problem == "closed_without_answer":
            return None
        return answer.problem, answer.detail
    status = answer.status or 0
    if status >= 500 and not (status == 501 and case.may_501):
        return "server_error", f"{status}: {answer.body[:160]!r}"
    if 400 <= status < 600:
        problem = _error_shape_problem(answer.body)
        return None if problem is None else ("malformed_answer", problem)
    if status != 200:
        return "unexpected_status", f"{status}"
    if answer.content_type.startswith("text/event-stream"):
        problem = sse_problem(answer.body, complete=not case.leave_after_first_chunk)
        return None if problem is None else ("malformed_answer", problem)
    if not answer.content_type.startswith("application/json"):
        return None  # the browser page (GET /), metrics text: not this tool's to judge
    try:
        value = json.loads(answer.body)
    except ValueError:
        return "malformed_answer", f"a 200 body that is not JSON: {answer.body[:80]!r}"
    return None if isinstance(value, dict) else ("malformed_answer", "a 200 body that is not an object")


async def exchange(host: str, port: int, case: HttpCase, seconds: float) -> Answer:
    """Send ``case`` on a fresh connection and read its answer, within ``seconds``."""
    with trio.move_on_after(seconds) as scope:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            return Answer(problem="connect_failed", detail=repr(exc))
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(_send_all, stream, case)
            answer = await _read_answer(stream, case)
            nursery.cancel_scope.cancel()
            return answer
    if scope.cancelled_caught and case.owed == "optional":
        return Answer(problem="closed_without_answer", detail="nothing owed")
    return Answer(problem="unanswered", detail=f"no whole answer within {seconds:g} s")


# ---- the run ---------------------------------------------------------------------------------


@attrs.frozen
class HttpFuzzConfig:
    url: str
    requests: int
    seed: int = 0
    model: str | None = None
    connections: int = 4
    reply_timeout: float = 10.0
    time_limit: float = 600.0
    idle_timeout: float = 60.0

    def __attrs_post_init__(self) -> None:
        check_ws_url(self.url)
        if self.url.startswith("wss:"):
            raise ConfigError("--protocol http speaks plain HTTP: give --url ws://HOST:PORT, not wss://")
        if self.requests < 1:
            raise ConfigError(f"--requests must be >= 1, got {self.requests}")
        if self.connections < 1:
            raise ConfigError(f"--connections must be >= 1, got {self.connections}")
        check_seconds(("--reply-timeout", self.reply_timeout), ("--time-limit", self.time_limit),
                      ("--idle-timeout", self.idle_timeout))


@attrs.define
class FamilyCount:
    sent: int = 0
    by_status: Counter[str] = attrs.field(factory=Counter)  # "2xx", "4xx", "5xx", "none"


@attrs.define
class HttpTally:
    sent: int = 0
    by_family: dict[str, FamilyCount] = attrs.field(factory=dict)
    by_status: Counter[str] = attrs.field(factory=Counter)
    findings: Counter[str] = attrs.field(factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)

    def add(self, case: HttpCase, answer: Answer, finding: tuple[str, str] | None) -> None:
        status = "none" if answer.status is None else f"{answer.status // 100}xx"
        family = self.by_family.setdefault(case.family, FamilyCount())
        family.sent += 1
        family.by_status[status] += 1
        self.by_status[status] += 1
        if finding is not None:
            kind, detail = finding
            self.findings[kind] += 1
            shown = self.examples.setdefault(kind, [])
            if len(shown) < MAX_EXAMPLES:
                shown.append({**case.describe(), "status": answer.status, "detail": detail})


@attrs.define
class GoodTally:
    requests: int = 0
    exact: int = 0
    wrong: int = 0
    failed: int = 0
    examples: list[dict[str, Any]] = attrs.field(factory=list)


def _good_case(target: FuzzTarget) -> HttpCase:
    body = json.dumps({**_GOOD_BODY, "model": target.model}).encode()
    return HttpCase(-1, "good", "the good client's request", _request("POST", "/v1/completions", target, body))


def _good_result(answer: Answer) -> tuple[str, list[int]] | None:
    """The good request's (text, token ids), or None when it was not a whole 200 answer."""
    if answer.status != 200 or answer.problem is not None:
        return None
    try:
        choice = json.loads(answer.body)["choices"][0]
        return str(choice["text"]), [int(t) for t in choice["token_ids"]]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


async def _get(host: str, port: int, path: str, target: FuzzTarget, seconds: float) -> Answer:
    case = HttpCase(-1, "check", path, _request("GET", path, target), method="GET")
    return await exchange(host, port, case, seconds)


async def _served_model(host: str, port: int, config: HttpFuzzConfig, authority: str) -> str:
    answer = await _get(host, port, "/v1/models", FuzzTarget(authority, ""), config.reply_timeout)
    if answer.status != 200:
        raise ConfigError(f"GET /v1/models at {config.url} did not answer 200 ({answer.status or answer.detail}): "
                          "is `mini-vllm serve` running there?")
    names = [str(m.get("id")) for m in json.loads(answer.body).get("data", []) if isinstance(m, dict)]
    if config.model is not None:
        if config.model not in names:
            raise ConfigError(f"--model {config.model!r} is not served there (served: {', '.join(names)})")
        return config.model
    if len(names) != 1:
        raise ConfigError(f"the server serves {len(names)} models ({', '.join(names)}): choose one with --model")
    return names[0]


def _running(metrics_text: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            total += float(line.rsplit(" ", 1)[-1])
    return total


async def _wait_not_running(host: str, port: int, target: FuzzTarget, seconds: float) -> float | None:
    """``vllm:num_requests_running`` once it is 0 (or the last value seen after ``seconds``); None: no /metrics."""
    last: float | None = None
    with trio.move_on_after(seconds):
        while True:
            answer = await _get(host, port, "/metrics", target, min(seconds, 10.0))
            if answer.status != 200:
                return last
            last = _running(answer.body.decode("utf-8", "replace"))
            if last == 0:
                return last
            await trio.sleep(0.05)  # a poll of the server's own state, not a wait for time to pass
    return last


class HttpFuzz:
    def __init__(self, config: HttpFuzzConfig, host: str, port: int, target: FuzzTarget,
                 good: tuple[str, list[int]]) -> None:
        self.config, self.host, self.port, self.target, self.good = config, host, port, target, good
        self.tally = HttpTally()
        self.good_tally = GoodTally()
        self._next = 0
        self.stopped_by_time = False

    async def run(self) -> float:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._good_loop)
            with trio.move_on_after(self.config.time_limit) as limit:
                async with trio.open_nursery() as fuzzers:
                    for _ in range(self.config.connections):
                        fuzzers.start_soon(self._fuzzer)
            self.stopped_by_time = limit.cancelled_caught
            nursery.cancel_scope.cancel()
        return trio.current_time() - start

    async def _fuzzer(self) -> None:
        while self._next < self.config.requests:
            index, self._next = self._next, self._next + 1
            case = build_case(self.config.seed, index, self.target)
            answer = await exchange(self.host, self.port, case, self.config.reply_timeout)
            self.tally.sent += 1
            self.tally.add(case, answer, judge(case, answer))

    async def _good_loop(self) -> None:
        case = _good_case(self.target)
        while True:
            answer = await exchange(self.host, self.port, case, self.config.reply_timeout)
            got = _good_result(answer)
            g = self.good_tally
            g.requests += 1
            if got == self.good:
                g.exact += 1
                continue
            if got is None:
                g.failed += 1
            else:
                g.wrong += 1
            if len(g.examples) < MAX_EXAMPLES:
                g.examples.append({"status": answer.status, "problem": answer.problem, "detail": answer.detail,
                                   "got": None if got is None else {"text": got[0], "token_ids": got[1]}})


async def http_fuzz(config: HttpFuzzConfig) -> dict[str, Any]:
    """Learn the good answer, fuzz, check the server at the end; the record (without the environment)."""
    endpoint = http_endpoint(config.url)
    host, port = endpoint.host, endpoint.port
    model = await _served_model(host, port, config, endpoint.authority)
    target = FuzzTarget(endpoint.authority, model)
    good_case = _good_case(target)
    good = _good_result(await exchange(host, port, good_case, config.reply_timeout))
    again = _good_result(await exchange(host, port, good_case, config.reply_timeout))
    if good is None:
        raise ConfigError("the good client's request failed before the fuzzing began")
    if again != good:
        raise ConfigError("the good client's greedy answer changed between two runs on an idle server: "
                          "is someone else using it, or is the server not deterministic?")
    print(f"[bench fuzz] {config.requests:,} HTTP requests over {config.connections} connections ...",
          file=sys.stderr, flush=True)
    run = HttpFuzz(config, host, port, target, good)
    took = await run.run()
    health = await _get(host, port, "/health", target, config.reply_timeout)
    final = _good_result(await exchange(host, port, good_case, config.reply_timeout))
    running = await _wait_not_running(host, port, target, config.idle_timeout)
    t, g = run.tally, run.good_tally
    record: dict[str, Any] = {
        "url": config.url, "protocol": "http", "model": model,
        "config": {"requests": config.requests, "seed": config.seed, "connections": config.connections,
                   "reply_timeout_s": config.reply_timeout, "time_limit_s": config.time_limit},
        "duration_s": round(took, 3),
        "stopped_by_time_limit": run.stopped_by_time,
        "requests": {"sent": t.sent, "by_status_class": dict(t.by_status)},
        "by_family": {name: {"sent": f.sent, "by_status_class": dict(f.by_status)}
                      for name, f in sorted(t.by_family.items())},
        "findings": dict(t.findings),
        "examples": t.examples,
        "good_client": {"requests": g.requests, "exact": g.exact, "wrong": g.wrong, "failed": g.failed,
                        "expected": {"text": good[0], "token_ids": good[1]}, "examples": g.examples},
        "end": {"health_status": health.status, "serving_correctly": final == good,
                "requests_running": running, "metrics_reachable": running is not None},
    }
    record["failures"], record["warnings"] = http_fuzz_verdict(record)
    record["ok"] = not record["failures"]
    return record


def http_fuzz_verdict(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    findings, g, end = record["findings"], record["good_client"], record["end"]
    failures = [f"{n} {kind}" for kind, n in sorted(findings.items())]
    failures += [f"{n} {what}" for n, what in ((g["wrong"], "wrong answers of the good client"),
                                                (g["failed"], "good client's requests failed")) if n]
    if end["health_status"] != 200:
        failures.append(f"/health answers {end['health_status']} at the end, not 200")
    if not end["serving_correctly"]:
        failures.append("the server does not serve the good request correctly at the end")
    if end["requests_running"]:
        failures.append(f"vllm:num_requests_running is {end['requests_running']:g} at the end, not 0")
    warnings = []
    if record["stopped_by_time_limit"]:
        warnings.append(f"stopped by --time-limit after {record['requests']['sent']:,} requests")
    if not end["metrics_reachable"]:
        warnings.append("/metrics not reachable: requests running at the end not checked")
    return failures, warnings


def print_http_fuzz(record: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    c, r, g, end = record["config"], record["requests"], record["good_client"], record["end"]
    print(f"\nbench fuzz (http): {record['url']} ({record['model']}), {r['sent']:,} requests over "
          f"{c['connections']} connections, seed {c['seed']}, {record['duration_s']:g} s", file=out)
    classes = ("2xx", "4xx", "5xx", "none")
    print(f"  {'family':<16} {'sent':>6} " + " ".join(f"{k:>6}" for k in classes), file=out)
    rows = [*record["by_family"].items(), ("total", {"sent": r["sent"], "by_status_class": r["by_status_class"]})]
    for name, f in rows:
        print(f"  {name:<16} {f['sent']:>6} " + " ".join(f"{f['by_status_class'].get(k, 0):>6}" for k in classes),
              file=out)
    if r["by_status_class"].get("5xx", 0) > record["findings"].get("server_error", 0):
        print("  (the 5xx column holds 501s for an unknown Transfer-Encoding: RFC 9112 asks for them)", file=out)
    print(f"  findings: {counts(record['findings'])}", file=out)
    for kind, items in record["examples"].items():
        for e in items:
            print(f"    {kind}: request {e['request']} {e['family']}: {e['what'][:80]} -> {e['detail'][:100]}", file=out)
    print(f"  good client: {g['exact']}/{g['requests']} exact, {g['wrong']} wrong, {g['failed']} failed", file=out)
    print(f"  at the end: /health {end['health_status']}, serving correctly {end['serving_correctly']}, "
          f"requests running {end['requests_running']}", file=out)
    for w in record["warnings"]:
        print(f"  warning: {w}", file=out)
    print("  result: " + ("OK" if record["ok"] else "FAILED: " + "; ".join(record["failures"])), file=out)
