"""Nothing a client sends can hurt another client (issue 14): every field is checked at the edge.

Each finding of the attack on ``mini-vllm serve`` is a case here: requests that passed validation
and then failed the engine core's step for every batched request (``top_k: 10**20``, stop token
ids outside the vocabulary with ``min_tokens``), requests that made the server allocate gigabytes
(``n: 1000000``) or block its event loop (70,000 stop strings), inputs that reached the tokenizer
as an ``internal`` error, and a lone surrogate in an ``id`` that closed the connection.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from conftest_serving import Reference, greedy, raw_client, running_server, text_and_ids

from mini_vllm.actors.ingress import Ingress
from mini_vllm.actors.request_stream import RequestStream
from mini_vllm.actors.service_config import ServiceConfig
from mini_vllm.engine import ConfigError, InvalidRequest, LLMEngine, SamplingParams
from mini_vllm.engine.llm_engine import load_tokenizer
from mini_vllm.engine.prompts import PromptEncoder
from mini_vllm.transport import protocol
from mini_vllm.transport.protocol import ProtocolError, parse_client_frame

pytestmark = pytest.mark.timeout(60)

VOCAB = 259  # the demo model's
SURROGATE = "\ud800"  # json.dumps writes it as the escape "\\ud800", which JSON allows


def gen(rid: str, prompt: str = "Hello", **fields: Any) -> dict[str, Any]:
    return {"type": "generate", "id": rid, "prompt": prompt, **fields}


def chat(rid: str, messages: Any, **fields: Any) -> dict[str, Any]:
    return {"type": "chat", "id": rid, "messages": messages, **fields}


# ---- SamplingParams: the model-independent bounds (the offline LLM gets them too) ---------------


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"top_k": 10**20}, "top_k"),
        ({"n": 10**20}, "n"),
        ({"n": 2**63}, "n"),
        ({"max_tokens": 2**63}, "max_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop_token_ids": [2**63], "min_tokens": 2}, "stop_token_ids"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"stop": ["ok", SURROGATE]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
    ],
)
def test_sampling_params_refuse_what_no_model_can_take(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be") as info:
        SamplingParams(**fields)
    assert len(str(info.value)) < 300  # short whatever was sent


def test_sampling_params_name_the_bad_element_of_a_long_list_briefly() -> None:
    with pytest.raises(ConfigError) as info:
        SamplingParams(stop=["x"] * 70_000 + [""])
    assert "stop[70000]" in str(info.value) and len(str(info.value)) < 200
    with pytest.raises(ConfigError, match=r"stop_token_ids\[2\]"):
        SamplingParams(stop_token_ids=[1, 2, 2**64])


def test_sampling_params_keep_the_64_bit_edges() -> None:
    for seed in (0, -(2**63), 2**64 - 1):
        assert SamplingParams(seed=seed).seed == seed
    for top_k in (-1, 0, 1, 2**63 - 1):
        assert SamplingParams(top_k=top_k).top_k == top_k
    assert SamplingParams(max_tokens=2**63 - 1, min_tokens=2**63 - 1).min_tokens == 2**63 - 1


# ---- the frame parser: types, 64 bits, valid Unicode, named fields ------------------------------


def error_of(frame: dict[str, Any] | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(frame if isinstance(frame, str) else json.dumps(frame))
    return info.value


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (gen("a", "Hi" + SURROGATE), "'prompt'"),
        (gen("a", model=SURROGATE), "'model'"),
        (gen("a", model="m" * 2000), "'model'"),
        (gen("a", stop=[SURROGATE]), "stop"),
        (gen("a", stop=SURROGATE), "stop"),
        (chat("a", [{"role": "user", "content": "Hi" + SURROGATE}]), "messages[0].content"),
        (chat("a", [{"role": SURROGATE, "content": "Hi"}]), "messages[0].role"),
        (chat("a", [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]), "messages[0].content"),
        (gen("a", priority=2**63), "'priority'"),
        (gen("a", top_k=10**20), "top_k"),
        (gen("a", n=10**20), "n must be"),
        (gen("a", seed=10**20), "seed"),
        (gen("a", stop_token_ids="abc"), "stop_token_ids"),
        ({"type": "generate", "id": "a", "prompt_token_ids": [1, 2**63]}, "prompt_token_ids"),
        ('{"type": "generate", "id": "a", "prompt": "x", "temperature": 1e400}', "temperature"),
        ('{"type": "generate", "id": "a", "prompt": "x", "repetition_penalty": -1e999}', "repetition_penalty"),
    ],
)
def test_parser_names_the_field(frame: dict[str, Any] | str, words: str) -> None:
    error = error_of(frame)
    assert error.code == "invalid_field" and words in error.message, error.message
    assert error.request_id == "a"
    protocol.error_frame(error.request_id, error.code, error.message).encode("utf-8")  # sendable


@pytest.mark.parametrize(
    "frame",
    [
        gen(SURROGATE),
        {"type": "models", "id": "x" + SURROGATE},
        {"type": "stats", "id": SURROGATE},
        {"type": "cancel", "id": SURROGATE},
    ],
)
def test_a_lone_surrogate_id_is_an_error_about_the_id_and_is_never_echoed(frame: dict[str, Any]) -> None:
    error = error_of(frame)
    assert error.code == "invalid_field" and "'id'" in error.message and error.request_id is None
    protocol.error_frame(error.request_id, error.code, error.message).encode("utf-8")


def test_errors_found_before_the_id_is_checked_do_not_echo_an_unsendable_id() -> None:
    error = error_of({"type": "dance", "id": SURROGATE})
    assert error.code == "unknown_type" and error.request_id is None
    error = error_of({"type": "generate", "id": SURROGATE, "bogus": 1})
    assert error.code == "unknown_field" and error.request_id is None


def test_error_frames_are_always_valid_utf8() -> None:
    frame = protocol.error_frame(SURROGATE, "internal", "boom " + SURROGATE)
    frame.encode("utf-8")
    assert json.loads(frame)["id"] is None and "\\ud800" in json.loads(frame)["message"]


def test_unknown_fields_are_named_briefly() -> None:
    error = error_of({"type": "generate", "id": "a", "prompt": "x", **{f"f{i}": 0 for i in range(10_000)}})
    assert error.code == "unknown_field" and "and 9990 more" in error.message and len(error.message) < 1000


# ---- the service's limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"max_n": 0}, "max_n"),
        ({"max_logprobs": 21}, "max_logprobs"),
        ({"max_logprobs": -1}, "max_logprobs"),
        ({"max_stop_strings": -1}, "max_stop_strings"),
        ({"max_stop_string_chars": 0}, "max_stop_string_chars"),
        ({"max_stop_token_ids": True}, "max_stop_token_ids"),
        ({"max_request_tokens": 1.5}, "max_request_tokens"),
    ],
)
def test_service_config_limits_are_validated(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        ServiceConfig(**fields)


def test_service_config_limit_defaults() -> None:
    c = ServiceConfig()
    assert (c.max_n, c.max_logprobs, c.max_stop_strings, c.max_stop_string_chars, c.max_stop_token_ids) == (
        64, 20, 16, 128, 64
    )
    assert c.max_request_tokens == 1 << 18


# ---- the ingress: server limits and the model's bounds, before the engine core ------------------


@attrs.define
class StubCore:
    """Stands in for a model's CoreProxy: records what the ingress lets through."""

    submitted: list[tuple[list[int], SamplingParams]] = attrs.field(factory=list)
    available: bool = True

    def submit(self, stream: RequestStream, ids: list[int], params: SamplingParams, priority: int, prompt: Any) -> None:
        self.submitted.append((ids, params))

    def abort(self, stream: RequestStream) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Any:
    return load_tokenizer(demo_model_dir)


