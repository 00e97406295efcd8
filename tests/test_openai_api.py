"""The OpenAI-compatible routes (transport/openai_api.py) through a fake responder, against a real
in-process service with the demo model: parsing, every error, SSE framing, whole bodies, logprobs,
abort on cancel, fair share. The official client over real sockets is in test_openai_client.py."""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import pytest
import trio
from conftest_serving import PROMPTS, Reference, build_engine, greedy, wait_blocks_released

from mini_vllm.actors import (
    DuplicateRequest,
    ErrorInfo,
    ModelRequired,
    Overloaded,
    Service,
    ServiceConfig,
    ShuttingDown,
    UnknownModel,
    open_service,
)
from mini_vllm.actors.core_client import CoreExited
from mini_vllm.engine import LLMEngine
from mini_vllm.engine.demo_model import build_byte_tokenizer
from mini_vllm.engine.errors import ConfigError, InvalidRequest
from mini_vllm.engine.outputs import TokenLogprob
from mini_vllm.transport.http import Headers, HttpError, HttpRequest, Routes
from mini_vllm.transport.openai_api import (
    FINISH_REASONS,
    STATUSES,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    default_max_tokens,
    failure_error,
    http_error,
    openai_routes,
    parse_body,
    parse_chat_request,
    parse_completion_request,
    parse_messages,
    parse_prompts,
)

pytestmark = pytest.mark.timeout(120)
MAX_BODY = 1 << 20


# ---- a fake responder ----------------------------------------------------------------------------


class FakeResponder:
    """Records one response; ``gate`` (if set) holds every ``write`` back, as a client that does not read."""

    def __init__(self, gate: trio.Event | None = None) -> None:
        self.gate = gate
        self.status: int | None = None
        self.content_type: str | None = None
        self.headers: Headers = ()
        self.body = b""
        self.writes: list[bytes] = []
        self.streaming = False
        self.ended = False
        self.began = trio.Event()  # set when the answer starts (whole or streamed)
        self.wrote = trio.Event()  # set at the first write

    @property
    def started(self) -> bool:
        return self.status is not None

    async def send(self, status: int, body: bytes, content_type: str, headers: Headers = ()) -> None:
        assert not self.started, "answered twice"
        self.status, self.body, self.content_type, self.headers = status, body, content_type, tuple(headers)
        self.began.set()

    async def start_stream(self, status: int, content_type: str, headers: Headers = ()) -> None:
        assert not self.started, "answered twice"
        self.status, self.content_type, self.headers, self.streaming = status, content_type, tuple(headers), True
        self.began.set()

    async def write(self, data: bytes) -> None:
        assert self.streaming and not self.ended
        if self.gate is not None:
            await self.gate.wait()
        self.writes.append(data)
        self.wrote.set()

    async def end_stream(self) -> None:
        assert self.streaming and not self.ended
        self.ended = True

    def json(self) -> Any:
        assert not self.streaming and self.content_type == "application/json"
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def events(self) -> list[Any]:
        """The SSE events, each ``data: {json}\\n\\n`` in one write; ``[DONE]`` as the string."""
        assert self.streaming and self.status == 200 and self.content_type.startswith("text/event-stream")
        events: list[Any] = []
        for w in self.writes:
            assert w.startswith(b"data: ") and w.endswith(b"\n\n") and w.count(b"\n\n") == 1, w
            data = w[len(b"data: "):-2].decode()
            events.append(data if data == "[DONE]" else json.loads(data))
        return events

    def chunks(self) -> list[dict[str, Any]]:
        """The events of a stream that ended well: JSON chunks, then [DONE], then the end."""
        events = self.events()
        assert events[-1] == "[DONE]" and self.ended
        assert all(isinstance(e, dict) and "error" not in e for e in events[:-1]), events
        return events[:-1]


async def call(
    routes: Routes, path: str, body: Any, *, method: str = "POST", client: str = "c1",
    responder: FakeResponder | None = None,
) -> FakeResponder:
    responder = responder or FakeResponder()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with trio.fail_after(30):
        await routes[method, path](HttpRequest(method, path, "", (), raw, client), responder)
    return responder


def error_of(r: FakeResponder, status: int, code: str) -> dict[str, Any]:
    assert r.status == status, (r.status, r.body)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


@contextlib.asynccontextmanager
async def served(
    engine: Any, config: ServiceConfig | None = None, admission: Any = None, retry_after: float = 1.0
) -> AsyncIterator[tuple[Service, Routes]]:
    async with open_service([engine], config) as service:
        yield service, openai_routes(service, admission=admission, retry_after=retry_after, max_body_bytes=MAX_BODY)


def completion(prompt: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "demo", "prompt": prompt, **greedy(), **fields}


