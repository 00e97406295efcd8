"""The JSON protocol on its own: every bad frame has its code and a message naming the problem."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mini_vllm.engine.outputs import TokenLogprob
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.transport import protocol
from mini_vllm.transport.protocol import (
    CancelFrame,
    ChatFrame,
    DoneEvent,
    ErrorEvent,
    GenerateFrame,
    ModelInfo,
    ModelsEvent,
    ModelsFrame,
    ProtocolError,
    TokenEvent,
    parse_client_frame,
)

pytestmark = pytest.mark.timeout(60)


def parse(obj: Any, max_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES) -> protocol.ClientFrame:
    return parse_client_frame(obj if isinstance(obj, str | bytes) else json.dumps(obj), max_bytes)


def error_of(obj: Any, max_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(obj, max_bytes)
    assert info.value.code in protocol.ERROR_CODES
    return info.value


def test_generate_with_sampling_fields_at_top_level() -> None:
    frame = parse(
        {"type": "generate", "id": "a", "model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0, "stop": ["x"]}
    )
    assert frame == GenerateFrame(
        "a", "m", "hi", None, SamplingParams(max_tokens=5, temperature=0, stop=("x",)), priority=0
    )


def test_generate_with_token_ids_and_defaults() -> None:
    frame = parse({"type": "generate", "id": "b", "prompt_token_ids": [1, 2, 3]})
    assert isinstance(frame, GenerateFrame)
    assert frame.prompt_token_ids == (1, 2, 3) and frame.prompt is None and frame.model is None
    assert frame.params == SamplingParams()


def test_chat_cancel_models() -> None:
    chat = parse({"type": "chat", "id": "c", "messages": [{"role": "user", "content": "yo"}], "n": 2, "seed": 3})
    assert isinstance(chat, ChatFrame)
    assert chat.messages[0].content == "yo" and chat.params.n == 2 and chat.params.seed == 3
    assert parse({"type": "cancel", "id": "c"}) == CancelFrame("c")
    assert parse({"type": "models"}) == ModelsFrame(None)
    assert parse({"type": "models", "id": "q"}) == ModelsFrame("q")


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        (b"\x00\x01", "binary_frame", "binary"),
        ("{not json", "invalid_json", "JSON"),
        ('{"type": "generate", "id": "a", "prompt": "x", "temperature": NaN}', "invalid_json", "NaN"),
        ("[1, 2]", "invalid_frame", "object"),
        ('"just a string"', "invalid_frame", "object"),
        ({"id": "a"}, "missing_field", "'type'"),
        ({"type": "fly", "id": "a"}, "unknown_type", "'fly'"),
        ({"type": 7}, "unknown_type", "7"),
        ({"type": "generate", "prompt": "x"}, "missing_field", "'id'"),
        ({"type": "generate", "id": 5, "prompt": "x"}, "invalid_field", "'id'"),
        ({"type": "generate", "id": "", "prompt": "x"}, "invalid_field", "'id'"),
        ({"type": "generate", "id": "a"}, "missing_field", "prompt"),
        ({"type": "generate", "id": "a", "prompt": "x", "prompt_token_ids": [1]}, "invalid_field", "exactly one"),
        ({"type": "generate", "id": "a", "prompt": ""}, "invalid_field", "'prompt'"),
        ({"type": "generate", "id": "a", "prompt": 3}, "invalid_field", "'prompt'"),
        ({"type": "generate", "id": "a", "prompt_token_ids": [1, -2]}, "invalid_field", "prompt_token_ids"),
        ({"type": "generate", "id": "a", "prompt_token_ids": [1, True]}, "invalid_field", "prompt_token_ids"),
        ({"type": "generate", "id": "a", "prompt_token_ids": []}, "invalid_field", "prompt_token_ids"),
        ({"type": "generate", "id": "a", "prompt": "x", "max_tokens": "5"}, "invalid_field", "max_tokens"),
        ({"type": "generate", "id": "a", "prompt": "x", "max_tokens": 2.5}, "invalid_field", "max_tokens"),
        ({"type": "generate", "id": "a", "prompt": "x", "max_tokens": 0}, "invalid_field", "max_tokens"),
        ({"type": "generate", "id": "a", "prompt": "x", "temperature": -1}, "invalid_field", "temperature"),
        ({"type": "generate", "id": "a", "prompt": "x", "top_p": 1.5}, "invalid_field", "top_p"),
        ({"type": "generate", "id": "a", "prompt": "x", "logprobs": 99}, "invalid_field", "logprobs"),
        ({"type": "generate", "id": "a", "prompt": "x", "stop": 5}, "invalid_field", "stop"),
        ({"type": "generate", "id": "a", "prompt": "x", "stop": {"a": 1}}, "invalid_field", "stop"),
        ({"type": "generate", "id": "a", "prompt": "x", "ignore_eos": "yes"}, "invalid_field", "ignore_eos"),
        ({"type": "generate", "id": "a", "prompt": "x", "model": 3}, "invalid_field", "'model'"),
        ({"type": "generate", "id": "a", "prompt": "x", "priority": "high"}, "invalid_field", "'priority'"),
        ({"type": "generate", "id": "a", "prompt": "x", "max_token": 5}, "unknown_field", "'max_token'"),
        ({"type": "cancel"}, "missing_field", "'id'"),
        ({"type": "cancel", "id": "a", "prompt": "x"}, "unknown_field", "'prompt'"),
        ({"type": "chat", "id": "a"}, "missing_field", "'messages'"),
        ({"type": "chat", "id": "a", "messages": []}, "invalid_field", "'messages'"),
        ({"type": "chat", "id": "a", "messages": ["hi"]}, "invalid_field", "messages[0]"),
        ({"type": "chat", "id": "a", "messages": [{"role": "user"}]}, "invalid_field", "messages[0]"),
        ({"type": "chat", "id": "a", "messages": [{"role": "", "content": "x"}]}, "invalid_field", "messages[0]"),
    ],
)
def test_bad_frames_have_a_code_and_a_message_naming_the_problem(frame: Any, code: str, words: str) -> None:
    err = error_of(frame)
    assert err.code == code
    assert words in err.message


def test_oversized_frame() -> None:
    err = error_of({"type": "generate", "id": "a", "prompt": "x" * 5000}, max_bytes=4096)
    assert err.code == "frame_too_large" and "4096" in err.message


def test_errors_carry_the_request_id_when_it_is_readable() -> None:
    assert error_of({"type": "generate", "id": "r1", "prompt": "x", "top_k": -5}).request_id == "r1"
    assert error_of({"type": "generate", "id": 12, "prompt": "x"}).request_id is None
    assert error_of("{bad").request_id is None


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_field_names = st.sampled_from(
    ["type", "id", "model", "prompt", "prompt_token_ids", "messages", "max_tokens", "temperature", "stop", "n", "seed"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(_field_names, _json, max_size=6)
    | st.fixed_dictionaries({"type": st.sampled_from(["generate", "chat", "cancel", "models"])}, optional={"id": _json})
    | _json
)
def test_any_json_either_parses_or_raises_protocol_error(value: Any) -> None:
    try:
        parse(json.dumps(value))
    except ProtocolError as exc:
        assert exc.code in protocol.ERROR_CODES and exc.message


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_arbitrary_bytes_and_text_never_escape_as_other_errors(value: str | bytes) -> None:
    try:
        parse_client_frame(value)
    except ProtocolError:
        pass


def test_server_frames_round_trip_through_the_client_parser() -> None:
    lp = TokenLogprob(5, -0.25, ((5, -0.25), (7, -2.0)))
    token = protocol.parse_server_frame(protocol.token_frame("a", 1, "hé", [5], [lp]))
    assert token == TokenEvent("a", 1, "hé", (5,), (lp,))
    done = protocol.parse_server_frame(protocol.done_frame("a", 0, "error", 3, 4, ("model_error", "boom")))
    assert done == DoneEvent("a", 0, "error", protocol.Usage(3, 4), "model_error", "boom")
    assert protocol.parse_server_frame(protocol.error_frame(None, "invalid_json", "x")) == ErrorEvent(
        None, "invalid_json", "x"
    )
    models = [ModelInfo("m", 128, 259, True)]
    assert protocol.parse_server_frame(protocol.models_frame("q", models)) == ModelsEvent("q", tuple(models))
    with pytest.raises(protocol.MalformedServerFrame):
        protocol.parse_server_frame('{"type": "token"}')


def test_request_builders_produce_frames_the_server_accepts() -> None:
    frame = parse(protocol.generate_request("x", prompt="hi", model="m", sampling={"stop": ("a",), "max_tokens": 3}))
    assert isinstance(frame, GenerateFrame) and frame.params.stop == ("a",) and frame.model == "m"
    chat = parse(protocol.chat_request("y", [{"role": "user", "content": "c"}], sampling={"n": 2}))
    assert isinstance(chat, ChatFrame) and chat.params.n == 2
    assert parse(protocol.cancel_request("y")) == CancelFrame("y")
    assert parse(protocol.models_request("z")) == ModelsFrame("z")