def make_ingress(tokenizer: Any, config: ServiceConfig | None = None, max_model_len: int = 64) -> tuple[Ingress, StubCore]:
    core = StubCore()
    encoder = PromptEncoder("demo", tokenizer, max_model_len, VOCAB)
    return Ingress({"demo": encoder}, {"demo": core}, config), core  # type: ignore[dict-item]


LIMITS = ServiceConfig(
    max_n=4, max_logprobs=5, max_stop_strings=2, max_stop_string_chars=8, max_stop_token_ids=3, max_request_tokens=100
)


@pytest.mark.parametrize(
    ("sampling", "words"),
    [
        ({"n": 5}, "n must be in [1, 4]"),
        ({"n": 1_000_000}, "n must be in [1, 4]"),
        ({"logprobs": 6}, "logprobs must be in [0, 5]"),
        ({"stop": ["a", "b", "c"]}, "stop must have at most 2"),
        ({"stop": ["a", "x" * 9]}, "stop[1] must be at most 8 characters"),
        ({"stop_token_ids": [1, 2, 3, 4]}, "stop_token_ids must have at most 3"),
        ({"n": 4, "max_tokens": 26}, "n × max_tokens must be at most 100"),
        ({"top_k": VOCAB + 1}, f"top_k must be -1 or 0 (disabled) or at most the vocabulary size {VOCAB}"),
        ({"stop_token_ids": [VOCAB], "min_tokens": 2}, f"stop_token_ids must be token ids in [0, {VOCAB})"),
    ],
)
async def test_ingress_applies_the_servers_limits_and_the_models_bounds(
    tokenizer: Any, sampling: dict[str, Any], words: str
) -> None:
    ingress, core = make_ingress(tokenizer, LIMITS)
    with pytest.raises(InvalidRequest) as info:
        await ingress.submit("r", None, SamplingParams(**sampling), 0, prompt="Hi")
    assert words in str(info.value), str(info.value)
    assert core.submitted == []
    assert dict(ingress.statistics().rejections_by_code) == {"invalid_request": 1}