def chat(content: Any = "Hi!", **fields: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": content}], **greedy(), **fields}


async def until(condition: Any) -> None:
    """Wait for the service to reach a state (the caller's fail_after bounds it)."""
    while not condition():  # noqa: ASYNC110 -- no event to wait on: the service's counters, read from outside
        await trio.sleep(0.005)


def generating(service: Service) -> int:
    """Requests the ingress has in flight, once each holds KV blocks (0 until then)."""
    stats = service.statistics()
    return stats.ingress.in_flight if stats.blocks.models[0].blocks.used_blocks else 0


def by_index(chunks: Sequence[dict[str, Any]], field: str = "text") -> dict[int, dict[str, Any]]:
    """Per choice index: the streamed text (or chat content), ids, finish reasons and chunk count."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            got = out.setdefault(c["index"], {"text": "", "token_ids": [], "finish": [], "chunks": 0, "first": c})
            got["text"] += c["delta"].get("content", "") if field == "content" else c["text"]
            got["token_ids"] += c.get("token_ids", [])
            got["chunks"] += 1
            if c["finish_reason"] is not None:
                got["finish"].append(c["finish_reason"])
    return out


# ---- parsing (pure) ------------------------------------------------------------------------------


def raises_400(code: str, param: str | None = None) -> Any:
    class Check:
        def __enter__(self) -> Check:
            self.cm = pytest.raises(HttpError)
            self.info = self.cm.__enter__()
            return self

        def __exit__(self, *exc: Any) -> bool:
            handled = self.cm.__exit__(*exc)
            error = self.info.value
            assert (error.status, error.code) == (400, code), (error.status, error.code, error.message)
            if param is not None:
                assert error.param == param and param in error.message, (error.param, error.message)
            return bool(handled)

    return Check()


def test_prompt_forms() -> None:
    assert parse_prompts("a") == ("a",)
    assert parse_prompts(["a", "b"]) == ("a", "b")
    assert parse_prompts([1, 2]) == ((1, 2),)
    assert parse_prompts([[1], [2, 3]]) == ((1,), (2, 3))
    for bad in ([], [[]], ["a", 1], 5, [True, 1], [[1], "a"], None, {"a": 1}, [[1.5]]):
        with raises_400("invalid_field", "prompt"):
            parse_prompts(bad)


def test_unknown_and_unsupported_fields_are_refused_by_name() -> None:
    with raises_400("unknown_field", "max_token"):
        parse_completion_request({"prompt": "x", "max_token": 3})
    with raises_400("unknown_field", "temprature"):
        parse_chat_request({"messages": [{"role": "user", "content": "x"}], "temprature": 0})
    with raises_400("invalid_request", "tools"):
        parse_chat_request({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})
    with raises_400("invalid_request", "response_format"):
        parse_chat_request({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})
    for field, value in (("suffix", "x"), ("best_of", 2), ("best_of", True), ("logit_bias", {"5": 1})):
        with raises_400("invalid_request", field):
            parse_completion_request({"prompt": "x", field: value})
    # the values that ask for nothing unsupported are fine, and so is `user` (ignored)
    parse_chat_request({
        "messages": [{"role": "user", "content": "x"}], "tools": [], "tool_choice": "none",
        "response_format": {"type": "text"}, "user": "u-1", "logit_bias": {}, "parallel_tool_calls": False,
    })
    parse_completion_request({"prompt": "x", "best_of": 1, "suffix": None, "user": "me"})
    with raises_400("missing_field", "prompt"):
        parse_completion_request({"max_tokens": 3})
    with raises_400("missing_field", "messages"):
        parse_chat_request({})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "six"), ("max_tokens", 0), ("temperature", -1), ("top_p", 0), ("n", 0), ("top_k", -2),
        ("stop", 5), ("stop", [""]), ("stop_token_ids", "12"), ("seed", 2**64), ("logprobs", 21),
        ("logprobs", True), ("ignore_eos", "no"), ("presence_penalty", 3), ("min_p", 2), ("repetition_penalty", 0),
        ("stream", "yes"), ("echo", 1), ("return_token_ids", "true"), ("model", 5), ("min_tokens", -1),
    ],
)
def test_a_bad_value_names_its_field(field: str, value: Any) -> None:
    with raises_400("invalid_field", field):
        parse_completion_request({"prompt": "x", field: value})


def test_chat_fields_by_their_openai_names() -> None:
    base = {"messages": [{"role": "user", "content": "x"}]}
    with raises_400("invalid_field", "max_completion_tokens"):
        parse_chat_request({**base, "max_completion_tokens": "x"})
    assert parse_chat_request({**base, "max_completion_tokens": 7}).params.max_tokens == 7
    assert parse_chat_request({**base, "max_tokens": 7, "max_completion_tokens": 7}).params.max_tokens == 7
    with raises_400("invalid_field", "max_completion_tokens"):
        parse_chat_request({**base, "max_tokens": 5, "max_completion_tokens": 7})
    with raises_400("invalid_field", "top_logprobs"):
        parse_chat_request({**base, "logprobs": True, "top_logprobs": 30})
    with raises_400("invalid_field", "top_logprobs"):
        parse_chat_request({**base, "top_logprobs": 3})
    with raises_400("invalid_field", "logprobs"):
        parse_chat_request({**base, "logprobs": 3})
    parsed = parse_chat_request({**base, "logprobs": True, "top_logprobs": 3})
    assert (parsed.logprobs, parsed.top_logprobs, parsed.params.logprobs) == (True, 3, 3)
    parsed = parse_chat_request({**base, "logprobs": True})
    assert (parsed.top_logprobs, parsed.params.logprobs) == (0, 0)
    assert parse_chat_request(base).params.logprobs is None
    # null is the default, as OpenAI's clients send it
    parsed = parse_chat_request({**base, "temperature": None, "stop": None, "n": None, "max_tokens": None})
    assert not parsed.max_tokens_given and parsed.params.temperature == 1.0 and parsed.params.n == 1


def test_stream_options() -> None:
    assert parse_completion_request({"prompt": "x"}).stream is None
    options = parse_completion_request({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    assert options.stream is not None and options.stream.include_usage and not options.stream.continuous_usage_stats
    with raises_400("invalid_field", "stream_options"):
        parse_completion_request({"prompt": "x", "stream_options": {"include_usage": True}})
    with raises_400("unknown_field", "stream_options"):
        parse_completion_request({"prompt": "x", "stream": True, "stream_options": {"usage": True}})
    with raises_400("invalid_field", "include_usage"):
        parse_completion_request({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}})
    with raises_400("invalid_request", "echo"):
        parse_completion_request({"prompt": "x", "echo": True, "logprobs": 1})


def test_messages_take_text_parts_and_refuse_what_no_model_here_can_do() -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert parse_messages([{"role": "user", "content": parts}]) == ({"role": "user", "content": "one\ntwo"},)
    assert parse_messages([{"role": "system", "content": "s"}, {"role": "user", "content": []}])[1]["content"] == ""
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with raises_400("invalid_request", "messages") as check:
        parse_messages([{"role": "user", "content": [image]}])
    assert "image" in check.info.value.message and "text only" in check.info.value.message
    with raises_400("invalid_request", "messages") as check:
        parse_messages([{"role": "tool", "content": "42", "tool_call_id": "t1"}])
    assert "tools" in check.info.value.message
    with raises_400("invalid_request", "messages"):
        parse_messages([{"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]}])
    with raises_400("unknown_field", "messages") as check:
        parse_messages([{"role": "user", "content": "x", "name": "bob"}])
    assert "'name'" in check.info.value.message
    for bad in ([], "hi", [{"role": "user"}], [{"role": "user", "content": None}], [{"role": "user", "content": [5]}],
                [{"role": "user", "content": [{"type": "text", "text": 5}]}], ["x"]):
        with pytest.raises(HttpError) as info:
            parse_messages(bad)
        assert info.value.status == 400 and "messages" in info.value.message


def test_bodies_that_are_no_json_object() -> None:
    assert parse_body(b'{"a": 1}', MAX_BODY) == {"a": 1}
    for body, code in ((b"{", "invalid_json"), (b"", "invalid_json"), (b'{"a": NaN}', "invalid_json"),
                       (b'{"a": 1e999}', None), (b"\xff\xfe{", "invalid_json"), (b"[1]", "invalid_frame"),
                       (b'"x"', "invalid_frame")):
        if code is None:  # 1e999 parses (as inf): the sampling check refuses it by name
            with raises_400("invalid_field", "temperature"):
                parse_completion_request({"prompt": "x", "temperature": parse_body(body, MAX_BODY)["a"]})
            continue
        with raises_400(code):
            parse_body(body, MAX_BODY)
    with pytest.raises(HttpError) as info:
        parse_body(b" " * 11, 10)
    assert (info.value.status, info.value.code) == (413, "request_too_large") and "10" in info.value.message


def test_default_max_tokens_is_the_room_left_within_the_request_limit() -> None:
    config = ServiceConfig(max_request_tokens=1000)
    assert default_max_tokens(1, 512, config) == 512  # the engine stops at max_model_len: the room left
    assert default_max_tokens(4, 512, config) == 250
    assert default_max_tokens(2000, 512, config) == 1  # then the ingress's limit refuses n itself


def test_every_service_error_has_its_status() -> None:
    cases: list[tuple[BaseException, int, str, bool]] = [
        (UnknownModel("unknown model 'x'"), 404, "unknown_model", False),
        (ModelRequired("name one"), 400, "missing_field", False),
        (Overloaded("full"), 503, "overloaded", True),
        (ShuttingDown("bye"), 503, "shutting_down", True),
        (CoreExited("gone"), 503, "engine_core_exited", False),
        (DuplicateRequest("twice"), 500, "duplicate_id", False),
        (InvalidRequest("the prompt has 9 tokens"), 400, "invalid_request", False),
        (ConfigError("top_p must be in (0, 1]"), 400, "invalid_field", False),
        (RuntimeError("a bug \ud800"), 500, "internal", False),
    ]
    for exc, status, code, retry in cases:
        error = http_error(exc, retry_after=1.5)
        assert (error.status, error.code) == (status, code), exc
        assert dict(error.headers).get("Retry-After") == ("2" if retry else None), exc
        assert error.type == ("invalid_request_error" if status < 500 else "server_error")
        error.message.encode()  # always encodable, whatever the exception held
    assert http_error(ConfigError("top_p must be in (0, 1], got 0"), 1).param == "top_p"
    assert http_error(InvalidRequest("n must be in [1, 64] (this server's limit), got 65"), 1).param == "n"
    failures = [
        (ErrorInfo("model_error", "boom"), 500, "model_error", False),
        (ErrorInfo("shutting_down", "stopping"), 503, "shutting_down", True),
        (ErrorInfo("engine_core_exited", "killed"), 503, "engine_core_exited", False),
        (ErrorInfo("something_new", "?"), 500, "model_error", False),
        (None, 500, "model_error", False),
    ]
    for info, status, code, retry in failures:
        error = failure_error(info, 3)
        assert (error.status, error.code, "Retry-After" in dict(error.headers)) == (status, code, retry)
        assert error.message.startswith("the generation failed")
    assert FINISH_REASONS == {"stop": "stop", "length": "length", "cancelled": "abort"}
    assert all(status >= 400 for status, _, _ in STATUSES.values())


def test_token_text_gives_each_tokens_exact_bytes() -> None:
    tokenizer = build_byte_tokenizer()
    names = TokenText(tokenizer)
    text = "Über café ñandú 日本語 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # one token per byte: most are pieces of a character
    assert b"".join(bytes(names.bytes(t)) for t in ids) == text.encode()
    assert any(names.text(t) == "\ufffd" for t in ids)  # a piece alone decodes to U+FFFD ...
    assert names.text(tokenizer.eos_token_id) == "</s>" and bytes(names.bytes(tokenizer.eos_token_id)) == b"</s>"
    dummy = TokenText(None)
    assert (dummy.text(7), bytes(dummy.bytes(7))) == ("token_id:7", b"token_id:7")


def test_logprobs_in_openai_shapes() -> None:
    names = TokenText(build_byte_tokenizer())
    a, b, c = (build_byte_tokenizer().encode(ch, add_special_tokens=False)[0] for ch in "abc")
    eos = build_byte_tokenizer().eos_token_id
    lps = [TokenLogprob(a, -0.5, ((b, -0.1), (a, -0.5))), TokenLogprob(eos, -math.inf, ((a, -0.2), (b, math.nan))),
           TokenLogprob(c, -1.0, ())]
    legacy, offset = completion_logprobs(lps, names, 3)
    assert legacy == {
        "tokens": ["a", "</s>", "c"],
        "token_logprobs": [-0.5, -9999.0, -1.0],
        "top_logprobs": [{"a": -0.5, "b": -0.1}, {"</s>": -9999.0, "a": -0.2, "b": -9999.0}, {"c": -1.0}],
        "text_offset": [3, 4, 8],  # each token's text starts where the previous one's ends
    }
    assert offset == 9
    assert list(legacy["top_logprobs"][0]) == ["a", "b"]  # the sampled token first, as vLLM
    content = chat_logprobs(lps, names, 1)["content"]
    assert content[0] == {
        "token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [{"token": "b", "logprob": -0.1, "bytes": [98]}]
    }
    assert content[1]["logprob"] == -9999.0 and len(content[1]["top_logprobs"]) == 1
    assert content[2]["top_logprobs"] == []
    json.dumps({"legacy": legacy, "chat": content}, allow_nan=False)  # no NaN or Infinity reaches the wire


# ---- live: answers ---------------------------------------------------------------------------------


async def test_completions_equal_the_engine(engine: LLMEngine, reference: Reference) -> None:
    async with served(engine) as (service, routes):
        for prompt in PROMPTS[:4]:
            want = reference(prompt, **greedy())
            r = await call(routes, "/v1/completions", completion(prompt, return_token_ids=True))
            body = r.json()
            assert r.status == 200 and body["object"] == "text_completion" and body["model"] == "demo"
            assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
            (choice,) = body["choices"]
            assert (choice["text"], tuple(choice["token_ids"]), choice["finish_reason"]) == (
                want.text, want.token_ids, "length"
            )
            prompt_ids = reference.tokenizer.encode(prompt)
            assert choice["prompt_token_ids"] == prompt_ids and choice["logprobs"] is None
            assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 12,
                                     "total_tokens": len(prompt_ids) + 12}
            # without return_token_ids the text goes to the service untokenized: the same answer
            plain = (await call(routes, "/v1/completions", completion(prompt))).json()["choices"][0]
            assert plain["text"] == want.text and "token_ids" not in plain
        ids = list(reference.tokenizer.encode(PROMPTS[1]))
        by_ids = (await call(routes, "/v1/completions", completion(ids, return_token_ids=True))).json()["choices"][0]
        assert tuple(by_ids["token_ids"]) == reference(PROMPTS[1], **greedy()).token_ids
        assert by_ids["prompt_token_ids"] == ids
        await wait_blocks_released(service)


async def test_several_prompts_and_n_are_prompt_major(engine: LLMEngine, reference: Reference) -> None:
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[5]]
    async with served(engine) as (service, routes):
        body = (await call(routes, "/v1/completions", completion(prompts, n=2, max_tokens=6))).json()
        assert [c["index"] for c in body["choices"]] == list(range(6))
        for c in body["choices"]:
            assert c["text"] == reference(prompts[c["index"] // 2], **greedy(6)).text
        assert body["usage"]["completion_tokens"] == 36
        assert body["usage"]["prompt_tokens"] == sum(len(reference.tokenizer.encode(p)) for p in prompts)
        token_prompts = [reference.tokenizer.encode(p) for p in prompts[:2]]
        r = await call(routes, "/v1/completions", completion(token_prompts, n=2, max_tokens=6, stream=True,
                                                             return_token_ids=True))
        got = by_index(r.chunks())
        assert sorted(got) == [0, 1, 2, 3]
        for index, g in got.items():
            want = reference(prompts[index // 2], **greedy(6))
            assert (g["text"], tuple(g["token_ids"]), g["finish"]) == (want.text, want.token_ids, ["length"])
            assert g["first"]["prompt_token_ids"] == token_prompts[index // 2]
        await wait_blocks_released(service)


async def test_streams_are_sse_with_one_finish_per_choice_and_usage_last(
    engine: LLMEngine, reference: Reference
) -> None:
    async with served(engine) as (service, routes):
        r = await call(routes, "/v1/completions", completion(
            PROMPTS[1], max_tokens=20, stream=True, stream_options={"include_usage": True}
        ))
        assert r.header("Cache-Control") == "no-cache"
        chunks = r.chunks()
        *parts, last = chunks
        assert last["choices"] == [] and last["usage"] == {
            "prompt_tokens": len(PROMPTS[1]), "completion_tokens": 20, "total_tokens": len(PROMPTS[1]) + 20
        }
        assert all("usage" not in c for c in parts)
        assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
        reasons = [c["choices"][0]["finish_reason"] for c in parts]
        assert reasons[-1] == "length" and reasons[:-1] == [None] * (len(parts) - 1)
        assert "".join(c["choices"][0]["text"] for c in parts) == reference(PROMPTS[1], **greedy(20)).text
        # continuous usage: every chunk says how far the request has come
        r = await call(routes, "/v1/completions", completion(
            PROMPTS[1], max_tokens=5, stream=True, stream_options={"continuous_usage_stats": True}
        ))
        counts = [c["usage"]["completion_tokens"] for c in r.chunks()]
        assert counts == sorted(counts) and counts[-1] == 5
        await wait_blocks_released(service)


async def test_chat_streams_say_the_role_first_and_equal_the_whole_answer(engine: LLMEngine) -> None:
    async with served(engine) as (service, routes):
        whole = await call(routes, "/v1/chat/completions", chat(n=2, max_tokens=8, return_token_ids=True))
        body = whole.json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        assert [c["message"]["role"] for c in body["choices"]] == ["assistant", "assistant"]
        tokenizer = service.prompt_encoder("demo")
        assert body["prompt_token_ids"] == tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
        assert body["usage"]["prompt_tokens"] == len(body["prompt_token_ids"])
        r = await call(routes, "/v1/chat/completions", chat(n=2, max_tokens=8, stream=True, return_token_ids=True))
        chunks = r.chunks()
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert chunks[0]["prompt_token_ids"] == body["prompt_token_ids"]
        assert all("prompt_token_ids" not in c for c in chunks[1:])
        got = by_index(chunks, "content")
        for index in (0, 1):
            seen = [c for chunk in chunks for c in chunk["choices"] if c["index"] == index]
            assert seen[0]["delta"]["role"] == "assistant" and all("role" not in c["delta"] for c in seen[1:])
            want = body["choices"][index]
            assert (got[index]["text"], got[index]["token_ids"]) == (want["message"]["content"], want["token_ids"])
            assert got[index]["finish"] == ["length"]
        # content given as text parts is the same prompt
        parts = [{"type": "text", "text": "Hi!"}]
        again = (await call(routes, "/v1/chat/completions", chat(parts, n=2, max_tokens=8))).json()
        assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in body["choices"]]
        await wait_blocks_released(service)


async def test_logprobs_whole_and_streamed(engine: LLMEngine, reference: Reference) -> None:
    async with served(engine) as (_, routes):
        want = reference(PROMPTS[0], **greedy(6))
        body = (await call(routes, "/v1/completions", completion(PROMPTS[0], max_tokens=6, logprobs=3))).json()
        lp = body["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
        assert "".join(lp["tokens"]) == body["choices"][0]["text"] == want.text or "\ufffd" in "".join(lp["tokens"])
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
        for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
            assert top[token] == value and 1 <= len(top) <= 4 and value <= 0
            assert value == max(top.values())  # greedy: the sampled token is the likeliest
        r = await call(routes, "/v1/completions", completion(PROMPTS[0], max_tokens=6, logprobs=3, stream=True))
        streamed = [ch["logprobs"] for c in r.chunks() for ch in c["choices"] if ch["logprobs"]]
        assert [v for s in streamed for v in s["token_logprobs"]] == lp["token_logprobs"]
        assert [v for s in streamed for v in s["text_offset"]] == lp["text_offset"]
        body = (await call(routes, "/v1/chat/completions", chat(max_tokens=5, logprobs=True, top_logprobs=2))).json()
        content = body["choices"][0]["logprobs"]["content"]
        assert len(content) == 5 and all(len(e["top_logprobs"]) == 2 for e in content)
        assert all(e["top_logprobs"][0]["logprob"] == e["logprob"] for e in content)  # greedy
        assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace") == body["choices"][0][
            "message"]["content"]
        plain = (await call(routes, "/v1/chat/completions", chat(max_tokens=5, logprobs=True))).json()
        assert all(e["top_logprobs"] == [] for e in plain["choices"][0]["logprobs"]["content"])


async def test_stop_strings_and_echo(engine: LLMEngine, reference: Reference) -> None:
    async with served(engine) as (service, routes):
        full = reference(PROMPTS[3], **greedy(30)).text
        stop = next(full[k:k + 2] for k in range(4, len(full)) if "\ufffd" not in full[k:k + 2])
        cut = full[: full.find(stop)]
        for stream in (False, True):
            r = await call(routes, "/v1/completions", completion(PROMPTS[3], max_tokens=30, stop=stop, stream=stream))
            if stream:
                got = by_index(r.chunks())[0]
                text, finish = got["text"], got["finish"][-1]
            else:
                text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
            assert (text, finish) == (cut, "stop")
        body = (await call(routes, "/v1/completions", completion(list(PROMPTS[:2]), max_tokens=4, echo=True))).json()
        for c, prompt in zip(body["choices"], PROMPTS[:2], strict=True):
            assert c["text"] == prompt + reference(prompt, **greedy(4)).text
        r = await call(routes, "/v1/completions", completion(reference.tokenizer.encode(PROMPTS[4]), max_tokens=4,
                                                             echo=True, stream=True))
        assert by_index(r.chunks())[0]["text"] == PROMPTS[4] + reference(PROMPTS[4], **greedy(4)).text
        await wait_blocks_released(service)


async def test_models_tokenize_and_detokenize(engine: LLMEngine, reference: Reference) -> None:
    async with served(engine) as (service, routes):
        r = await call(routes, "/v1/models", b"", method="GET")
        (model,) = r.json()["data"]
        assert r.json()["object"] == "list"
        assert model["id"] == "demo" and model["object"] == "model" and model["owned_by"] == "mini-vllm"
        assert model["max_model_len"] == 96 * 16 and isinstance(model["created"], int)
        text = PROMPTS[4]
        body = (await call(routes, "/tokenize", {"prompt": text, "return_token_strs": True})).json()
        ids = reference.tokenizer.encode(text)
        assert body == {"count": len(ids), "max_model_len": 1536, "tokens": ids,
                        "token_strs": reference.tokenizer.convert_ids_to_tokens(ids)}
        plain = (await call(routes, "/tokenize", {"model": "demo", "prompt": text, "add_special_tokens": False})).json()
        assert plain["tokens"] == reference.tokenizer.encode(text, add_special_tokens=False)
        messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        templated = (await call(routes, "/tokenize", {"messages": messages})).json()
        assert templated["tokens"] == service.prompt_encoder("demo").apply_chat_template(
            [{"role": "user", "content": "Hi"}]
        )
        assert (await call(routes, "/detokenize", {"tokens": ids})).json() == {"prompt": text}
        error_of(await call(routes, "/detokenize", {"tokens": [5, 259]}), 400, "invalid_request")
        error_of(await call(routes, "/detokenize", {"tokens": ["a"]}), 400, "invalid_field")
        error_of(await call(routes, "/detokenize", {"tokens": [1], "prompt": "x"}), 400, "unknown_field")
        error_of(await call(routes, "/tokenize", {"prompt": "x", "messages": messages}), 400, "invalid_field")
        error_of(await call(routes, "/tokenize", {}), 400, "missing_field")
        error_of(await call(routes, "/tokenize", {"prompt": "\ud800"}), 400, "invalid_request")
        error_of(await call(routes, "/tokenize", {"prompt": "x", "add_special_tokens": False, "model": "gpt"}), 404,
                 "unknown_model")
        error_of(await call(routes, "/tokenize", {"messages": messages, "add_special_tokens": True}), 400,
                 "invalid_field")


# ---- live: errors ----------------------------------------------------------------------------------


async def test_refusals_are_http_statuses_before_anything_streams(engine: LLMEngine) -> None:
    async with served(engine) as (service, routes):
        for stream in (False, True):
            fields = {"stream": stream}
            e = error_of(await call(routes, "/v1/completions", completion("x", model="gpt-4", **fields)), 404,
                         "unknown_model")
            assert "gpt-4" in e["message"] and "demo" in e["message"] and e["type"] == "invalid_request_error"
            e = error_of(await call(routes, "/v1/completions", completion("x" * 2000, **fields)), 400,
                         "invalid_request")
            assert "max_model_len" in e["message"]
            e = error_of(await call(routes, "/v1/completions", completion("x", n=65, **fields)), 400, "invalid_request")
            assert e["param"] == "n" and "64" in e["message"]
            error_of(await call(routes, "/v1/completions", completion([[5, 300]], **fields)), 400, "invalid_request")
            e = error_of(await call(routes, "/v1/chat/completions", chat("x", model="nope", **fields)), 404,
                         "unknown_model")
            e = error_of(await call(routes, "/v1/chat/completions", chat("\ud800", **fields)), 400, "invalid_request")
            assert "surrogate" in e["message"]
            many = list("abcdefghijklmnopq")  # 17 stop strings
            e = error_of(await call(routes, "/v1/completions", completion("x", stop=many, **fields)), 400,
                         "invalid_request")
            assert e["param"] == "stop" and "16" in e["message"]
        error_of(await call(routes, "/v1/completions", b"{nope"), 400, "invalid_json")
        error_of(await call(routes, "/v1/chat/completions", b"[]"), 400, "invalid_frame")
        error_of(await call(routes, "/v1/completions", b"x" * (MAX_BODY + 1)), 413, "request_too_large")
        # several prompts: one bad prompt refuses the whole request, and nothing is left running
        error_of(await call(routes, "/v1/completions", completion(["ok", "x" * 2000], max_tokens=500)), 400,
                 "invalid_request")
        error_of(await call(routes, "/v1/completions", completion([PROMPTS[0]] * 1025)), 400, "invalid_request")
        await wait_blocks_released(service)
        assert service.statistics().ingress.in_flight == 0


async def test_a_full_queue_is_503_with_retry_after(engine: LLMEngine) -> None:
    gate = trio.Event()
    async with served(engine, ServiceConfig(max_pending_per_model=1), retry_after=2.5) as (service, routes):
        async with trio.open_nursery() as nursery:
            holder = FakeResponder(gate)  # a stream nobody reads keeps its request in the queue
            body = completion("x", max_tokens=50, stream=True)
            nursery.start_soon(functools.partial(call, routes, "/v1/completions", body, responder=holder))
            await holder.began.wait()
            r = await call(routes, "/v1/completions", completion("y"))
            e = error_of(r, 503, "overloaded")
            assert r.header("Retry-After") == "3" and e["type"] == "server_error"
            gate.set()
        assert holder.chunks()
        await wait_blocks_released(service)


@attrs.define
class CountingAdmission:
    """The server's fair share, as a fake: a client may hold ``share`` requests per model."""

    share: int
    held: dict[tuple[str, str], int] = attrs.field(factory=dict)
    asked: int = 0

    def refusal(self, client: str, model: str) -> str | None:
        self.asked += 1
        if self.held.get((client, model), 0) >= self.share:
            return f"client {client} holds its share of {model}"
        return None

    def take(self, client: str, model: str) -> None:
        self.held[client, model] = self.held.get((client, model), 0) + 1

    def give_back(self, client: str, model: str) -> None:
        self.held[client, model] -= 1


async def test_the_fair_share_is_429_and_places_come_back(engine: LLMEngine) -> None:
    admission = CountingAdmission(share=2)
    async with served(engine, admission=admission) as (service, routes):
        r = await call(routes, "/v1/completions", completion([PROMPTS[0], PROMPTS[1]], max_tokens=3))
        assert r.status == 200 and admission.held == {("c1", "demo"): 0}
        r = await call(routes, "/v1/completions", completion([PROMPTS[0]] * 3, max_tokens=3))
        e = error_of(r, 429, "overloaded")
        assert e["type"] == "rate_limit_error" and r.header("Retry-After") == "1" and "share" in e["message"]
        assert admission.held == {("c1", "demo"): 0}  # the two places it took are given back
        # another client is not held back by c1's requests in flight
        gate = trio.Event()
        async with trio.open_nursery() as nursery:
            holder = FakeResponder(gate)
            body = chat(max_tokens=40, stream=True, n=2)
            nursery.start_soon(functools.partial(call, routes, "/v1/chat/completions", body, responder=holder))
            await holder.began.wait()
            assert admission.held[("c1", "demo")] == 1
            assert (await call(routes, "/v1/completions", completion("x", max_tokens=2), client="c2")).status == 200
            error_of(await call(routes, "/v1/completions", completion(["a", "b"], max_tokens=2)), 429, "overloaded")
            gate.set()
        assert admission.held == {("c1", "demo"): 0, ("c2", "demo"): 0}
        error_of(await call(routes, "/v1/completions", completion("x", model="nope")), 404, "unknown_model")
        await wait_blocks_released(service)


async def test_shutdown_refuses_new_requests_and_ends_running_ones_in_band(engine: LLMEngine) -> None:
    async with served(engine) as (service, routes):
        streamed = FakeResponder()
        whole = FakeResponder()
        async with trio.open_nursery() as nursery:
            body = completion("x", max_tokens=1000, stream=True)
            nursery.start_soon(functools.partial(call, routes, "/v1/completions", body, responder=streamed))
            nursery.start_soon(functools.partial(call, routes, "/v1/chat/completions", chat(max_tokens=1000),
                                                 responder=whole))
            with trio.fail_after(30):
                await streamed.wrote.wait()
            service.shutdown("the server is shutting down")
        events = streamed.events()
        assert events[-1] == "[DONE]" and streamed.ended
        error = events[-2]["error"]
        assert error["code"] == "shutting_down" and "shutting down" in error["message"]
        assert all("error" not in e for e in events[:-2])
        e = error_of(whole, 503, "shutting_down")
        assert whole.header("Retry-After") == "1" and e["message"].startswith("the generation failed")
        r = await call(routes, "/v1/completions", completion("x"))
        error_of(r, 503, "shutting_down")
        assert r.header("Retry-After") == "1"


class FailingEngine:
    """A real engine whose every step fails (the model broke)."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def launch(self, batch: Any) -> Any:
        raise RuntimeError("the device fell off the bus")


async def test_a_failed_generation_never_looks_like_a_success(demo_model_dir: Any) -> None:
    async with served(FailingEngine(build_engine(demo_model_dir))) as (service, routes):
        for path, body in (("/v1/completions", completion("x")), ("/v1/chat/completions", chat())):
            for stream in (False, True):
                r = await call(routes, path, {**body, "stream": stream})
                e = error_of(r, 500, "model_error")  # it failed before anything streamed: a status
                assert e["type"] == "server_error" and "failed" in e["message"]
        await wait_blocks_released(service)


class BrokenService:
    """A service whose routing has a bug."""

    def resolve_model(self, model: str | None) -> str:
        raise KeyError("a bug")


async def test_a_bug_is_a_500_and_never_escapes() -> None:
    service: Any = BrokenService()
    routes = openai_routes(service, admission=None, retry_after=1, max_body_bytes=MAX_BODY)
    e = error_of(await call(routes, "/v1/completions", {"prompt": "x"}), 500, "internal")
    assert e["type"] == "server_error" and "KeyError" in e["message"]


# ---- live: closing ---------------------------------------------------------------------------------


async def test_a_client_that_goes_away_aborts_every_prompt_and_sample(engine: LLMEngine) -> None:
    async with served(engine) as (service, routes):
        for stream in (True, False):
            body = completion([PROMPTS[0], PROMPTS[1]], n=2, max_tokens=1000, stream=stream)
            responder = FakeResponder()
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(functools.partial(call, routes, "/v1/completions", body, responder=responder))
                    with trio.fail_after(30):  # both prompts are generating
                        if stream:
                            await responder.wrote.wait()
                        await until(lambda: generating(service) == 2)
                    scope.cancel()  # what the front door does when the connection closes
            assert service.statistics().ingress.in_flight == 0
            with trio.fail_after(30):
                await wait_blocks_released(service)
        assert service.statistics().ingress.cancelled == 4


async def test_a_slow_reader_gets_merged_chunks(engine: LLMEngine, reference: Reference) -> None:
    gate = trio.Event()
    async with served(engine) as (service, routes):
        responder = FakeResponder(gate)
        async with trio.open_nursery() as nursery:
            body = completion(PROMPTS[2], max_tokens=40, stream=True, return_token_ids=True)
            nursery.start_soon(functools.partial(call, routes, "/v1/completions", body, responder=responder))
            await responder.began.wait()
            with trio.fail_after(30):
                await service.wait_idle()  # the engine made all 40 tokens while the first write waited
            gate.set()
        chunks = responder.chunks()
        assert len(chunks) <= 3
        got = by_index(chunks)[0]
        assert tuple(got["token_ids"]) == reference(PROMPTS[2], **greedy(40)).token_ids


async def test_a_prompt_waiting_for_the_others_piles_nothing_up(demo_model_dir: Any, reference: Reference) -> None:
    """One sequence at a time: the second prompt waits in the queue while the first runs to its end.
    The answer begins only when both are running; meanwhile the first's tokens merge in its stream."""
    async with served(build_engine(demo_model_dir, max_num_seqs=1)) as (service, routes):
        body = completion([PROMPTS[0], PROMPTS[1]], max_tokens=30, stream=True, return_token_ids=True)
        got = by_index((await call(routes, "/v1/completions", body)).chunks())
        # the prompt that ran first: its first delta, then everything else merged into one chunk
        assert min(g["chunks"] for g in got.values()) <= 2
        for index, prompt in enumerate(PROMPTS[:2]):
            assert tuple(got[index]["token_ids"]) == reference(prompt, **greedy(30)).token_ids
        await wait_blocks_released(service)


async def test_an_abort_from_elsewhere_ends_the_choice_with_vllms_abort(engine: LLMEngine) -> None:
    """Aborted by someone else than its client (an operator through ``service.abort``): the
    choice ends with vLLM's finish reason ``abort``, never ``stop`` or ``length``."""
    async with served(engine) as (service, routes):
        responder = FakeResponder()
        async with trio.open_nursery() as nursery:
            body = completion(PROMPTS[0], max_tokens=1000, stream=True)
            nursery.start_soon(functools.partial(call, routes, "/v1/completions", body, responder=responder))
            with trio.fail_after(30):
                await responder.wrote.wait()
            first = json.loads(responder.writes[0].removeprefix(b"data: "))
            assert service.abort(f"{first['id']}-0")  # the service's request id: the answer's id, prompt 0
        got = by_index(responder.chunks())[0]
        assert got["finish"] == ["abort"]
        await wait_blocks_released(service)
