"""The official ``openai`` Python client against a live server on 127.0.0.1 (port 0): the sync
client (from a worker thread) and the async one (under trio, through anyio), streaming and not,
completions and chat. Greedy text and token ids equal the WebSocket path's for the same prompt;
every bad input gets its status and an OpenAI-shaped error; a client that leaves mid-stream frees
its KV blocks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import httpx2
import openai
import pytest
import trio
from conftest_serving import PROMPTS, greedy, wait_blocks_released

from mini_vllm.actors import Service, ServiceConfig, open_service
from mini_vllm.actors.task_group import open_task_group
from mini_vllm.engine import LLMEngine
from mini_vllm.transport.client import Client, connect
from mini_vllm.transport.server import Server, ServerLimits

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")
CHAT: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
NO_EOS = {"ignore_eos": True, "return_token_ids": True}  # vLLM's fields, through the client's extra_body


@contextlib.asynccontextmanager
async def openai_server(
    engine: LLMEngine, limits: ServerLimits | None = None, config: ServiceConfig | None = None,
    api_keys: Sequence[str] = (),
) -> AsyncIterator[tuple[Service, Server]]:
    """A service and its server on 127.0.0.1, a free port, with the OpenAI routes mounted."""
    async with open_service([engine], config) as service, open_task_group() as nursery:
        server = Server(service, limits, api_keys=api_keys)  # the OpenAI routes are the server's own
        await nursery.start(server.run, "127.0.0.1", 0)
        yield service, server


def sync_client(server: Server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=api_key, max_retries=0, timeout=30)


def async_client(server: Server, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key=api_key, max_retries=0, timeout=30)


async def in_thread(work: Callable[[], T]) -> T:
    with trio.fail_after(60):
        return await trio.to_thread.run_sync(work)


async def websocket_samples(ws: Client, prompt: Any, **sampling: Any) -> dict[int, tuple[str, tuple[int, ...], Any]]:
    """Per sample index over the WebSocket path: (text, token ids, the logprobs)."""
    out: dict[int, tuple[str, tuple[int, ...], Any]] = {}
    call = ws.chat if isinstance(prompt, list) and isinstance(prompt[0], dict) else ws.generate
    async for d in call(prompt, **sampling):
        text, ids, lps = out.get(d.index, ("", (), ()))
        out[d.index] = (text + d.text, ids + d.token_ids, lps + (d.logprobs or ()))
    return out


def extra(choice: Any, name: str) -> Any:
    """A vLLM extension field of a parsed choice (the client keeps unknown fields)."""
    return (choice.model_extra or {})[name]


async def test_sync_client_completions_equal_the_websocket_path(engine: LLMEngine) -> None:
    async with openai_server(engine) as (service, server), connect(server.url) as ws:
        client = sync_client(server)
        for prompt in PROMPTS[:4]:
            want = await ws.complete(prompt, **greedy())

            def whole(prompt: str = prompt) -> Any:
                return client.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0,
                                                 extra_body=NO_EOS)

            def streamed(prompt: str = prompt) -> list[Any]:
                return list(client.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0,
                                                      stream=True, extra_body=NO_EOS))

            body = await in_thread(whole)
            (choice,) = body.choices
            assert (choice.text, tuple(extra(choice, "token_ids")), choice.finish_reason) == (
                want.text, want.token_ids, "length"
            )
            assert body.usage is not None and body.usage.completion_tokens == 12
            assert body.usage.prompt_tokens == want.usage.prompt_tokens
            chunks = await in_thread(streamed)
            assert "".join(c.choices[0].text for c in chunks) == want.text
            assert tuple(t for c in chunks for t in extra(c.choices[0], "token_ids")) == want.token_ids
            assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
        models = await in_thread(lambda: client.models.list())
        assert [(m.id, m.object, m.owned_by) for m in models.data] == [("demo", "model", "mini-vllm")]
        assert models.data[0].model_extra == {"root": "demo", "parent": None, "max_model_len": 1536}
        await wait_blocks_released(service)


async def test_async_client_chat_equals_the_websocket_path(engine: LLMEngine) -> None:
    async with openai_server(engine) as (service, server), connect(server.url) as ws:
        client = async_client(server)
        want = (await websocket_samples(ws, CHAT, **greedy(10)))[0]
        with trio.fail_after(60):
            body = await client.chat.completions.create(
                model="demo", messages=CHAT, max_completion_tokens=10, temperature=0, extra_body=NO_EOS
            )
            (choice,) = body.choices
            assert choice.message.role == "assistant" and choice.finish_reason == "length"
            assert (choice.message.content, tuple(extra(choice, "token_ids"))) == want[:2]
            assert body.usage is not None and body.usage.prompt_tokens == len(body.model_extra["prompt_token_ids"])
            stream = await client.chat.completions.create(
                model="demo", messages=CHAT, max_tokens=10, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body=NO_EOS,
            )
            chunks = [c async for c in stream]
        *parts, last = chunks
        assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 10
        assert parts[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in parts) == want[0]
        assert tuple(t for c in parts for t in extra(c.choices[0], "token_ids")) == want[1]
        assert parts[-1].choices[0].finish_reason == "length"
        await wait_blocks_released(service)


async def test_n_samples_logprobs_and_a_stop_string(engine: LLMEngine) -> None:
    async with openai_server(engine) as (service, server), connect(server.url) as ws:
        client = async_client(server)
        seeded = {"temperature": 0.8, "seed": 11, "n": 3, "max_tokens": 8}
        want = await websocket_samples(ws, PROMPTS[1], ignore_eos=True, **seeded)
        with trio.fail_after(60):
            body = await client.completions.create(model="demo", prompt=PROMPTS[1], extra_body=NO_EOS, **seeded)
            assert sorted(c.index for c in body.choices) == [0, 1, 2]
            for c in body.choices:  # the same seed gives the same samples whichever door it came by
                assert (c.text, tuple(extra(c, "token_ids"))) == want[c.index][:2]
            stream = await client.completions.create(model="demo", prompt=PROMPTS[1], stream=True, extra_body=NO_EOS,
                                                     **seeded)
            streamed: dict[int, list[int]] = {}
            async for chunk in stream:
                for c in chunk.choices:
                    streamed.setdefault(c.index, []).extend(extra(c, "token_ids"))
            assert {i: tuple(ids) for i, ids in streamed.items()} == {i: w[1] for i, w in want.items()}

            # logprobs: the values the WebSocket path gives, in OpenAI's shapes
            lp_want = (await websocket_samples(ws, PROMPTS[0], logprobs=2, **greedy(6)))[0][2]
            body = await client.completions.create(model="demo", prompt=PROMPTS[0], logprobs=2, max_tokens=6,
                                                   temperature=0, extra_body={"ignore_eos": True})
            lp = body.choices[0].logprobs
            assert lp is not None and lp.token_logprobs == [x.logprob for x in lp_want]
            assert lp.tokens is not None and len(lp.tokens) == 6 and lp.text_offset is not None
            chat = await client.chat.completions.create(
                model="demo", messages=CHAT, logprobs=True, top_logprobs=2, max_tokens=6, temperature=0,
                extra_body={"ignore_eos": True},
            )
            content = chat.choices[0].logprobs.content
            assert content is not None and len(content) == 6
            assert all(len(t.top_logprobs) == 2 and t.bytes is not None for t in content)

            # a stop string: the text ends before it, and the reason says so
            full = (await ws.complete(PROMPTS[3], **greedy(30))).text
            stop = next(full[k:k + 2] for k in range(4, len(full)) if "\ufffd" not in full[k:k + 2])
            body = await client.completions.create(model="demo", prompt=PROMPTS[3], max_tokens=30, temperature=0,
                                                   stop=[stop], extra_body={"ignore_eos": True})
            assert (body.choices[0].text, body.choices[0].finish_reason) == (full[: full.find(stop)], "stop")
        await wait_blocks_released(service)


def status_error(work: Callable[[], Any], status: int, code: str) -> dict[str, Any]:
    """Run a client call that must fail with ``status``; its OpenAI-shaped error body."""
    with pytest.raises(openai.APIStatusError) as info:
        work()
    error = info.value
    assert error.status_code == status, (error.status_code, error.body)
    assert isinstance(error.body, dict) and set(error.body) == {"message", "type", "param", "code"}, error.body
    assert error.code == code, error.body
    return error.body


async def test_every_bad_input_gets_its_status_and_an_openai_error(engine: LLMEngine) -> None:
    limits = ServerLimits(max_body_bytes=8192)
    async with openai_server(engine, limits) as (service, server):
        client = sync_client(server)

        def bad_inputs() -> None:
            create = client.completions.create
            e = status_error(lambda: create(model="gpt-4", prompt="x"), 404, "unknown_model")
            assert "gpt-4" in e["message"]
            status_error(lambda: create(model="gpt-4", prompt="x", stream=True), 404, "unknown_model")
            e = status_error(lambda: create(model="demo", prompt="x", extra_body={"max_token": 5}), 400,
                             "unknown_field")
            assert e["param"] == "max_token" and e["type"] == "invalid_request_error"
            e = status_error(lambda: create(model="demo", prompt="x", temperature=-1), 400, "invalid_field")
            assert e["param"] == "temperature"
            e = status_error(lambda: create(model="demo", prompt="x" * 2000, stream=True), 400, "invalid_request")
            assert "max_model_len" in e["message"]
            image: list[Any] = [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]
            status_error(lambda: client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": image}]), 400, "invalid_request")
            status_error(lambda: client.chat.completions.create(
                model="demo", messages=CHAT, tools=[{"type": "function", "function": {"name": "f"}}]),
                400, "invalid_request")
            e = status_error(lambda: create(model="demo", prompt="y" * 9000), 413, "request_too_large")
            assert "8192" in e["message"]
            with httpx2.Client(base_url=server.http_url, timeout=30) as http:
                json_type = {"Content-Type": "application/json"}
                r = http.post("/v1/completions", content=b'{"prompt": "x",', headers=json_type)
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
                r = http.get("/v1/completions")
                assert r.status_code == 405 and "POST" in r.headers["Allow"]
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
                r = http.post("/v1/embeddings", json={"input": "x"})
                assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
                r = http.post("/tokenize", json={"prompt": "Hello"})
                assert r.status_code == 200 and r.json()["tokens"] == [42, 71, 78, 78, 81]
                assert http.post("/detokenize", json={"tokens": [42, 71]}).json() == {"prompt": "He"}

        await in_thread(bad_inputs)
        await wait_blocks_released(service)


async def test_the_api_key_guards_the_openai_routes(engine: LLMEngine) -> None:
    async with openai_server(engine, api_keys=("sekrit",)) as (_, server):

        def calls() -> None:
            status_error(lambda: sync_client(server, "wrong").completions.create(model="demo", prompt="x"), 401,
                         "invalid_api_key")
            body = sync_client(server, "sekrit").completions.create(model="demo", prompt="x", max_tokens=2)
            assert body.choices[0].finish_reason in ("length", "stop")

        await in_thread(calls)


async def test_a_client_that_leaves_mid_stream_frees_its_blocks(engine: LLMEngine) -> None:
    async with openai_server(engine) as (service, server):
        client = sync_client(server)

        def read_a_little() -> int:
            stream = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=1000, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True, "n": 2})
            seen = 0
            for _ in stream:
                seen += 1
                if seen == 3:
                    break
            stream.close()  # the connection closes: the server cancels the route, the requests abort
            return seen

        assert await in_thread(read_a_little) == 3
        aclient = async_client(server)
        with trio.fail_after(60):
            stream = await aclient.chat.completions.create(
                model="demo", messages=CHAT, max_tokens=1000, stream=True, extra_body={"ignore_eos": True}
            )
            async for _ in stream:
                break
            await stream.close()
            while service.statistics().ingress.in_flight:  # noqa: ASYNC110 -- the service's counters, from outside
                await trio.sleep(0.005)
            await wait_blocks_released(service)
        stats = service.statistics().ingress
        assert stats.cancelled == 2 and stats.in_flight == 0


async def test_the_bodies_are_what_vllm_clients_parse(engine: LLMEngine) -> None:
    """Field by field, beyond what the client checks: ids, objects, created, usage's total."""
    async with openai_server(engine) as (_, server):
        async with httpx2.AsyncClient(base_url=server.http_url, timeout=30) as http:
            with trio.fail_after(60):
                r = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, **NO_EOS})
                body = r.json()
                assert r.headers["content-type"].startswith("application/json")
                assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
                assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
                r = await http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "stream": True})
                assert r.headers["content-type"].startswith("text/event-stream")
                events = [e for e in r.text.split("\n\n") if e]
                assert events[-1] == "data: [DONE]"
                chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
                assert all(c["id"] == chunks[0]["id"] and c["object"] == "chat.completion.chunk" for c in chunks)
                assert chunks[0]["id"].startswith("chatcmpl-")


