"""The JSON message protocol over WebSocket text frames: parsing, validation, frame builders.

Pure functions and frozen records, no I/O, so every rule is unit-tested without a socket. A bad
client frame raises ``ProtocolError`` with a stable ``code`` and a message that names the problem;
the server turns it into an ``error`` frame and keeps the connection open. See docs/protocol.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from mini_vllm.engine.errors import ConfigError
from mini_vllm.engine.outputs import TokenLogprob
from mini_vllm.engine.sampling_params import INT64_MAX, INT64_MIN, SamplingParams, lone_surrogate

MAX_ID_LENGTH = 256
MAX_MODEL_NAME_LENGTH = 1024  # served names are short; this only keeps the unknown_model answer short
MAX_ROLE_LENGTH = 256
DEFAULT_MAX_FRAME_BYTES = 1 << 20

# Every error code the server sends. Clients may switch on these; they never change meaning.
ERROR_CODES: Mapping[str, str] = {
    "binary_frame": "a binary frame was sent; the protocol uses JSON text frames",
    "frame_too_large": "the frame exceeds the server's size limit",
    "invalid_json": "the frame is not valid JSON",
    "invalid_frame": "the frame is not a JSON object",
    "unknown_type": "the 'type' field names no known message",
    "missing_field": "a required field is absent",
    "unknown_field": "a field the message does not have (often a typo)",
    "invalid_field": "a field has the wrong type or an out-of-range value",
    "unknown_model": "no model of that name is served",
    "invalid_request": "the model cannot serve the request (e.g. prompt too long for the model)",
    "duplicate_id": "a request with this id is still in flight on this connection",
    "too_many_requests": "the connection has as many requests in flight as it may",
    "unknown_id": "cancel names no request in flight on this connection",
    "overloaded": "the model's queue is full; retry later",
    "shutting_down": "the server is stopping and takes no new requests",
    "model_error": "the model failed while running the request",
    "engine_core_exited": "the engine core process running the model exited (crashed or was killed)",
    "internal": "an unexpected server error (a bug; the connection stays usable)",
}

ClientFinishReason = Literal["stop", "length", "cancelled", "error"]
_SAMPLING_FIELDS = frozenset(f.name for f in attrs.fields(SamplingParams))
_REQUEST_FIELDS = {
    "generate": frozenset({"type", "id", "model", "prompt", "prompt_token_ids", "priority"}),
    "chat": frozenset({"type", "id", "model", "messages", "priority"}),
}
_SIMPLE_FIELDS = {
    "cancel": frozenset({"type", "id"}),
    "models": frozenset({"type", "id"}),
    "stats": frozenset({"type", "id", "reset_loop_lag"}),
}
_TYPES = "generate, chat, cancel, models, stats"
# Sampling fields that hold lists in JSON but tuples in SamplingParams (``stop`` may be one string).
_LIST_FIELDS = frozenset({"stop", "stop_token_ids"})


class ProtocolError(Exception):
    """A client frame that cannot be served; becomes an ``error`` frame, never a dropped connection."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


# ---- client -> server -------------------------------------------------------------------------


@attrs.frozen
class ChatMessage:
    role: str
    content: str


@attrs.frozen
class GenerateFrame:
    id: str
    model: str | None
    prompt: str | None
    prompt_token_ids: tuple[int, ...] | None  # exactly one of prompt / prompt_token_ids is set
    params: SamplingParams
    priority: int = 0


@attrs.frozen
class ChatFrame:
    id: str
    model: str | None
    messages: tuple[ChatMessage, ...]
    params: SamplingParams
    priority: int = 0


@attrs.frozen
class CancelFrame:
    id: str


@attrs.frozen
class ModelsFrame:
    id: str | None  # echoed in the reply, so a client can match replies to questions


@attrs.frozen
class StatsFrame:
    """The server's counters; ``reset_loop_lag`` starts a new loop-lag window (a benchmark's run)."""

    id: str | None
    reset_loop_lag: bool = False


ClientFrame = GenerateFrame | ChatFrame | CancelFrame | ModelsFrame | StatsFrame


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN and Infinity by default; they are not JSON and no field wants them.
    raise ValueError(f"{name} is not valid JSON")