async def test_ingress_lets_requests_at_the_limits_through(tokenizer: Any) -> None:
    ingress, core = make_ingress(tokenizer, LIMITS)
    at_limits = SamplingParams(
        n=4, max_tokens=25, logprobs=5, stop=["a", "x" * 8], stop_token_ids=[0, 1, VOCAB - 1], top_k=VOCAB
    )
    await ingress.submit("r1", None, at_limits, 0, prompt="Hi")
    # max_tokens beyond the context counts as the room the prompt leaves: 1 × (64 - 2) <= 100
    await ingress.submit("r2", None, SamplingParams(max_tokens=10**9), 0, prompt="Hi")
    assert [p for _, p in core.submitted] == [at_limits, SamplingParams(max_tokens=10**9)]


async def test_ingress_counts_only_the_room_left_by_the_prompt(tokenizer: Any) -> None:
    ingress, core = make_ingress(tokenizer, LIMITS)
    with pytest.raises(InvalidRequest, match=r"n=2 × max_tokens=62 = 124 \(max_tokens=1000 counted as the 62"):
        await ingress.submit("r", None, SamplingParams(n=2, max_tokens=1000), 0, prompt="Hi")
    assert core.submitted == []


async def test_ingress_default_limits(tokenizer: Any) -> None:
    ingress, core = make_ingress(tokenizer, max_model_len=4096)
    for sampling, words in [
        ({"n": 65}, "n must be in [1, 64]"),
        ({"stop": [f"s{i}" for i in range(70_000)]}, "stop must have at most 16 strings"),
        ({"stop": ["x" * 129]}, "stop[0] must be at most 128 characters"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids must have at most 64 ids"),
    ]:
        with pytest.raises(InvalidRequest, match=words.replace("[", r"\[")):
            await ingress.submit("r", None, SamplingParams(**sampling), 0, prompt="Hi")
    await ingress.submit("ok", None, SamplingParams(n=64, max_tokens=4094, stop=["x" * 128] * 16), 0, prompt="Hi")
    assert len(core.submitted) == 1


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ({"prompt": 123}, "prompt must be a string"),
        ({"prompt": "Hi" + SURROGATE}, "prompt must be valid Unicode text"),
        ({"prompt_token_ids": [1, VOCAB]}, "token ids"),
        ({"prompt_token_ids": [1, True]}, "token ids"),
        ({"prompt_token_ids": [1] * 64}, "max_model_len"),
        ({"prompt_token_ids": []}, "empty"),
        ({"messages": [{"role": "user", "content": ["parts"]}]}, "messages[0].content must be a string"),
        ({"messages": [{"role": "user", "content": SURROGATE}]}, "messages[0].content must be valid Unicode"),
        ({"messages": [{"role": "user"}]}, "messages[0] must be an object"),
    ],
)
async def test_ingress_refuses_prompts_the_tokenizer_or_the_model_cannot_take(
    tokenizer: Any, prompt: dict[str, Any], words: str
) -> None:
    # What an embedder can hand the Service directly, without the frame parser in front.
    ingress, core = make_ingress(tokenizer)
    with pytest.raises(InvalidRequest) as info:
        await ingress.submit("r", None, SamplingParams(), 0, **prompt)
    assert words in str(info.value), str(info.value)
    assert core.submitted == []


