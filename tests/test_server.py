"""The WebSocket server over real sockets on 127.0.0.1 (port 0)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest_serving import (
    PROMPTS,
    Reference,
    build_engine,
    greedy,
    raw_client,
    running_server,
    text_and_ids,
    wait_blocks_released,
)
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from mini_vllm.engine import LLMEngine
from mini_vllm.transport.server import ServerLimits

pytestmark = pytest.mark.timeout(120)


def gen(rid: str, prompt: str, **fields: Any) -> dict[str, Any]:
    return {"type": "generate", "id": rid, "prompt": prompt, **fields}


async def test_streamed_text_and_ids_equal_the_offline_engine(engine: LLMEngine, reference: Reference) -> None:
    async with running_server([engine]) as (service, server), raw_client(server.url) as client:
        for i, prompt in enumerate(PROMPTS):
            frames = await client.request(gen(f"r{i}", prompt, **greedy()))
            want = reference(prompt, **greedy())
            assert text_and_ids(frames) == (want.text, want.token_ids, "length")
            done = frames[-1]
            assert done["usage"] == {"prompt_tokens": len(reference.tokenizer.encode(prompt)), "completion_tokens": 12}
        await wait_blocks_released(service)


async def test_32_concurrent_requests_over_several_connections(engine: LLMEngine, reference: Reference) -> None:
    results: dict[str, tuple[str, tuple[int, ...], str | None]] = {}
    async with running_server([engine]) as (service, server):

        async def connection(c: int) -> None:
            async with raw_client(server.url) as client:
                ids = [f"c{c}-{k}" for k in range(8)]
                for k, rid in enumerate(ids):  # all eight in flight at once on this connection
                    await client.send(gen(rid, PROMPTS[(c + k) % len(PROMPTS)], **greedy(6 + k)))
                frames: dict[str, list[dict[str, Any]]] = {rid: [] for rid in ids}
                done = 0
                while done < len(ids):
                    f = await client.receive()
                    frames[f["id"]].append(f)
                    done += f["type"] in ("done", "error")
                for rid, fs in frames.items():
                    results[rid] = text_and_ids(fs)

        async with trio.open_nursery() as nursery:
            for c in range(4):
                nursery.start_soon(connection, c)
        assert len(results) == 32
        for c in range(4):
            for k in range(8):
                want = reference(PROMPTS[(c + k) % len(PROMPTS)], **greedy(6 + k))
                assert results[f"c{c}-{k}"] == (want.text, want.token_ids, "length")
        await wait_blocks_released(service)
        assert server.statistics().connections_total == 4


async def test_cancel_mid_stream_returns_every_block(engine: LLMEngine) -> None:
    async with running_server([engine]) as (service, server), raw_client(server.url) as client:
        await client.send(gen("long", "Hello", **greedy(900)))
        first = await client.receive()
        assert first["type"] == "token"
        assert service.statistics().blocks.used_blocks > 0
        await client.send({"type": "cancel", "id": "long"})
        frames = await client.until(lambda f: f["type"] == "done")
        assert frames[-1]["finish_reason"] == "cancelled"
        assert 0 < frames[-1]["usage"]["completion_tokens"] < 900
        await wait_blocks_released(service)
        # The id is free again, and the connection still serves.
        again = await client.request(gen("long", "Hello", **greedy(3)))
        assert again[-1]["finish_reason"] == "length"


async def test_disconnect_mid_stream_returns_every_block(engine: LLMEngine) -> None:
    async with running_server([engine]) as (service, server):
        async with raw_client(server.url) as client:
            for i in range(3):
                await client.send(gen(f"d{i}", PROMPTS[i], **greedy(900)))
            await client.until(lambda f: f["type"] == "token")
            assert service.statistics().blocks.used_blocks > 0
        await wait_blocks_released(service)
        assert service.statistics().ingress.cancelled == 3
        # And an abrupt TCP close (no close handshake) too.
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/")))
        events: list[Any] = []
        while not any(isinstance(e, AcceptConnection) for e in events):
            ws.receive_data(await stream.receive_some())
            events.extend(ws.events())
        await stream.send_all(ws.send(TextMessage(json.dumps(gen("x", "Hello", **greedy(900))))))
        while not any(isinstance(e, TextMessage) for e in events):  # a token frame: it is running
            ws.receive_data(await stream.receive_some())
            events.extend(ws.events())
        await stream.aclose()
        await wait_blocks_released(service)


async def test_two_models_each_request_answered_by_its_model(demo_model_dir: Path, tiny_model: Any) -> None:
    other_dir = tiny_model("Qwen2ForCausalLM", seed=3)
    demo = build_engine(demo_model_dir, name="demo")
    other = build_engine(other_dir, name="qwen")
    from mini_vllm.engine import LLM, SamplingParams

    want = {
        "demo": LLM(str(demo_model_dir), num_kv_blocks=128, device="cpu").generate("Hi", SamplingParams(**greedy()))[0],
        "qwen": LLM(str(other_dir), num_kv_blocks=128, device="cpu").generate("Hi", SamplingParams(**greedy()))[0],
    }
    assert want["demo"].outputs[0].token_ids != want["qwen"].outputs[0].token_ids
    async with running_server([demo, other]) as (service, server), raw_client(server.url) as client:
        await client.send({"type": "models", "id": "m"})
        models = await client.receive()
        assert models["id"] == "m" and [m["name"] for m in models["models"]] == ["demo", "qwen"]
        results = {}
        for name in ("qwen", "demo", "qwen"):
            frames = await client.request(gen(f"{name}-{len(results)}", "Hi", model=name, **greedy()))
            results[name] = text_and_ids(frames)
        for name, r in results.items():
            assert r == (want[name].outputs[0].text, tuple(want[name].outputs[0].token_ids), "length")
        stats = service.statistics()
        assert stats.scheduler("qwen").engine.generation_tokens == 24
        assert stats.scheduler("demo").engine.generation_tokens == 12
        no_model = await client.request(gen("nm", "Hi"))
        assert no_model[-1]["code"] == "missing_field" and "several models" in no_model[-1]["message"]


BAD_FRAMES: list[tuple[Any, str, str]] = [
    ("{not json", "invalid_json", "JSON"),
    (b"\x01\x02", "binary_frame", "binary"),
    ("[1]", "invalid_frame", "object"),
    ({"type": "dance", "id": "b1"}, "unknown_type", "dance"),
    ({"id": "b2", "prompt": "x"}, "missing_field", "type"),
    ({"type": "generate", "prompt": "x"}, "missing_field", "'id'"),
    ({"type": "generate", "id": "b3"}, "missing_field", "prompt"),
    ({"type": "generate", "id": "b4", "prompt": "x", "max_tokens": "ten"}, "invalid_field", "max_tokens"),
    ({"type": "generate", "id": "b5", "prompt": "x", "temperature": -3}, "invalid_field", "temperature"),
    ({"type": "generate", "id": "b6", "prompt": "x", "top_p": 7}, "invalid_field", "top_p"),
    ({"type": "generate", "id": "b7", "prompt": "x", "tempreature": 0}, "unknown_field", "tempreature"),
    ({"type": "generate", "id": "b8", "prompt": "x", "model": "gpt-9"}, "unknown_model", "gpt-9"),
    ({"type": "generate", "id": "b9", "prompt": "y" * 3000}, "invalid_request", "max_model_len"),
    ({"type": "generate", "id": "b10", "prompt_token_ids": [99999]}, "invalid_request", "token ids"),
    ({"type": "generate", "id": "b11", "prompt": "z" * 5000}, "frame_too_large", "4096"),
    ({"type": "cancel", "id": "nobody"}, "unknown_id", "nobody"),
    ({"type": "chat", "id": "b12", "messages": "hi"}, "invalid_field", "messages"),
]


@pytest.mark.parametrize(("frame", "code", "words"), BAD_FRAMES, ids=[c for _, c, _ in BAD_FRAMES])
async def test_every_bad_frame_gets_an_error_and_the_connection_keeps_working(
    engine: LLMEngine, reference: Reference, frame: Any, code: str, words: str
) -> None:
    limits = ServerLimits(max_frame_bytes=4096)
    async with running_server([engine], limits) as (_, server), raw_client(server.url) as client:
        await client.send(frame)
        error = await client.receive()
        assert error["type"] == "error" and error["code"] == code, error
        assert words in error["message"]
        if isinstance(frame, dict) and isinstance(frame.get("id"), str) and code != "frame_too_large":
            assert error["id"] == frame["id"]  # (an oversized frame is not parsed, so its id is unknown)
        frames = await client.request(gen("ok", "Hello", **greedy()))
        want = reference("Hello", **greedy())
        assert text_and_ids(frames) == (want.text, want.token_ids, "length")
        assert server.statistics().errors_sent == 1


async def test_duplicate_id_and_per_connection_limit(engine: LLMEngine) -> None:
    limits = ServerLimits(max_requests_per_connection=2)
    async with running_server([engine], limits) as (service, server), raw_client(server.url) as client:
        await client.send(gen("a", "Hello", **greedy(900)))
        await client.send(gen("a", "Hello", **greedy(3)))
        dup = await client.until(lambda f: f["type"] == "error")
        assert dup[-1]["code"] == "duplicate_id" and dup[-1]["id"] == "a"
        await client.send(gen("b", "Hello", **greedy(900)))
        await client.send(gen("c", "Hello", **greedy(3)))
        over = await client.until(lambda f: f["type"] == "error")
        assert over[-1]["code"] == "too_many_requests" and over[-1]["id"] == "c"
        for rid in ("a", "b"):
            await client.send({"type": "cancel", "id": rid})
        ended: set[str] = set()
        await client.until(lambda f: f["type"] == "done" and (ended.add(f["id"]) or len(ended) == 2))
        await wait_blocks_released(service)
        frames = await client.request(gen("c", "Hello", **greedy(3)))
        assert frames[-1]["finish_reason"] == "length"


async def test_overloaded_model_answers_overloaded(engine: LLMEngine) -> None:
    from mini_vllm.actors import ServiceConfig

    async with running_server([engine], config=ServiceConfig(max_pending_per_model=1)) as (_, server):
        async with raw_client(server.url) as client:
            await client.send(gen("a", "Hello", **greedy(900)))
            await client.until(lambda f: f["type"] == "token")
            frames = await client.request(gen("b", "Hello", **greedy(3)))
            assert frames[-1]["code"] == "overloaded"
            await client.send({"type": "cancel", "id": "a"})
            await client.until(lambda f: f["type"] == "done" and f["id"] == "a")
            ok = await client.request(gen("c", "Hello", **greedy(3)))
            assert ok[-1]["type"] == "done"


async def test_chat_logprobs_and_n(engine: LLMEngine) -> None:
    async with running_server([engine]) as (_, server), raw_client(server.url) as client:
        frames = await client.request(
            {"type": "chat", "id": "c", "messages": [{"role": "user", "content": "Hi"}], "logprobs": 2, **greedy(4)}
        )
        tokens = [f for f in frames if f["type"] == "token"]
        assert sum(len(f["token_ids"]) for f in tokens) == 4
        assert all(len(f["logprobs"]) == len(f["token_ids"]) for f in tokens)
        assert all(len(lp["top"]) == 2 for f in tokens for lp in f["logprobs"])
        multi = await client.request(gen("n", "Hi", n=3, max_tokens=4, ignore_eos=True, seed=7))
        dones = [f for f in multi if f["type"] == "done"]
        assert sorted(f["index"] for f in dones) == [0, 1, 2]
        assert all(f["usage"]["completion_tokens"] == 4 for f in dones)


async def test_shutdown_tells_in_flight_requests_why_and_closes_with_1001(engine: LLMEngine) -> None:
    async with running_server([engine]) as (service, server), raw_client(server.url) as client:
        await client.send(gen("s", "Hello", **greedy(900)))
        await client.until(lambda f: f["type"] == "token")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.shutdown, "going down for maintenance")
            frames = await client.until(lambda f: f["type"] == "done")
        assert frames[-1]["finish_reason"] == "error"
        assert frames[-1]["error"] == {"code": "shutting_down", "message": "going down for maintenance"}
        with pytest.raises(ConnectionClosed) as info:
            await client.receive()
        assert info.value.reason.code == 1001
        assert info.value.reason.reason == "going down for maintenance"
        await wait_blocks_released(service)


async def test_a_bug_in_a_handler_costs_an_error_frame_not_the_server(engine: LLMEngine) -> None:
    async with running_server([engine]) as (service, server):

        def broken() -> list[Any]:
            raise RuntimeError("bug in models()")

        service.models = broken  # type: ignore[method-assign]
        async with raw_client(server.url) as client:
            await client.send({"type": "models"})
            error = await client.receive()
            assert error["code"] == "internal" and "bug in models()" in error["message"]
            frames = await client.request(gen("ok", "Hello", **greedy(3)))
            assert frames[-1]["type"] == "done"
        async with raw_client(server.url) as second:  # the server still accepts connections
            frames = await second.request(gen("ok", "Hello", **greedy(3)))
            assert frames[-1]["type"] == "done"


async def test_stats_frame_reports_counters_and_resets_the_lag_window(engine: LLMEngine) -> None:
    from mini_vllm.transport.client import connect

    async with running_server([engine]) as (_, server), connect(server.url) as client:
        await client.complete("Hello", **greedy(4))
        stats = await client.stats()
        assert stats["server"]["connections_open"] == 1 and stats["server"]["frames_sent"] >= 2
        (sched,) = stats["service"]["schedulers"]
        assert sched["model"] == engine.name and sched["engine"]["generation_tokens"] >= 4
        assert stats["service"]["loop_lag"]["samples"] >= 0
        await client.stats(reset_loop_lag=True)
        after = await client.stats()
        # The window restarted: it holds only what the monitor saw since (a handful of samples at most).
        assert after["service"]["loop_lag"]["samples"] <= stats["service"]["loop_lag"]["samples"] + 1
    async with running_server([engine]) as (_, server), raw_client(server.url) as raw:
        await raw.send({"type": "stats", "id": "s", "reset_loop_lag": "yes"})
        frame = await raw.receive()
        assert frame["type"] == "error" and frame["code"] == "invalid_field" and "reset_loop_lag" in frame["message"]