def decode_json(message: str | bytes, max_bytes: int) -> Any:
    """The frame's JSON value; binary, oversized and malformed frames raise ProtocolError."""
    if isinstance(message, bytes):
        raise ProtocolError("binary_frame", f"binary frames are not accepted ({len(message)} bytes); send JSON text")
    size = len(message.encode("utf-8", errors="replace"))
    if size > max_bytes:
        raise ProtocolError("frame_too_large", f"frame of {size} bytes exceeds the limit of {max_bytes} bytes")
    try:
        return json.loads(message, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ProtocolError("invalid_json", f"frame is not valid JSON: {exc}") from None


def parse_client_frame(message: str | bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> ClientFrame:
    """Validate one client frame completely, or raise ProtocolError naming the first problem."""
    raw = decode_json(message, max_bytes)
    if not isinstance(raw, dict):
        raise ProtocolError("invalid_frame", f"a frame must be a JSON object, got {json_type(raw)}")
    request_id = _readable_id(raw.get("id"))  # for errors found before the id itself is checked
    kind = raw.get("type")
    if kind is None:
        raise ProtocolError(
            "missing_field", f"missing field 'type' (one of: {_TYPES})", request_id
        )
    if not isinstance(kind, str) or kind not in {*_REQUEST_FIELDS, *_SIMPLE_FIELDS}:
        raise ProtocolError(
            "unknown_type", f"unknown type {kind!r}; expected one of: {_TYPES}", request_id
        )
    if kind in _SIMPLE_FIELDS:
        _check_unknown(raw, _SIMPLE_FIELDS[kind], kind, request_id)
        if kind == "models":
            return ModelsFrame(_parse_id(raw, required=False))
        if kind == "stats":
            reset = raw.get("reset_loop_lag", False)
            if not isinstance(reset, bool):
                raise ProtocolError(
                    "invalid_field", f"'reset_loop_lag' must be true or false, got {json_type(reset)}", request_id
                )
            return StatsFrame(_parse_id(raw, required=False), reset)
        return CancelFrame(_parse_id(raw, required=True) or "")
    _check_unknown(raw, _REQUEST_FIELDS[kind] | _SAMPLING_FIELDS, kind, request_id)
    rid = _parse_id(raw, required=True) or ""
    model = _optional_str(raw, "model", rid, MAX_MODEL_NAME_LENGTH)
    priority = raw.get("priority", 0)
    if not _is_int(priority) or not INT64_MIN <= priority <= INT64_MAX:
        raise ProtocolError(
            "invalid_field", f"'priority' must be an integer in [-2**63, 2**63-1], got {_short(priority)}", rid
        )
    params = parse_sampling(raw, rid)
    if kind == "chat":
        return ChatFrame(rid, model, _parse_messages(raw, rid), params, priority)
    prompt, ids = _parse_prompt(raw, rid)
    return GenerateFrame(rid, model, prompt, ids, params, priority)


def _check_unknown(raw: dict[str, Any], allowed: frozenset[str], kind: str, rid: str | None) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        named = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ProtocolError(
            "unknown_field", f"unknown field(s) for {kind!r}: {named}; allowed: {', '.join(sorted(allowed))}", rid
        )


def _readable_id(rid: object) -> str | None:
    """``rid`` if it is a valid id: only such an id is echoed (a lone surrogate in an echoed id
    would make the reply frame impossible to encode, and the connection would drop)."""
    if isinstance(rid, str) and 1 <= len(rid) <= MAX_ID_LENGTH and lone_surrogate(rid) is None:
        return rid
    return None


def _parse_id(raw: dict[str, Any], required: bool) -> str | None:
    if "id" not in raw:
        if required:
            raise ProtocolError("missing_field", f"missing field 'id' (a string you choose) in {raw['type']!r}")
        return None
    rid = raw["id"]
    if not isinstance(rid, str) or not 1 <= len(rid) <= MAX_ID_LENGTH:
        raise ProtocolError(
            "invalid_field", f"'id' must be a string of 1 to {MAX_ID_LENGTH} characters, got {_short(rid)}"
        )
    _check_text(rid, "id", None)
    return rid


def _check_text(value: str, name: str, rid: str | None) -> None:
    """A string field must be valid Unicode: JSON lets ``"\\ud800"`` through as a lone surrogate."""
    at = lone_surrogate(value)
    if at is not None:
        raise ProtocolError(
            "invalid_field", f"{name!r} must be valid Unicode text (UTF-8): a lone surrogate is at index {at}", rid
        )


def _optional_str(raw: dict[str, Any], name: str, rid: str, max_length: int) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_length:
        raise ProtocolError(
            "invalid_field", f"{name!r} must be a string of at most {max_length} characters, got {_short(value)}", rid
        )
    _check_text(value, name, rid)
    return value


def _parse_prompt(raw: dict[str, Any], rid: str) -> tuple[str | None, tuple[int, ...] | None]:
    has_text, has_ids = "prompt" in raw, "prompt_token_ids" in raw
    if has_text == has_ids:
        what = "both" if has_text else "neither"
        raise ProtocolError(
            "missing_field" if not has_text else "invalid_field",
            f"give exactly one of 'prompt' and 'prompt_token_ids' (got {what})",
            rid,
        )
    if has_text:
        prompt = raw["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise ProtocolError("invalid_field", f"'prompt' must be a non-empty string, got {_short(prompt)}", rid)
        _check_text(prompt, "prompt", rid)
        return prompt, None
    ids = raw["prompt_token_ids"]
    # At most 64 bits here; the vocabulary bound needs the model, and the ingress checks it.
    if not isinstance(ids, list) or not ids or not all(_is_int(t) and 0 <= t <= INT64_MAX for t in ids):
        raise ProtocolError(
            "invalid_field",
            f"'prompt_token_ids' must be a non-empty list of integers >= 0 (token ids), got {_short(ids)}",
            rid,
        )
    return None, tuple(ids)


def _parse_messages(raw: dict[str, Any], rid: str) -> tuple[ChatMessage, ...]:
    if "messages" not in raw:
        raise ProtocolError("missing_field", "missing field 'messages' (a list of {role, content})", rid)
    messages = raw["messages"]
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("invalid_field", f"'messages' must be a non-empty list, got {_short(messages)}", rid)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ProtocolError(
                "invalid_field",
                f"messages[{i}] must be an object with exactly 'role' and 'content', got {_short(m)}",
                rid,
            )
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not 1 <= len(role) <= MAX_ROLE_LENGTH:
            raise ProtocolError(
                "invalid_field",
                f"messages[{i}].role must be a non-empty string of at most {MAX_ROLE_LENGTH} characters, "
                f"got {_short(role)}",
                rid,
            )
        if not isinstance(content, str):  # (content parts, OpenAI's list form, are not supported)
            raise ProtocolError("invalid_field", f"messages[{i}].content must be a string, got {json_type(content)}", rid)
        _check_text(role, f"messages[{i}].role", rid)
        _check_text(content, f"messages[{i}].content", rid)
        out.append(ChatMessage(role, content))
    return tuple(out)


def parse_sampling(raw: dict[str, Any], rid: str) -> SamplingParams:
    """The sampling fields of ``raw`` (others ignored) as SamplingParams; ProtocolError names the bad one.
    Both protocols use it: a WebSocket frame and an OpenAI request body are checked alike."""
    fields = {k: v for k, v in raw.items() if k in _SAMPLING_FIELDS}
    for name in _LIST_FIELDS & fields.keys():
        value = fields[name]
        # SamplingParams' converter would iterate a dict's keys, or a string's characters as ids
        if not isinstance(value, list | str) or (name == "stop_token_ids" and isinstance(value, str)):
            raise ProtocolError("invalid_field", f"{name!r} must be a list, got {json_type(value)}", rid)
    try:
        return SamplingParams.from_dict(fields)
    except ConfigError as exc:
        raise ProtocolError("invalid_field", str(exc), rid) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def json_type(value: object) -> str:
    """The JSON name of ``value``'s type, for error messages ("got a list")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _short(value: object, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- server -> client ---------------------------------------------------------------------------


def _dump(frame: dict[str, Any]) -> str:
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def logprobs_json(logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]} for lp in logprobs]


def token_frame(
    request_id: str, index: int, text: str, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob] | None
) -> str:
    frame: dict[str, Any] = {
        "type": "token",
        "id": request_id,
        "index": index,
        "text": text,
        "token_ids": list(token_ids),
    }
    if logprobs is not None:
        frame["logprobs"] = logprobs_json(logprobs)
    return _dump(frame)


def done_frame(
    request_id: str,
    index: int,
    finish_reason: ClientFinishReason,
    prompt_tokens: int,
    completion_tokens: int,
    error: tuple[str, str] | None = None,
) -> str:
    frame: dict[str, Any] = {
        "type": "done",
        "id": request_id,
        "index": index,
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    if error is not None:
        frame["error"] = {"code": error[0], "message": error[1]}
    return _dump(frame)


def error_frame(request_id: str | None, code: str, message: str) -> str:
    # The one frame that can carry what a client sent: keep it encodable whatever it holds (a
    # frame with a lone surrogate cannot be sent, and the connection would drop instead).
    if request_id is not None and lone_surrogate(request_id) is not None:
        request_id = None
    if lone_surrogate(message) is not None:
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return _dump({"type": "error", "id": request_id, "code": code, "message": message})


@attrs.frozen
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    has_chat_template: bool
    available: bool = True  # False once the model's engine core has exited (older servers omit it)


def models_frame(request_id: str | None, models: Sequence[ModelInfo]) -> str:
    frame: dict[str, Any] = {"type": "models", "models": [attrs.asdict(m) for m in models]}
    if request_id is not None:
        frame["id"] = request_id
    return _dump(frame)


def stats_frame(request_id: str | None, stats: Mapping[str, Any]) -> str:
    frame: dict[str, Any] = {"type": "stats", **stats}
    if request_id is not None:
        frame["id"] = request_id
    return _dump(frame)


# ---- server frames as the client reads them -----------------------------------------------------


@attrs.frozen
class TokenEvent:
    id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None


@attrs.frozen
class Usage:
    prompt_tokens: int
    completion_tokens: int


@attrs.frozen
class DoneEvent:
    id: str
    index: int
    finish_reason: ClientFinishReason
    usage: Usage
    error_code: str | None = None
    error_message: str | None = None


@attrs.frozen
class ErrorEvent:
    id: str | None
    code: str
    message: str


@attrs.frozen
class ModelsEvent:
    id: str | None
    models: tuple[ModelInfo, ...]


@attrs.frozen
class StatsEvent:
    id: str | None
    stats: dict[str, Any]  # "server", "service" (ServerStats and ServiceStats as JSON objects)


ServerEvent = TokenEvent | DoneEvent | ErrorEvent | ModelsEvent | StatsEvent


class MalformedServerFrame(ValueError):
    """The server sent something this client does not understand (version skew or a bug)."""


def parse_server_frame(message: str | bytes) -> ServerEvent:
    """Parse a frame the server sent; raises MalformedServerFrame if it does not follow the protocol."""
    try:
        raw = json.loads(message)
        kind = raw["type"]
        if kind == "token":
            logprobs = raw.get("logprobs")
            return TokenEvent(
                raw["id"],
                int(raw["index"]),
                str(raw["text"]),
                tuple(int(t) for t in raw["token_ids"]),
                None
                if logprobs is None
                else tuple(
                    TokenLogprob(
                        int(lp["token_id"]), float(lp["logprob"]), tuple((int(a), float(b)) for a, b in lp["top"])
                    )
                    for lp in logprobs
                ),
            )
        if kind == "done":
            error = raw.get("error") or {}
            usage = raw["usage"]
            return DoneEvent(
                raw["id"],
                int(raw["index"]),
                raw["finish_reason"],
                Usage(int(usage["prompt_tokens"]), int(usage["completion_tokens"])),
                error.get("code"),
                error.get("message"),
            )
        if kind == "error":
            return ErrorEvent(raw.get("id"), str(raw["code"]), str(raw["message"]))
        if kind == "models":
            return ModelsEvent(raw.get("id"), tuple(ModelInfo(**m) for m in raw["models"]))
        if kind == "stats":
            return StatsEvent(raw.get("id"), {k: v for k, v in raw.items() if k not in ("type", "id")})
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedServerFrame(f"malformed server frame ({exc!r}): {str(message)[:200]}") from None
    raise MalformedServerFrame(f"unknown server frame type {kind!r}")


# ---- client -> server, as the bundled client builds them ----------------------------------------


def generate_request(
    request_id: str,
    *,
    prompt: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    model: str | None = None,
    priority: int = 0,
    sampling: Mapping[str, Any] | None = None,
) -> str:
    frame: dict[str, Any] = {"type": "generate", "id": request_id}
    if model is not None:
        frame["model"] = model
    if prompt is not None:
        frame["prompt"] = prompt
    if prompt_token_ids is not None:
        frame["prompt_token_ids"] = list(prompt_token_ids)
    if priority:
        frame["priority"] = priority
    frame.update(_sampling_json(sampling))
    return _dump(frame)


def chat_request(
    request_id: str,
    messages: Sequence[Mapping[str, str]],
    *,
    model: str | None = None,
    priority: int = 0,
    sampling: Mapping[str, Any] | None = None,
) -> str:
    frame: dict[str, Any] = {"type": "chat", "id": request_id, "messages": [dict(m) for m in messages]}
    if model is not None:
        frame["model"] = model
    if priority:
        frame["priority"] = priority
    frame.update(_sampling_json(sampling))
    return _dump(frame)


def cancel_request(request_id: str) -> str:
    return _dump({"type": "cancel", "id": request_id})


def stats_request(request_id: str | None = None, reset_loop_lag: bool = False) -> str:
    frame: dict[str, Any] = {"type": "stats"}
    if request_id is not None:
        frame["id"] = request_id
    if reset_loop_lag:
        frame["reset_loop_lag"] = True
    return _dump(frame)


def models_request(request_id: str | None = None) -> str:
    return _dump({"type": "models"} if request_id is None else {"type": "models", "id": request_id})


def _sampling_json(sampling: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {}
    for key, value in (sampling or {}).items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out