async def test_metrics_scraped_over_http_move_with_the_openai_requests(engine: LLMEngine) -> None:
    # What a Prometheus scraper sees: the real /metrics on the server's port, parsed by
    # prometheus_client's own parser, before and after three requests through the openai client.
    from prometheus_client.parser import text_string_to_metric_families
    from test_front_door import http

    def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
        }

    length = ("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "demo")))
    generated = ("vllm:generation_tokens_total", (("model_name", "demo"),))
    ttft_count = ("vllm:time_to_first_token_seconds_count", (("model_name", "demo"),))
    async with openai_server(engine) as (_, server), http(server) as scraper:
        before = await scraper.request("GET", "/metrics")
        assert before.status == 200 and before.headers["content-type"].startswith("text/plain")
        start = samples(before.body.decode())
        client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True, False):
            answer = await client.completions.create(
                model="demo", prompt="Hello", max_tokens=5, temperature=0, stream=stream, extra_body=NO_EOS
            )
            if stream:
                async for _ in answer:  # type: ignore[union-attr]
                    pass
        await client.close()
        after = samples((await scraper.request("GET", "/metrics")).body.decode())
    assert after[length] - start.get(length, 0.0) == 3
    assert after[generated] - start.get(generated, 0.0) == 15
    assert after[ttft_count] - start.get(ttft_count, 0.0) == 3