async def test_ingress_refuses_a_priority_the_scheduler_cannot_order(tokenizer: Any) -> None:
    ingress, core = make_ingress(tokenizer)
    for priority in ("high", 2**63, None):
        with pytest.raises(InvalidRequest, match="priority must be an integer"):
            await ingress.submit("r", None, SamplingParams(), priority, prompt="Hi")  # type: ignore[arg-type]
    assert core.submitted == []


def test_prompt_encoder_checks_for_the_offline_engine(tokenizer: Any) -> None:
    encoder = PromptEncoder("demo", tokenizer, 64, VOCAB)
    with pytest.raises(InvalidRequest, match="prompt must be valid Unicode"):
        encoder.tokenize(SURROGATE)
    with pytest.raises(InvalidRequest, match="logprobs must be at most the vocabulary size 3"):
        PromptEncoder("tiny", tokenizer, 64, 3).check_params(SamplingParams(logprobs=4))
    encoder.check_params(SamplingParams(top_k=VOCAB, stop_token_ids=[VOCAB - 1], logprobs=20))
    encoder.check_prompt([0, VOCAB - 1])


# ---- over a real WebSocket ----------------------------------------------------------------------

# (frame, code, words in the message). Each was, before issue 14, a failed step for every request
# batched with it, gigabytes of memory, seconds of a blocked event loop, or an `internal` error.
POISON: list[tuple[dict[str, Any] | str, str, str]] = [
    (gen("p-topk", top_k=10**20, temperature=1), "invalid_field", "top_k"),
    (gen("p-topk-vocab", top_k=VOCAB + 1, temperature=1), "invalid_request", "top_k"),
    (gen("p-stopid", stop_token_ids=[10**6], min_tokens=2), "invalid_request", "stop_token_ids"),
    (gen("p-stopid64", stop_token_ids=[2**63], min_tokens=2), "invalid_field", "stop_token_ids"),
    (gen("p-n-huge", n=10**20), "invalid_field", "n must be"),
    (gen("p-n-million", n=1_000_000), "invalid_request", "n must be in [1, 64]"),
    (gen("p-n-20000", n=20_000), "invalid_request", "n must be in [1, 64]"),
    (gen("p-stops", stop=[f"s{i}" for i in range(70_000)]), "invalid_request", "stop must have at most 16"),
    (gen("p-stop-long", stop=["x" * 10_000]), "invalid_request", "stop[0] must be at most 128"),
    (gen("p-stopids-many", stop_token_ids=list(range(200))), "invalid_request", "stop_token_ids must have at most 64"),
    (gen("p-logprobs", logprobs=21), "invalid_field", "logprobs"),
    (gen("p-prompt", "Hi" + SURROGATE), "invalid_field", "'prompt'"),
    (gen("p-stop-sur", stop=["a" + SURROGATE]), "invalid_field", "stop"),
    (gen("p-model", model="x" + SURROGATE), "invalid_field", "'model'"),
    (chat("p-chat", [{"role": "user", "content": "Hi" + SURROGATE}]), "invalid_field", "messages[0].content"),
    (chat("p-chat-parts", [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]), "invalid_field",
     "messages[0].content"),
    (gen("p-seed", seed=2**64), "invalid_field", "seed"),
    (gen("p-priority", priority=2**63), "invalid_field", "priority"),
    (gen("p-max-tokens", max_tokens=2**63), "invalid_field", "max_tokens"),
    ({"type": "generate", "id": "p-ids64", "prompt_token_ids": [2**63]}, "invalid_field", "prompt_token_ids"),
    ({"type": "generate", "id": "p-ids", "prompt_token_ids": [1, VOCAB]}, "invalid_request", "token ids"),
    ('{"type": "generate", "id": "p-temp", "prompt": "x", "temperature": 1e400}', "invalid_field", "temperature"),
    (gen("p-" + SURROGATE), "invalid_field", "'id'"),
    ({"type": "dance", "id": SURROGATE}, "unknown_type", "dance"),
]


