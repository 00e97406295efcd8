"""The bundled async client against a live server: streams, typed errors, cancellation."""

from __future__ import annotations

import pytest
import trio
from conftest_serving import PROMPTS, GatedEngine, Reference, greedy, running_server, wait_blocks_released

from mini_vllm.actors import ServiceConfig
from mini_vllm.engine import LLMEngine
from mini_vllm.transport.client import (
    ConnectionLost,
    GenerationFailed,
    InvalidRequestError,
    OverloadedError,
    UnknownModelError,
    connect,
)

pytestmark = pytest.mark.timeout(120)


async def test_generate_complete_chat_and_models(engine: LLMEngine, reference: Reference) -> None:
    async with running_server([engine]) as (_, server), connect(server.url) as client:
        text, ids, finals = "", [], []
        async for delta in client.generate("Hello", **greedy()):
            text += delta.text
            ids.extend(delta.token_ids)
            if delta.finish_reason:
                finals.append((delta.finish_reason, delta.usage))
        want = reference("Hello", **greedy())
        assert (text, tuple(ids)) == (want.text, want.token_ids)
        assert finals[0][0] == "length" and finals[0][1].completion_tokens == 12
        completion = await client.complete(PROMPTS[1], **greedy())
        assert completion.token_ids == reference(PROMPTS[1], **greedy()).token_ids
        got = [d async for d in client.chat([{"role": "user", "content": "hi"}], **greedy(4))]
        assert got[-1].finish_reason == "length" and sum(len(d.token_ids) for d in got) == 4
        (model,) = await client.models()
        assert model.name == "demo" and model.has_chat_template and model.max_model_len == 96 * 16


async def test_many_concurrent_streams_on_one_connection(engine: LLMEngine, reference: Reference) -> None:
    async with running_server([engine]) as (service, server), connect(server.url) as client:
        results = {}

        async def one(i: int) -> None:
            results[i] = await client.complete(PROMPTS[i % len(PROMPTS)], **greedy(5 + i % 4))

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(one, i)
        for i, c in results.items():
            assert c.token_ids == reference(PROMPTS[i % len(PROMPTS)], **greedy(5 + i % 4)).token_ids
        await wait_blocks_released(service)


async def test_typed_errors(engine: LLMEngine) -> None:
    async with running_server([engine]) as (_, server), connect(server.url) as client:
        with pytest.raises(UnknownModelError, match="nope"):
            await client.complete("x", model="nope")
        with pytest.raises(InvalidRequestError) as info:
            await client.complete("x", temperature=-1)
        assert info.value.code == "invalid_field" and "temperature" in info.value.message
        with pytest.raises(InvalidRequestError, match="max_model_len"):
            await client.complete("x" * 2000)
        with pytest.raises(InvalidRequestError, match="unknown_field"):
            await client.complete("x", max_token=3)
        assert (await client.complete("x", **greedy(2))).finish_reason == "length"  # still usable


async def test_overloaded_is_typed(engine: LLMEngine) -> None:
    async with (
        running_server([engine], config=ServiceConfig(max_pending_per_model=1)) as (_, server),
        connect(server.url) as client,
    ):
        long = client.generate("Hello", **greedy(900))
        async with long:
            await long.__anext__()
            with pytest.raises(OverloadedError):
                await client.complete("x", **greedy(2))


async def test_breaking_out_cancels_on_the_server(engine: LLMEngine) -> None:
    async with running_server([engine]) as (service, server), connect(server.url) as client:
        async for _ in client.generate("Hello", **greedy(900)):
            break
        await wait_blocks_released(service)
        assert service.statistics().ingress.cancelled == 1
        assert (await client.complete("x", **greedy(2))).finish_reason == "length"


async def test_explicit_cancel_ends_with_cancelled(engine: LLMEngine) -> None:
    async with running_server([engine]) as (service, server), connect(server.url) as client:
        stream = client.generate("Hello", request_id="mine", **greedy(900))
        reasons = []
        async for delta in stream:
            if not reasons:
                await client.cancel("mine")
                reasons.append(None)
            if delta.finish_reason:
                reasons.append(delta.finish_reason)
        assert reasons[-1] == "cancelled"
        await wait_blocks_released(service)


async def test_a_failed_generation_raises(engine: LLMEngine) -> None:
    gated = GatedEngine(engine)
    gated.release.set()
    gated.fail_next = RuntimeError("device on fire")
    async with running_server([gated]) as (_, server), connect(server.url) as client:  # type: ignore[list-item]
        with pytest.raises(GenerationFailed, match="device on fire") as info:
            await client.complete("Hello", **greedy())
        assert info.value.code == "model_error"


async def test_connection_errors() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens on this port now
    with pytest.raises(ConnectionLost, match="cannot connect"):
        async with connect(f"ws://127.0.0.1:{port}"):
            pass


async def test_server_going_away_mid_stream_raises_connection_lost_or_failed(engine: LLMEngine) -> None:
    async with running_server([engine]) as (_, server), connect(server.url) as client:
        stream = client.generate("Hello", **greedy(900))
        with pytest.raises((GenerationFailed, ConnectionLost)):
            async for _ in stream:
                await server.shutdown("bye now")
