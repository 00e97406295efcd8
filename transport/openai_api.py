"""The OpenAI-compatible HTTP API, in vLLM's request and response shapes.

``openai_routes`` gives the front door its routes: ``POST /v1/completions``, ``POST
/v1/chat/completions``, ``GET /v1/models``, and vLLM's ``POST /tokenize`` and ``POST /detokenize``.
A request body is parsed into a record (``CompletionRequest``, ``ChatRequest``) by pure functions;
the sampling fields go through the same checks as the WebSocket protocol's (``SamplingParams`` and
the ingress's request limits), so both doors refuse exactly the same values with the same words.

Each prompt of a request is one ``Generation`` of the service, iterated in a task of its own; the
answer is written only once every prompt has been accepted and has its first output, so that a
refusal (bad field, prompt too long, queue full) is an HTTP status, never a broken stream. After a
streamed answer has begun, an error goes in-band as an SSE ``data: {"error": ...}`` event, then
``[DONE]``. A request whose generation fails in the engine (finish reason ``error``) is answered
as an error (a status, or in-band), never as a success. When the client goes away the front door
cancels the route's task: every ``Generation`` is then closed, which aborts its request and frees
its KV blocks. See docs/protocol.md, "HTTP: the OpenAI-compatible API".
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import trio

from mini_vllm.actors.ingress import INLINE_TOKENIZE_CHARS
from mini_vllm.actors.request_stream import ErrorInfo, GenerationDelta, SampleOutput, Usage
from mini_vllm.actors.service import Generation, Service
from mini_vllm.actors.service_config import ServiceConfig
from mini_vllm.actors.task_group import open_task_group
from mini_vllm.engine.errors import ConfigError, InvalidRequest, MiniVllmError
from mini_vllm.engine.outputs import TokenLogprob
from mini_vllm.engine.prompts import PromptEncoder
from mini_vllm.engine.sampling_params import INT64_MAX, SamplingParams, lone_surrogate, show_value
from mini_vllm.transport import protocol
from mini_vllm.transport.http import (
    Admission,
    HttpError,
    HttpRequest,
    HttpResponder,
    Routes,
    error_body,
    send_error,
    send_json,
)

log = logging.getLogger(__name__)

Prompt = str | tuple[int, ...]  # text, or token ids
ChatMessages = tuple[dict[str, str], ...]  # {role, content} as the chat template takes them

OWNED_BY = "mini-vllm"
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM sends this value for a token of probability 0
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
SSE_DONE = b"data: [DONE]\n\n"

# The engine's finish reasons as OpenAI's: "cancelled" (the request was aborted by someone else
# than this client, e.g. an operator) is vLLM's "abort". "error" has no entry on purpose: a sample
# that ends with it fails the whole response (see ``failure_status``).
FINISH_REASONS: Mapping[str, str] = {"stop": "stop", "length": "length", "cancelled": "abort"}

# The service's error codes (actors/errors.py, engine/errors.py, the stream's ErrorInfo) as HTTP:
# (status, OpenAI's error type, whether a Retry-After is sent). A code not listed here is a bug.
STATUSES: Mapping[str, tuple[int, str, bool]] = {
    "invalid_json": (400, "invalid_request_error", False),
    "invalid_frame": (400, "invalid_request_error", False),
    "missing_field": (400, "invalid_request_error", False),  # also: several models served, none named
    "unknown_field": (400, "invalid_request_error", False),
    "invalid_field": (400, "invalid_request_error", False),
    "invalid_request": (400, "invalid_request_error", False),
    "unknown_model": (404, "invalid_request_error", False),
    "request_too_large": (413, "invalid_request_error", False),  # as the front door says it
    "overloaded": (503, "server_error", True),  # the model's queue is full (429 is the fair share's)
    "shutting_down": (503, "server_error", True),
    "engine_core_exited": (503, "server_error", False),  # that model is gone until the server restarts
    "model_error": (500, "server_error", False),
    "duplicate_id": (500, "server_error", False),  # ids are made here: a clash would be our bug
    "internal": (500, "server_error", False),
}

_SAMPLING_NAMES = (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
)
_COMMON_FIELDS = frozenset(
    {"model", "stream", "stream_options", "user", "priority", "return_token_ids", *_SAMPLING_NAMES}
)
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "logprobs"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                             "return_token_strs"})

# Fields of OpenAI's (or vLLM's) API this server cannot honour: accepted only with the value that
# asks for nothing, refused otherwise with a message saying so (not as "unknown").
_NOT_SUPPORTED = "not supported by this server"
COMPLETION_UNSUPPORTED: Mapping[str, tuple[tuple[object, ...], str]] = {
    "suffix": ((None,), "suffix (insertion) is " + _NOT_SUPPORTED),
    "best_of": ((None, 1), "best_of is " + _NOT_SUPPORTED + ": ask for n samples instead"),
    "logit_bias": ((None, {}), "logit_bias is " + _NOT_SUPPORTED),
    "prompt_logprobs": ((None,), "prompt_logprobs is " + _NOT_SUPPORTED),
}
CHAT_UNSUPPORTED: Mapping[str, tuple[tuple[object, ...], str]] = {
    "tools": ((None, []), "tools (function calling) are " + _NOT_SUPPORTED),
    "tool_choice": ((None, "none"), "tool_choice is " + _NOT_SUPPORTED + " (no tools)"),
    "parallel_tool_calls": ((None, True, False), "parallel_tool_calls is " + _NOT_SUPPORTED),
    "functions": ((None, []), "functions (function calling) are " + _NOT_SUPPORTED),
    "function_call": ((None, "none"), "function_call is " + _NOT_SUPPORTED),
    "response_format": (
        (None, {"type": "text"}),
        "response_format other than {\"type\": \"text\"} (guided decoding) is " + _NOT_SUPPORTED,
    ),
    "logit_bias": ((None, {}), "logit_bias is " + _NOT_SUPPORTED),
    "modalities": ((None, ["text"]), "output modalities other than [\"text\"] are " + _NOT_SUPPORTED),
    "audio": ((None,), "audio output is " + _NOT_SUPPORTED),
    "prediction": ((None,), "prediction (predicted outputs) is " + _NOT_SUPPORTED),
    "echo": ((None, False), "echo is " + _NOT_SUPPORTED + " for chat"),
}
_STREAM_OPTIONS = frozenset({"include_usage", "continuous_usage_stats"})
_MESSAGE_FIELDS = frozenset({"role", "content"})
_TOOL_MESSAGE_FIELDS = frozenset({"tool_calls", "tool_call_id", "function_call"})
_TOOL_ROLES = frozenset({"tool", "function"})
_MEDIA_PARTS = {
    "image_url": "image", "image": "image", "input_image": "image", "input_audio": "audio", "audio_url": "audio",
    "video_url": "video", "file": "file", "input_file": "file",
}


# ---- requests ------------------------------------------------------------------------------------


@attrs.frozen
class StreamOptions:
    """``stream: true``, with OpenAI's and vLLM's ``stream_options``."""

    include_usage: bool = False  # a last chunk with empty choices and the usage
    continuous_usage_stats: bool = False  # the usage so far in every chunk (vLLM)


@attrs.frozen
class CompletionRequest:
    model: str | None
    prompts: tuple[Prompt, ...]
    params: SamplingParams
    max_tokens_given: bool  # False: params.max_tokens is a placeholder, see ``default_max_tokens``
    stream: StreamOptions | None  # None: one JSON body
    echo: bool
    return_token_ids: bool
    priority: Any  # checked by the ingress (an integer within 64 bits)


@attrs.frozen
class ChatRequest:
    model: str | None
    messages: ChatMessages
    params: SamplingParams
    max_tokens_given: bool
    stream: StreamOptions | None
    logprobs: bool
    top_logprobs: int
    return_token_ids: bool
    priority: Any


def parse_body(body: bytes, max_body_bytes: int) -> dict[str, Any]:
    """The request's JSON object, or an HttpError (413 beyond the size limit, 400 if it is not one)."""
    if len(body) > max_body_bytes:
        raise _error(
            "request_too_large",
            f"the request body has {len(body)} bytes, more than this server's limit of {max_body_bytes}",
        )
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise _error("invalid_json", f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _error("invalid_frame", f"the request body must be a JSON object, got {protocol.json_type(value)}")
    return value


def parse_completion_request(raw: Mapping[str, Any]) -> CompletionRequest:
    """A ``/v1/completions`` body, checked completely (HttpError 400 naming the first problem)."""
    _check_fields(raw, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED, "/v1/completions")
    if "prompt" not in raw or raw["prompt"] is None:
        raise _error("missing_field", "missing field 'prompt' (a string, a list of strings, or token ids)", "prompt")
    stream = _stream_options(raw)
    echo = _flag(raw, "echo")
    if echo and raw.get("logprobs") is not None:
        raise _error(
            "invalid_request", "echo with logprobs needs the prompt's logprobs, which this server does not compute: "
            "ask for one of them", "echo",
        )
    sampling = {name: raw[name] for name in _SAMPLING_NAMES if raw.get(name) is not None}
    if raw.get("logprobs") is not None:
        sampling["logprobs"] = raw["logprobs"]
    params, given = _sampling_params(sampling, {})
    return CompletionRequest(
        model=_model(raw),
        prompts=parse_prompts(raw["prompt"]),
        params=params,
        max_tokens_given=given,
        stream=stream,
        echo=echo,
        return_token_ids=_flag(raw, "return_token_ids"),
        priority=_priority(raw),
    )


def parse_chat_request(raw: Mapping[str, Any]) -> ChatRequest:
    """A ``/v1/chat/completions`` body, checked completely (HttpError 400 naming the first problem)."""
    _check_fields(raw, CHAT_FIELDS, CHAT_UNSUPPORTED, "/v1/chat/completions")
    if "messages" not in raw or raw["messages"] is None:
        raise _error("missing_field", "missing field 'messages' (a list of {role, content})", "messages")
    messages = parse_messages(raw["messages"])
    stream = _stream_options(raw)
    sampling = {name: raw[name] for name in _SAMPLING_NAMES if raw.get(name) is not None}
    renames: dict[str, str] = {}
    if raw.get("max_completion_tokens") is not None:
        if "max_tokens" in sampling and sampling["max_tokens"] != raw["max_completion_tokens"]:
            raise _error(
                "invalid_field", "give max_completion_tokens or max_tokens (its old name), not two different values",
                "max_completion_tokens",
            )
        sampling["max_tokens"] = raw["max_completion_tokens"]
        renames["max_tokens"] = "max_completion_tokens"
    logprobs = _flag(raw, "logprobs")
    top = raw.get("top_logprobs")
    if top is not None and not logprobs and top != 0:
        raise _error("invalid_field", "top_logprobs needs \"logprobs\": true", "top_logprobs")
    if logprobs:
        sampling["logprobs"] = 0 if top is None else top
        renames["logprobs"] = "top_logprobs"
    params, given = _sampling_params(sampling, renames)
    return ChatRequest(
        model=_model(raw),
        messages=messages,
        params=params,
        max_tokens_given=given,
        stream=stream,
        logprobs=logprobs,
        top_logprobs=params.logprobs or 0,
        return_token_ids=_flag(raw, "return_token_ids"),
        priority=_priority(raw),
    )


def parse_prompts(value: object) -> tuple[Prompt, ...]:
    """``prompt`` as OpenAI takes it: a string, a list of strings, a list of token ids, or a list
    of token-id lists. Token ids are checked against the model's vocabulary by the ingress."""
    wanted = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not value:
        raise _error("invalid_field", f"prompt must be {wanted}, got {show_value(value)}", "prompt")
    if all(isinstance(p, str) for p in value):
        return tuple(value)
    if all(_is_int(t) for t in value):
        return (tuple(value),)
    if all(isinstance(p, list) for p in value):
        for i, p in enumerate(value):
            if not p or not all(_is_int(t) for t in p):
                raise _error(
                    "invalid_field", f"prompt[{i}] must be a non-empty list of token ids, got {show_value(p)}", "prompt"
                )
        return tuple(tuple(p) for p in value)
    raise _error("invalid_field", f"prompt must be {wanted} (not a mix), got {show_value(value)}", "prompt")


def parse_messages(value: object) -> ChatMessages:
    """OpenAI's chat messages as the template takes them: ``content`` a string or a list of text
    parts (joined by newlines, as vLLM does). Images, audio, files and tool calls are refused: no
    model served here can take them. Roles and text are checked by the prompt encoder."""
    if not isinstance(value, list) or not value:
        wanted = "a non-empty list of {role, content}"
        raise _error("invalid_field", f"messages must be {wanted}, got {show_value(value)}", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _error("invalid_field", f"messages[{i}] must be an object with 'role' and 'content', got "
                         f"{show_value(m)}", "messages")
        tools = sorted(_TOOL_MESSAGE_FIELDS & m.keys())
        if tools or m.get("role") in _TOOL_ROLES:
            what = f"'{tools[0]}'" if tools else f"role {m['role']!r}"
            raise _error("invalid_request", f"messages[{i}] has {what}: tools (function calling) are {_NOT_SUPPORTED}",
                         "messages")
        unknown = sorted(m.keys() - _MESSAGE_FIELDS)
        if unknown:
            raise _error(
                "unknown_field", f"messages[{i}] has field(s) {_names(unknown)} that the chat template does not take; "
                "allowed: role, content", "messages",
            )
        if "role" not in m or "content" not in m:
            missing = "role" if "role" not in m else "content"
            raise _error("missing_field", f"messages[{i}] has no {missing!r}", "messages")
        out.append({"role": m["role"], "content": _content(m["content"], i)})
    return tuple(out)


def _content(content: object, i: int) -> Any:
    """A message's content as one string (a string that is no valid text is the encoder's to refuse)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _error("invalid_field", f"messages[{i}].content must be a string or a list of text parts, got "
                     f"{protocol.json_type(content)}", "messages")
    return "\n".join(_text_part(part, f"messages[{i}].content[{k}]") for k, part in enumerate(content))


def _text_part(part: object, where: str) -> str:
    if not isinstance(part, dict):
        raise _error("invalid_field", f"{where} must be an object {{\"type\": \"text\", \"text\": ...}}, got "
                     f"{show_value(part)}", "messages")
    kind = part.get("type")
    if isinstance(kind, str) and kind in _MEDIA_PARTS:
        raise _error("invalid_request", f"{where} is {_MEDIA_PARTS[kind]} input ({kind!r}): the models served here "
                     "take text only", "messages")
    if kind != "text" or set(part) != {"type", "text"} or not isinstance(part["text"], str):
        raise _error("invalid_field", f"{where} must be {{\"type\": \"text\", \"text\": a string}}, got "
                     f"{show_value(part)}", "messages")
    return part["text"]


def parse_tokenize_request(raw: Mapping[str, Any]) -> tuple[str | None, str | ChatMessages, bool, bool]:
    """``/tokenize``: (model, prompt text or messages, add_special_tokens, return_token_strs)."""
    _check_fields(raw, TOKENIZE_FIELDS, {}, "/tokenize")
    has_prompt, has_messages = raw.get("prompt") is not None, raw.get("messages") is not None
    if has_prompt == has_messages:
        raise _error("missing_field" if not has_prompt else "invalid_field",
                     f"give exactly one of 'prompt' and 'messages' (got {'both' if has_prompt else 'neither'})")
    if not has_messages and raw.get("add_generation_prompt") is not None:
        raise _error("invalid_field", "add_generation_prompt goes with messages, not with a prompt",
                     "add_generation_prompt")
    if has_messages:
        if not _flag(raw, "add_generation_prompt", True):
            raise _error("invalid_field", "add_generation_prompt: only true (the default) is supported",
                         "add_generation_prompt")
        add_special = _flag(raw, "add_special_tokens")
        if add_special:
            raise _error("invalid_field", "add_special_tokens: with messages only false (the default) is supported: "
                         "the chat template places the special tokens", "add_special_tokens")
        return _model(raw), parse_messages(raw["messages"]), False, _flag(raw, "return_token_strs")
    if not isinstance(raw["prompt"], str):
        raise _error("invalid_field", f"prompt must be a string, got {protocol.json_type(raw['prompt'])}", "prompt")
    return _model(raw), raw["prompt"], _flag(raw, "add_special_tokens", True), _flag(raw, "return_token_strs")


def parse_detokenize_request(raw: Mapping[str, Any]) -> tuple[str | None, list[int]]:
    """``/detokenize``: (model, token ids); the ids' range is checked against the model's vocabulary."""
    _check_fields(raw, frozenset({"model", "tokens"}), {}, "/detokenize")
    tokens = raw.get("tokens")
    if tokens is None:
        raise _error("missing_field", "missing field 'tokens' (a list of token ids)", "tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise _error("invalid_field", f"tokens must be a list of token ids, got {show_value(tokens)}", "tokens")
    return _model(raw), tokens


def default_max_tokens(n: int, max_model_len: int, config: ServiceConfig) -> int:
    """vLLM's default: the room the prompt leaves in max_model_len (the engine ends the sample
    there, finish reason ``length``), within the server's n × max_tokens limit. Counted as
    max_model_len, the ingress's limit check reads it as exactly that room."""
    return max(1, min(max_model_len, config.max_request_tokens // n))


def _check_fields(
    raw: Mapping[str, Any], allowed: frozenset[str], unsupported: Mapping[str, tuple[tuple[object, ...], str]],
    what: str,
) -> None:
    for name, (harmless, message) in unsupported.items():
        if name in raw and not any(_same(raw[name], value) for value in harmless):
            raise _error("invalid_request", message, name)
    unknown = sorted(raw.keys() - allowed - unsupported.keys())
    if unknown:
        raise _error(
            "unknown_field", f"unknown field(s) for {what}: {_names(unknown)}; allowed: {', '.join(sorted(allowed))}",
            str(unknown[0]) if lone_surrogate(str(unknown[0])) is None else None,
        )


def _same(a: object, b: object) -> bool:
    """Equal and of one type: ``true`` is no ``1``, ``0`` no ``false``."""
    return type(a) is type(b) and a == b


def _names(names: Sequence[object]) -> str:
    shown = ", ".join(show_value(n) for n in names[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _flag(raw: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = raw.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _error("invalid_field", f"{name} must be true or false, got {show_value(value)}", name)
    return value


def _model(raw: Mapping[str, Any]) -> str | None:
    value = raw.get("model")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > protocol.MAX_MODEL_NAME_LENGTH:
        raise _error(
            "invalid_field", f"model must be a string of at most {protocol.MAX_MODEL_NAME_LENGTH} characters, got "
            f"{show_value(value)}", "model",
        )
    return value


def _priority(raw: Mapping[str, Any]) -> Any:
    value = raw.get("priority")
    return 0 if value is None else value


def _stream_options(raw: Mapping[str, Any]) -> StreamOptions | None:
    stream = _flag(raw, "stream")
    options = raw.get("stream_options")
    if options is None:
        return StreamOptions() if stream else None
    if not stream:
        raise _error("invalid_field", "stream_options needs \"stream\": true", "stream_options")
    if not isinstance(options, dict):
        raise _error("invalid_field", f"stream_options must be an object, got {protocol.json_type(options)}", "stream_options")
    unknown = sorted(options.keys() - _STREAM_OPTIONS)
    if unknown:
        raise _error("unknown_field", f"unknown field(s) in stream_options: {_names(unknown)}; allowed: "
                     f"{', '.join(sorted(_STREAM_OPTIONS))}", "stream_options")
    return StreamOptions(
        include_usage=_flag(options, "include_usage"), continuous_usage_stats=_flag(options, "continuous_usage_stats")
    )


def _sampling_params(fields: dict[str, Any], renames: Mapping[str, str]) -> tuple[SamplingParams, bool]:
    """The WebSocket protocol's own check of the sampling fields (types, then SamplingParams);
    ``renames`` turns the engine's name of a field in a message into the one the client sent."""
    given = "max_tokens" in fields
    if not given:  # a placeholder, so that min_tokens is checked against the real default later
        fields = {**fields, "max_tokens": INT64_MAX}
    try:
        params = protocol.parse_sampling(fields, "")
    except protocol.ProtocolError as exc:
        raise _error(exc.code, *_renamed(exc.message, renames)) from None
    return params, given


def _renamed(message: str, renames: Mapping[str, str]) -> tuple[str, str | None]:
    """(message, param): the field a SamplingParams or ingress message starts with, by the client's name."""
    field = message.split(" ", 1)[0].split("[", 1)[0].strip("'")
    if field in renames:
        return renames[field] + message[len(field):], renames[field]
    if field == "prompt_token_ids":
        return "prompt" + message[len(field):], "prompt"
    return message, field if field in COMPLETION_FIELDS | CHAT_FIELDS else None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


# ---- errors --------------------------------------------------------------------------------------


def _error(code: str, message: str, param: str | None = None, headers: Sequence[tuple[str, str]] = ()) -> HttpError:
    status, kind, _ = STATUSES[code]
    if lone_surrogate(message) is not None:  # e.g. an exception's text: the body must still encode as UTF-8
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return HttpError(status, message, kind, code, headers, param)


def error_code(exc: BaseException) -> str:
    """The stable code of an exception the service raises (as the WebSocket server names it)."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in STATUSES:
        return code
    if isinstance(exc, ConfigError):
        return "invalid_field"
    if isinstance(exc, MiniVllmError):
        return "invalid_request"
    return "internal"


def http_error(exc: BaseException, retry_after: float) -> HttpError:
    """A service exception as the HTTP error to answer, with Retry-After where retrying helps."""
    code = error_code(exc)
    if code == "internal":
        return _error(code, f"internal error: {type(exc).__name__}: {exc}")
    message, param = _renamed(str(exc), {})
    return _error(code, message, param, _retry_headers(code, retry_after))


def failure_error(error: ErrorInfo | None, retry_after: float) -> HttpError:
    """A generation that ended with finish reason ``error``, as the HTTP error it becomes."""
    code = error.code if error is not None and error.code in STATUSES else "model_error"
    message = error.message if error is not None else "the generation failed"
    return _error(code, f"the generation failed: {message}", None, _retry_headers(code, retry_after))


def _retry_headers(code: str, retry_after: float) -> tuple[tuple[str, str], ...]:
    if not STATUSES[code][2]:
        return ()
    return (("Retry-After", retry_after_value(retry_after)),)


def retry_after_value(seconds: float) -> str:
    """HTTP's Retry-After is whole seconds: round up, and never 0 (which would invite a storm)."""
    return str(max(1, math.ceil(seconds)))


def _sse(value: object) -> bytes:
    return b"data: " + json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _sse_error(error: HttpError) -> bytes:
    return b"data: " + error_body(error.message, error.type, error.code, error.param) + b"\n\n"


# ---- token text for logprobs ---------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character a byte-level BPE (GPT-2 and its heirs: Llama 3, Qwen) writes for
    each byte: printable Latin-1 stands for itself, the other bytes for characters from U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(0x100 + shift)] = b
            shift += 1
    return table


class TokenText:
    """One model's token ids as logprobs show them: the token's text (its own decode) and its
    exact bytes (a byte-level token can be a piece of a UTF-8 character, whose text is U+FFFD)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}  # bounded by the vocabulary
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._bytes_of = _byte_level_alphabet() if type(decoder).__name__ == "ByteLevel" else None
        added = getattr(tokenizer, "get_added_vocab", None)
        self._added = frozenset(added().values()) if callable(added) else frozenset()

    def text(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._lookup(token_id)[1]

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._describe(token_id)
        return found

    def _describe(self, token_id: int) -> tuple[str, list[int]]:
        if self._tokenizer is None:  # a dummy preset: no text at all, so vLLM's id form
            text = f"token_id:{token_id}"
            return text, list(text.encode())
        text = self._tokenizer.decode([token_id])
        if token_id not in self._added:
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                if self._bytes_of is not None and all(c in self._bytes_of for c in piece):
                    return text, [self._bytes_of[c] for c in piece]
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
                    with contextlib.suppress(ValueError):
                        return text, [int(piece[3:5], 16)]
        return text, list(text.encode("utf-8", "backslashreplace"))


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def completion_logprobs(
    logprobs: Sequence[TokenLogprob], names: TokenText, offset: int
) -> tuple[dict[str, Any], int]:
    """OpenAI's legacy logprobs of some tokens: each token's text, logprob, the top alternatives
    (the sampled token among them, as vLLM does) and its character offset; and the next offset."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = names.text(lp.token_id)
        tokens.append(text)
        values.append(_finite(lp.logprob))
        top = {text: _finite(lp.logprob)}
        for token_id, value in lp.top:
            top.setdefault(names.text(token_id), _finite(value))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def chat_logprobs(logprobs: Sequence[TokenLogprob], names: TokenText, top: int) -> dict[str, Any]:
    """OpenAI's chat logprobs: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def entry(token_id: int, value: float) -> dict[str, Any]:
        return {"token": names.text(token_id), "logprob": _finite(value), "bytes": names.bytes(token_id)}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top[:top]]}
            for lp in logprobs
        ]
    }


# ---- answers -------------------------------------------------------------------------------------


@attrs.define
class _Choice:
    """One choice of an answer as it builds up (prompt-major: index = prompt × n + sample)."""

    index: int
    prompt: int
    text: list[str] = attrs.field(factory=list)
    token_ids: list[int] = attrs.field(factory=list)
    logprobs: list[TokenLogprob] = attrs.field(factory=list)
    finish_reason: str | None = None
    started: bool = False  # a chunk of it has been sent (the first carries role / echo / prompt ids)
    offset: int = 0  # the next token's text_offset (completions' logprobs)


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


@attrs.frozen
class AnswerSetup:
    """What an answer needs to know of its request."""

    id: str  # cmpl-... / chatcmpl-...
    model: str  # the served model's name
    n: int
    prompt_ids: tuple[tuple[int, ...] | None, ...]  # per prompt; None: not tokenized here (not shown)
    names: TokenText
    stream: StreamOptions | None
    return_token_ids: bool


class _Answer:
    """What completions and chat share: choices per prompt, usage, and the two ways to write them
    (a stream of chunks, or one body at the end). The subclasses shape a choice."""

    object_whole = ""
    object_chunk = ""

    def __init__(self, setup: AnswerSetup) -> None:
        self.id = setup.id
        self.model = setup.model
        self.created = int(time.time())
        self.n = setup.n
        self.prompt_ids = setup.prompt_ids
        self.names = setup.names
        self.stream = setup.stream
        self.return_token_ids = setup.return_token_ids
        self.choices = [_Choice(p * self.n + s, p) for p in range(len(self.prompt_ids)) for s in range(self.n)]
        self.usage = [Usage(0, 0)] * len(self.prompt_ids)

    def total_usage(self) -> Usage:
        return Usage(sum(u.prompt_tokens for u in self.usage), sum(u.completion_tokens for u in self.usage))

    def header(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def add(self, prompt: int, delta: GenerationDelta) -> dict[str, Any] | None:
        """Fold one delta in; the chunk to stream for it (None: it holds nothing to show)."""
        self.usage[prompt] = delta.usage
        parts = []
        for s in delta.samples:
            choice = self.choices[prompt * self.n + s.index]
            if s.finish_reason is not None:
                choice.finish_reason = FINISH_REASONS[s.finish_reason]
            if self.stream is None:  # kept for the body at the end; a stream sends it on at once
                choice.text.append(s.text)
                choice.token_ids.extend(s.token_ids)
                choice.logprobs.extend(s.logprobs or ())
            elif s.text or s.finish_reason or (s.token_ids and self.shows_ids(s)):
                parts.append(self.chunk_choice(choice, s))
                choice.started = True
        if not parts:
            return None
        chunk = {**self.header(self.object_chunk), "choices": parts}
        if self.stream is not None and self.stream.continuous_usage_stats:
            chunk["usage"] = usage_json(self.total_usage())
        return chunk

    def shows_ids(self, s: SampleOutput) -> bool:
        """Tokens without text (bytes held back) still make a chunk when the client sees ids or logprobs."""
        return self.return_token_ids or s.logprobs is not None

    def usage_chunk(self) -> dict[str, Any]:
        return {**self.header(self.object_chunk), "choices": [], "usage": usage_json(self.total_usage())}

    def whole(self) -> dict[str, Any]:
        body = {**self.header(self.object_whole), "choices": [self.whole_choice(c) for c in self.choices]}
        body["usage"] = usage_json(self.total_usage())
        return body

    def chunk_choice(self, choice: _Choice, s: SampleOutput) -> dict[str, Any]:
        raise NotImplementedError

    def whole_choice(self, choice: _Choice) -> dict[str, Any]:
        raise NotImplementedError


class CompletionAnswer(_Answer):
    object_whole = "text_completion"
    object_chunk = "text_completion"  # OpenAI's stream chunks of completions say so too

    def __init__(self, setup: AnswerSetup, echo: Sequence[str] | None, logprobs: bool) -> None:
        super().__init__(setup)
        self.echo = echo  # each prompt's text, when echoed
        self.with_logprobs = logprobs
        if echo is not None:
            for c in self.choices:
                c.offset = len(echo[c.prompt])

    def chunk_choice(self, choice: _Choice, s: SampleOutput) -> dict[str, Any]:
        text = s.text if choice.started or self.echo is None else self.echo[choice.prompt] + s.text
        out: dict[str, Any] = {"index": choice.index, "text": text, "logprobs": None}
        if self.with_logprobs:
            out["logprobs"], choice.offset = completion_logprobs(s.logprobs or (), self.names, choice.offset)
        out["finish_reason"] = choice.finish_reason if s.finish_reason is not None else None
        if self.return_token_ids:
            if not choice.started:
                out["prompt_token_ids"] = list(self.prompt_ids[choice.prompt] or ())
            out["token_ids"] = list(s.token_ids)
        return out

    def whole_choice(self, choice: _Choice) -> dict[str, Any]:
        text = "".join(choice.text)
        if self.echo is not None:
            text = self.echo[choice.prompt] + text
        out: dict[str, Any] = {"index": choice.index, "text": text, "logprobs": None}
        if self.with_logprobs:
            out["logprobs"], choice.offset = completion_logprobs(choice.logprobs, self.names, choice.offset)
        out["finish_reason"] = choice.finish_reason
        if self.return_token_ids:
            out["prompt_token_ids"] = list(self.prompt_ids[choice.prompt] or ())
            out["token_ids"] = choice.token_ids
        return out


class ChatAnswer(_Answer):
    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def __init__(self, setup: AnswerSetup, logprobs: bool, top_logprobs: int) -> None:
        super().__init__(setup)
        self.with_logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.sent_prompt_ids = False

    def add(self, prompt: int, delta: GenerationDelta) -> dict[str, Any] | None:
        chunk = super().add(prompt, delta)
        if chunk is not None and self.return_token_ids and not self.sent_prompt_ids:
            chunk["prompt_token_ids"] = list(self.prompt_ids[0] or ())  # vLLM: once, in the first chunk
            self.sent_prompt_ids = True
        return chunk

    def chunk_choice(self, choice: _Choice, s: SampleOutput) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if not choice.started:
            delta["role"] = "assistant"
        if s.text or not choice.started:
            delta["content"] = s.text
        out: dict[str, Any] = {"index": choice.index, "delta": delta, "logprobs": None}
        if self.with_logprobs:
            out["logprobs"] = chat_logprobs(s.logprobs or (), self.names, self.top_logprobs)
        out["finish_reason"] = choice.finish_reason if s.finish_reason is not None else None
        if self.return_token_ids:
            out["token_ids"] = list(s.token_ids)
        return out

    def whole_choice(self, choice: _Choice) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": choice.index,
            "message": {"role": "assistant", "content": "".join(choice.text)},
            "logprobs": chat_logprobs(choice.logprobs, self.names, self.top_logprobs) if self.with_logprobs else None,
            "finish_reason": choice.finish_reason,
        }
        if self.return_token_ids:
            out["token_ids"] = choice.token_ids
        return out

    def whole(self) -> dict[str, Any]:
        body = super().whole()
        if self.return_token_ids:
            body["prompt_token_ids"] = list(self.prompt_ids[0] or ())
        return body


# ---- running the generations ---------------------------------------------------------------------

_Item = tuple[int, GenerationDelta | Exception]


async def _pump(index: int, generation: Generation, send: trio.MemorySendChannel[_Item], go: trio.Event) -> None:
    """Iterate one prompt's generation into the shared channel. After its first delta it waits
    for ``go`` (every prompt accepted, the answer begun): until then nothing piles up here, the
    service merges the tokens. Leaving, however, closes the generation: a request still running
    is aborted and its KV blocks freed."""
    async with send, generation:
        try:
            async for delta in generation:
                await send.send((index, delta))
                await go.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # the answer was abandoned
            return
        except Exception as exc:  # refused (MiniVllmError) or a bug: the answer decides
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await send.send((index, exc))


async def run_generations(
    generations: Sequence[Generation],
    on_start: Callable[[], Awaitable[None]],
    on_delta: Callable[[int, GenerationDelta], Awaitable[None]],
    retry_after: float,
) -> None:
    """Iterate every generation at once. ``on_start`` runs once each has been accepted and has
    its first delta, then ``on_delta`` for each delta (those held meanwhile first), in arrival
    order. A rejection is raised as itself; a sample that ends with ``error`` as an HttpError.
    Either way, and on cancellation, every generation is closed (aborted) before this returns."""
    send, receive = trio.open_memory_channel[_Item](0)
    go = trio.Event()
    with receive:
        async with open_task_group() as nursery:
            async with send:
                for i, generation in enumerate(generations):
                    nursery.start_soon(_pump, i, generation, send.clone(), go)
            waiting = set(range(len(generations)))
            held: list[tuple[int, GenerationDelta]] = []
            async for index, item in receive:
                if isinstance(item, Exception):
                    raise item
                if any(s.finish_reason == "error" for s in item.samples):
                    raise failure_error(item.error, retry_after)
                if not waiting:
                    await on_delta(index, item)
                    continue
                held.append((index, item))
                waiting.discard(index)
                if not waiting:
                    await on_start()
                    go.set()
                    for i, delta in held:
                        await on_delta(i, delta)
                    held.clear()


# ---- the routes ----------------------------------------------------------------------------------


@attrs.frozen
class _Encoded:
    """One prompt as the service takes it, and its token ids when the answer shows them."""

    prompt: Prompt | None  # None: ``messages`` go to the chat template
    ids: tuple[int, ...] | None


class OpenAIApi:
    """The routes' shared state: the service, the fair share, and each model's token texts."""

    def __init__(self, service: Service, admission: Admission | None, retry_after: float, max_body_bytes: int) -> None:
        self._service = service
        self._admission = admission
        self._retry_after = retry_after
        self._max_body_bytes = max_body_bytes
        self._created = int(time.time())
        self._names: dict[str, TokenText] = {}

    def routes(self) -> Routes:
        return {
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("GET", "/v1/models"): self.models,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
        }

    # ---- routes ---------------------------------------------------------------------------------
    async def completions(self, request: HttpRequest, responder: HttpResponder) -> None:
        await self._answer(responder, lambda: self._completions(request, responder))

    async def chat_completions(self, request: HttpRequest, responder: HttpResponder) -> None:
        await self._answer(responder, lambda: self._chat(request, responder))

    async def models(self, request: HttpRequest, responder: HttpResponder) -> None:
        await self._answer(responder, lambda: send_json(responder, 200, self.models_json()))

    async def tokenize(self, request: HttpRequest, responder: HttpResponder) -> None:
        await self._answer(responder, lambda: self._tokenize(request, responder))

    async def detokenize(self, request: HttpRequest, responder: HttpResponder) -> None:
        await self._answer(responder, lambda: self._detokenize(request, responder))

    def models_json(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": m.name, "object": "model", "created": self._created, "owned_by": OWNED_BY,
                    "root": m.name, "parent": None, "max_model_len": m.max_model_len,
                }
                for m in self._service.models()
            ],
        }

    async def _answer(self, responder: HttpResponder, handle: Callable[[], Awaitable[None]]) -> None:
        """Run one route; whatever goes wrong becomes an OpenAI-shaped error (in-band once streaming)."""
        try:
            await handle()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the client went away mid-answer: nobody to tell
        except HttpError as exc:
            await self._fail(responder, exc)
        except MiniVllmError as exc:
            await self._fail(responder, http_error(exc, self._retry_after))
        except Exception as exc:  # a bug costs this request a 500, never the server
            log.exception("HTTP route failed")
            await self._fail(responder, http_error(exc, self._retry_after))

    async def _fail(self, responder: HttpResponder, error: HttpError) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if not responder.started:
                await send_error(responder, error)
                return
            await responder.write(_sse_error(error))
            await responder.write(SSE_DONE)
            await responder.end_stream()

    # ---- completions and chat -------------------------------------------------------------------
    async def _completions(self, request: HttpRequest, responder: HttpResponder) -> None:
        parsed = parse_completion_request(parse_body(request.body, self._max_body_bytes))
        model = self._service.resolve_model(parsed.model)
        encoder = self._service.prompt_encoder(model)
        limit = self._service.config.max_pending_per_model
        if len(parsed.prompts) > limit:
            raise _error(
                "invalid_request", f"prompt has {len(parsed.prompts)} prompts, more than model {model!r} can queue "
                f"({limit}, the server's limit of pending requests): send fewer at a time", "prompt",
            )
        params = self._params(parsed.params, parsed.max_tokens_given, encoder)
        echo = [await self._echo_text(encoder, p) for p in parsed.prompts] if parsed.echo else None
        encoded = [await self._encode(encoder, p, parsed.return_token_ids) for p in parsed.prompts]
        setup = AnswerSetup(
            f"cmpl-{uuid.uuid4().hex}", model, params.n, tuple(e.ids for e in encoded), self._token_text(encoder),
            parsed.stream, parsed.return_token_ids,
        )
        answer = CompletionAnswer(setup, echo, params.logprobs is not None)
        await self._generate(request, responder, answer, model, params, parsed.priority, encoded, ())

    async def _chat(self, request: HttpRequest, responder: HttpResponder) -> None:
        parsed = parse_chat_request(parse_body(request.body, self._max_body_bytes))
        model = self._service.resolve_model(parsed.model)
        encoder = self._service.prompt_encoder(model)
        params = self._params(parsed.params, parsed.max_tokens_given, encoder)
        if parsed.return_token_ids:  # the template is applied here, to know the prompt's ids
            ids = tuple(await _in_thread_if_long(encoder.apply_chat_template, list(parsed.messages), parsed.messages))
            encoded = _Encoded(ids, ids)
        else:
            encoded = _Encoded(None, None)
        setup = AnswerSetup(
            f"chatcmpl-{uuid.uuid4().hex}", model, params.n, (encoded.ids,), self._token_text(encoder), parsed.stream,
            parsed.return_token_ids,
        )
        answer = ChatAnswer(setup, parsed.logprobs, parsed.top_logprobs)
        await self._generate(request, responder, answer, model, params, parsed.priority, [encoded], parsed.messages)

    def _params(self, params: SamplingParams, max_tokens_given: bool, encoder: PromptEncoder) -> SamplingParams:
        if max_tokens_given:
            return params
        try:
            return attrs.evolve(params, max_tokens=default_max_tokens(params.n, encoder.max_model_len, self._service.config))
        except ConfigError as exc:  # min_tokens above the default max_tokens
            raise _error("invalid_field", *_renamed(str(exc), {})) from None

    async def _echo_text(self, encoder: PromptEncoder, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if encoder.tokenizer is None:
            raise _error(
                "invalid_request", f"echo of token ids needs a tokenizer, and model {encoder.model!r} has none", "echo"
            )
        encoder.check_prompt(prompt)  # ids outside the vocabulary would fail the decode
        return str(await _in_thread_if_long(encoder.tokenizer.decode, list(prompt), prompt))

    async def _encode(self, encoder: PromptEncoder, prompt: Prompt, need_ids: bool) -> _Encoded:
        if not need_ids:
            return _Encoded(prompt, None)
        if isinstance(prompt, tuple):
            return _Encoded(prompt, prompt)
        ids = tuple(await _in_thread_if_long(encoder.tokenize, prompt, prompt))
        return _Encoded(ids, ids)

    async def _generate(
        self, request: HttpRequest, responder: HttpResponder, answer: _Answer, model: str, params: SamplingParams,
        priority: Any, encoded: Sequence[_Encoded], messages: ChatMessages,
    ) -> None:
        """Take the client's places in the model's queue, run the prompts, write the answer."""
        taken = 0
        try:
            for _ in encoded:
                self._take_place(request.client, model)
                taken += 1
            # The service's request ids are the answer's id and the prompt's index ("cmpl-...-0").
            common = {"model": model, "params": params, "priority": priority}
            generations = [
                self._service.chat(messages, request_id=f"{answer.id}-{i}", **common)
                if e.prompt is None else self._service.generate(e.prompt, request_id=f"{answer.id}-{i}", **common)
                for i, e in enumerate(encoded)
            ]
            if answer.stream is None:
                await self._whole(responder, answer, generations)
            else:
                await self._streamed(responder, answer, generations)
        finally:
            if self._admission is not None:
                for _ in range(taken):
                    self._admission.give_back(request.client, model)

    def _take_place(self, client: str, model: str) -> None:
        if self._admission is None:
            return
        refusal = self._admission.refusal(client, model)
        if refusal is not None:
            raise HttpError(
                429, refusal, "rate_limit_error", "overloaded",
                (("Retry-After", retry_after_value(self._retry_after)),),
            )
        self._admission.take(client, model)

    async def _whole(self, responder: HttpResponder, answer: _Answer, generations: Sequence[Generation]) -> None:
        async def nothing() -> None:
            pass

        async def add(prompt: int, delta: GenerationDelta) -> None:
            answer.add(prompt, delta)

        await run_generations(generations, nothing, add, self._retry_after)
        await send_json(responder, 200, answer.whole())

    async def _streamed(self, responder: HttpResponder, answer: _Answer, generations: Sequence[Generation]) -> None:
        async def start() -> None:
            await responder.start_stream(200, SSE_CONTENT_TYPE, (("Cache-Control", "no-cache"),))

        async def add(prompt: int, delta: GenerationDelta) -> None:
            chunk = answer.add(prompt, delta)
            if chunk is not None:
                await responder.write(_sse(chunk))

        await run_generations(generations, start, add, self._retry_after)
        if answer.stream is not None and answer.stream.include_usage:
            await responder.write(_sse(answer.usage_chunk()))
        await responder.write(SSE_DONE)
        await responder.end_stream()

    def _token_text(self, encoder: PromptEncoder) -> TokenText:
        names = self._names.get(encoder.model)
        if names is None:
            names = self._names[encoder.model] = TokenText(encoder.tokenizer)
        return names

    # ---- tokenize and detokenize ----------------------------------------------------------------
    async def _tokenize(self, request: HttpRequest, responder: HttpResponder) -> None:
        model, what, add_special, token_strs = parse_tokenize_request(parse_body(request.body, self._max_body_bytes))
        encoder = self._service.prompt_encoder(model)
        if isinstance(what, str):
            ids = await _in_thread_if_long(_tokenize_text, (encoder, what, add_special), what)
        else:
            ids = await _in_thread_if_long(encoder.apply_chat_template, list(what), what)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": encoder.max_model_len, "tokens": list(ids),
                                "token_strs": None}
        if token_strs and encoder.tokenizer is not None:
            body["token_strs"] = list(encoder.tokenizer.convert_ids_to_tokens(list(ids)))
        await send_json(responder, 200, body)

    async def _detokenize(self, request: HttpRequest, responder: HttpResponder) -> None:
        model, tokens = parse_detokenize_request(parse_body(request.body, self._max_body_bytes))
        encoder = self._service.prompt_encoder(model)
        if encoder.tokenizer is None:
            raise _error("invalid_request", f"model {encoder.model!r} has no tokenizer (dummy preset): nothing to "
                         "detokenize with")
        bad = [t for t in tokens if not 0 <= t < encoder.vocab_size]
        if bad:
            raise _error("invalid_request", f"tokens must be token ids in [0, {encoder.vocab_size}) (the model's "
                         f"vocabulary), got {show_value(bad[:5])}", "tokens")
        text = await _in_thread_if_long(encoder.tokenizer.decode, tokens, tokens)
        await send_json(responder, 200, {"prompt": text})


def _tokenize_text(job: tuple[PromptEncoder, str, bool]) -> list[int]:
    encoder, text, add_special = job
    if add_special or encoder.tokenizer is None:  # (the encoder says why a dummy preset cannot)
        return encoder.tokenize(text)
    at = lone_surrogate(text)
    if at is not None:
        raise InvalidRequest(f"prompt must be valid Unicode text: it has a lone surrogate at index {at}")
    return list(encoder.tokenizer.encode(text, add_special_tokens=False))


async def _in_thread_if_long(work: Callable[[Any], Any], arg: Any, size_of: Sequence[Any]) -> Any:
    """``work(arg)`` here when ``size_of`` is short; long inputs go to a worker thread (as the
    ingress does) so that a megabyte prompt cannot stall the other clients."""
    if _size(size_of) <= INLINE_TOKENIZE_CHARS:
        return work(arg)
    return await trio.to_thread.run_sync(work, arg)


def _size(value: Sequence[Any]) -> int:
    if isinstance(value, str):
        return len(value)
    return sum(len(m.get("content", "")) if isinstance(m, dict) else 1 for m in value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def openai_routes(
    service: Service,
    *,
    admission: Admission | None,
    retry_after: float,
    max_body_bytes: int,
) -> Routes:
    """The OpenAI-compatible routes over ``service``. ``admission``: the server's per-client fair
    share (None: off); ``retry_after``: seconds sent with 429 and 503; ``max_body_bytes``: the
    largest body a route reads. The service's request limits (``service.config``) bound the
    default ``max_tokens`` and the prompts of one request."""
    return OpenAIApi(service, admission, retry_after, max_body_bytes).routes()


__all__ = [
    "CHAT_FIELDS",
    "COMPLETION_FIELDS",
    "FINISH_REASONS",
    "STATUSES",
    "AnswerSetup",
    "ChatAnswer",
    "ChatRequest",
    "CompletionAnswer",
    "CompletionRequest",
    "OpenAIApi",
    "StreamOptions",
    "TokenText",
    "chat_logprobs",
    "completion_logprobs",
    "default_max_tokens",
    "error_code",
    "failure_error",
    "http_error",
    "openai_routes",
    "parse_body",
    "parse_chat_request",
    "parse_completion_request",
    "parse_detokenize_request",
    "parse_messages",
    "parse_prompts",
    "parse_tokenize_request",
    "retry_after_value",
    "run_generations",
]