def _rid(frame: dict[str, Any] | str) -> str | None:
    rid = json.loads(frame).get("id") if isinstance(frame, str) else frame.get("id")
    return None if rid is None or SURROGATE in rid else rid


async def test_every_poisonous_request_is_refused_naming_its_field(engine: LLMEngine, reference: Reference) -> None:
    async with running_server([engine]) as (service, server), raw_client(server.url) as client:
        for frame, code, words in POISON:
            with trio.fail_after(5):  # refused at once: n = 10**6 allocates nothing
                await client.send(frame)
                error = await client.receive()
            assert error["type"] == "error" and error["code"] == code, (frame if isinstance(frame, str) else
                                                                          frame["id"], error)
            assert words in error["message"], error
            assert error["id"] == _rid(frame)
        # The same connection still serves, exactly.
        frames = await client.request(gen("after", **greedy()))
        want = reference("Hello", **greedy())
        assert text_and_ids(frames) == (want.text, want.token_ids, "length")
        stats = service.statistics()
        assert stats.ingress.submitted == 1  # none of the poison reached the engine core
        assert server.statistics().errors_sent == len(POISON)


async def test_a_lone_surrogate_id_gets_an_error_frame_and_the_connection_stays(
    engine: LLMEngine, reference: Reference
) -> None:
    async with running_server([engine]) as (_, server), raw_client(server.url) as client:
        # The frame's text as a client writes it: JSON's escape for a lone surrogate.
        await client.send('{"type": "generate", "id": "\\ud800", "prompt": "Hello", "max_tokens": 3}')
        error = await client.receive()
        assert error == {
            "type": "error",
            "id": None,
            "code": "invalid_field",
            "message": "'id' must be valid Unicode text (UTF-8): a lone surrogate is at index 0",
        }
        await client.send({"type": "models", "id": "\ud800"})
        assert (await client.receive())["code"] == "invalid_field"
        frames = await client.request(gen("next", **greedy()))
        want = reference("Hello", **greedy())
        assert text_and_ids(frames) == (want.text, want.token_ids, "length")


# Long enough to be still running while the poison arrives (their batch is what it would fail).
INNOCENT: list[tuple[str, dict[str, Any]]] = [
    ("Hello", greedy(48)),
    ("The quick brown fox", greedy(40)),
    ("KV blocks return to the pool", greedy(56, min_tokens=4, stop_token_ids=[7])),
    ("a", {"max_tokens": 48, "temperature": 0.8, "seed": 7, "ignore_eos": True, "top_k": 50}),
]


async def test_poison_beside_innocent_requests_leaves_them_exact(engine: LLMEngine, reference: Reference) -> None:
    results: dict[str, list[dict[str, Any]]] = {}
    async with running_server([engine]) as (service, server):
        async with raw_client(server.url) as innocent, raw_client(server.url) as attacker:
            for i, (prompt, sampling) in enumerate(INNOCENT):
                await innocent.send(gen(f"i{i}", prompt, **sampling))
            results = {f"i{i}": [] for i in range(len(INNOCENT))}
            first = await innocent.receive()  # the innocent ones are running: the poison would join their batch
            results[first["id"]].append(first)
            for frame, code, _ in POISON:
                await attacker.send(frame)
                assert (await attacker.receive())["code"] == code
            done = sum(f["type"] == "done" for f in results[first["id"]])
            while done < len(INNOCENT):
                f = await innocent.receive()
                results[f["id"]].append(f)
                done += f["type"] == "done"
        wants = [reference(prompt, **sampling) for prompt, sampling in INNOCENT]
        for i, want in enumerate(wants):
            assert text_and_ids(results[f"i{i}"]) == (want.text, want.token_ids, want.finish_reason), i
        # Nothing else ran: the poison never reached the engine core.
        assert service.statistics().scheduler("demo").engine.generation_tokens == sum(len(w.token_ids) for w in wants)
