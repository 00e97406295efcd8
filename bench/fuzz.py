"""``mini-vllm bench fuzz``: malformed and hostile frames of every kind, while a good client checks its answers.

``--frames`` mutated frames of every client frame type (generate, chat, cancel, models, stats; see
docs/protocol.md) go over ``--connections`` connections: wrong types, huge, negative, float and
boolean integers, NaN and Infinity literals, lone surrogates, unknown and missing fields, deep
nesting, very long strings, huge lists, huge ``n`` and ``max_tokens``, out-of-range values, text
that is not JSON, binary frames, oversized frames. Each connection sends one frame at a time and
waits (at most ``--reply-timeout``) for the answer the protocol promises: an ``error``, a
completion (whose first token is answered with ``cancel``, and whose end must then come), or the
``models``/``stats`` answer. Every frame is derived from ``--seed`` and its number alone, so a
frame that caused a problem can be rebuilt.

Meanwhile a well-behaved client sends one greedy request after another on its own connection:
each answer must equal the one learnt before the fuzzing began, and its time to first token must
stay within ``--ttft-bound``. At the end the server must still answer and serve correctly, and
its KV blocks must all be free once it is idle.

The exit status is 1 on any ``internal`` error, any frame left unanswered (a dropped connection
included), a completion without its end, a wrong or lost answer of the good client, or a server
that is not serving correctly at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, open_websocket_url

from mini_vllm.bench.command import HelpFormatter, fail, interruptible
from mini_vllm.bench.serve import percentile
from mini_vllm.bench.soak import (
    MAX_EXAMPLES,
    Expected,
    PoolEntry,
    Stream,
    ask,
    check_seconds,
    check_ws_url,
    close_reason,
    connect_failure,
    counts,
    end_error_code,
    expected_of,
    mismatch,
    open_wire,
    positive,
    run_alone,
    run_tool,
    served_model,
    wait_idle,
)
from mini_vllm.engine.errors import ConfigError
from mini_vllm.transport import protocol
from mini_vllm.transport.flags import positive_int

KINDS = ("generate", "chat", "cancel", "models", "stats")
_REQUEST_KINDS = ("generate", "chat")
# Refusals a well-behaved client may meet on a busy server (retry later); anything else is a failure.
_REFUSALS = frozenset({"overloaded", "too_many_requests"})
_MAX_FRAME = 64 << 20  # what the fuzzer accepts from the server
_HEAD = 160  # characters of a frame kept in an example
GOOD_PROMPT = PoolEntry("The well-behaved client asks the same question every time", 16)
_BASELINE_RUNS = 3
_MIN_AUTO_BOUND_MS = 1000.0
_AUTO_BOUND_FACTOR = 20.0

_INT_FIELDS = ("max_tokens", "top_k", "seed", "logprobs", "min_tokens", "priority")  # n: see the huge_n family
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
# The pools of hostile values, public: the HTTP fuzzer (bench/http_fuzz.py) draws from the same ones.
ODD_VALUES: tuple[Any, ...] = ("", "x", "0", 0, 1, -1, 1.5, True, False, None, [], ["x"], [1], {}, {"a": 1})
BIG_INTS: tuple[Any, ...] = (
    2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -1, -2, -(2**63), -(2**63) - 1, -(10**30), 0,
    1.0, 2.0, 1.5, -0.0, 1e308, 5e-324, True, False,
)  # fmt: skip
# Number literals as raw JSON text: Infinity by overflow, past Python's 4300-digit limit, not JSON.
INT_LITERALS = ("1e400", "-1e400", "1" + "0" * 5000, "00", "+1", "0x10", "1.0e2", "-")
NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "nan", "inf")
SURROGATES = ("\ud800", "\udfff", "a\ud800b", "\udc00\ud800", "\ud800\ud800", "x\udbff")
ODD_KEYS = ("max_token", "stream", "prompts", "Type", "ID", "", " ", "__proto__", "constructor", "top-p",
             "x" * 300, "type\u0000", "seed ", "\u00e9")
_ODD_TYPES: tuple[Any, ...] = ("", "GENERATE", "Generate", "generate ", " generate", "token", "done", "error",
                               "models\u0000", 5, None, True, ["generate"], {"generate": True}, "cancel" * 1000)
_ODD_TEXT = ("\u0000", "\u2028\u2029", "\u202e evil", "\U0001f600" * 10, "\ufeff", "e\u0301" * 20, "\r\n\t",
             "\uffff", "\U0010ffff")
NOT_JSON = ("", " ", "{", "}", '{"type":', "null", "true", "1", '"generate"', "[]", '[{"type":"models"}]',
             '{"type":"models"} {"type":"models"}', '\ufeff{"type":"models"}', "{'type': 'models'}",
             '{"type":"models",}', '{"type":"models" /* hi */}', "[" * 3, '{"type":"models","type":"stats"}',
             "\u0000", "NaN", "undefined")


# ---- frames ------------------------------------------------------------------------------------


@attrs.frozen
class FuzzContext:
    """What the mutations need to know of the server."""

    model: str | None
    vocab_size: int
    max_model_len: int
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES


@attrs.define
class Draft:
    """A frame being mutated: a dict (rendered as JSON, raw literals spliced in), or raw text, or bytes."""

    frame: dict[str, Any] | None
    raw: str | None = None
    binary: bytes | None = None
    ascii: bool = True  # json.dumps' ensure_ascii: lone surrogates need the escapes
    literals: dict[str, str] = attrs.field(factory=dict)

    def literal(self, text: str) -> str:
        """A placeholder value that renders as ``text``, verbatim (a number JSON cannot express, nesting)."""
        key = f"\u0000raw{len(self.literals)}\u0000"
        self.literals[key] = text
        return key

    def render(self) -> str | bytes:
        if self.binary is not None:
            return self.binary
        if self.raw is not None:
            return self.raw
        text = json.dumps(self.frame, ensure_ascii=self.ascii)  # NaN renders as NaN: on purpose
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, as a character: only its escape can be sent
            text = json.dumps(self.frame, ensure_ascii=True)
        for key, value in self.literals.items():
            text = text.replace(json.dumps(key), value)
        return text


@attrs.frozen
class FuzzFrame:
    index: int
    family: str
    kind: str
    what: str
    payload: str | bytes
    rid: str | None  # the id its answers carry: the frame's id if a JSON reader sees a string, else None

    def head(self) -> str:
        if isinstance(self.payload, bytes):
            return f"<binary {len(self.payload)} bytes> {self.payload[:40]!r}"
        text = self.payload.encode("ascii", "backslashreplace").decode()  # readable in any terminal
        return text if len(text) <= _HEAD else f"{text[:_HEAD]}... ({len(self.payload):,} chars)"

    def describe(self) -> dict[str, Any]:
        return {"frame": self.index, "family": self.family, "kind": self.kind, "what": self.what, "head": self.head()}


def base_frame(kind: str, rid: str, ctx: FuzzContext) -> dict[str, Any]:
    """A valid frame of ``kind`` with a short greedy answer."""
    model = {} if ctx.model is None else {"model": ctx.model}
    if kind == "generate":
        return {"type": "generate", "id": rid, **model, "prompt": "fuzz me", "max_tokens": 4, "temperature": 0}
    if kind == "chat":
        return {"type": "chat", "id": rid, **model, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0}
    return {"type": kind, "id": rid}


def _str_fields(kind: str) -> list[str]:
    return {"generate": ["id", "model", "prompt"], "chat": ["id", "model"]}.get(kind, ["id"]) + ["type"]


def _unique(rid: str, field: str, value: str) -> str:
    # Every string id holds the frame's own id, so an answer can never be taken for another frame's.
    return rid + value if field == "id" else value


def _mutate_valid(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    changes = []
    if kind in _REQUEST_KINDS:
        options: dict[str, Any] = {
            "n": rng.randint(1, 3), "logprobs": rng.randint(0, 3), "stop": ["e"], "seed": rng.randrange(1000),
            "top_k": 5, "temperature": 0.7, "max_tokens": rng.randint(1, 6), "priority": rng.randint(-5, 5),
            "ignore_eos": True, "min_tokens": 1,
        }
        for name in rng.sample(sorted(options), rng.randint(0, 3)):
            f[name] = options[name]
            changes.append(name)
        if kind == "generate" and rng.random() < 0.3:
            del f["prompt"]
            f["prompt_token_ids"] = [rng.randrange(ctx.vocab_size) for _ in range(rng.randint(1, 20))]
            changes.append("prompt_token_ids")
    elif kind in ("models", "stats") and rng.random() < 0.3:
        del f["id"]
        changes.append("no id")
    return "valid" + (f" ({', '.join(changes)})" if changes else "")


def _mutate_wrong_type(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    names = sorted(f) + ([*_INT_FIELDS, *_FLOAT_FIELDS, "stop", "ignore_eos"] if kind in _REQUEST_KINDS else [])
    if kind == "stats":
        names.append("reset_loop_lag")
    field = rng.choice(names)
    value = rng.choice(ODD_VALUES)
    if field == "id" and isinstance(value, str) and value:
        value = _unique(rid, field, value)
    f[field] = value
    return f"{field} = {json.dumps(value)}"


def _mutate_bad_int(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    field = rng.choice([*_INT_FIELDS, "prompt_token_ids" if kind == "generate" else "stop_token_ids",
                        "stop_token_ids"])
    if rng.random() < 0.3:
        text = rng.choice(INT_LITERALS)
        value: Any = d.literal(text)
        shown = text if len(text) < 20 else f"<{len(text)}-digit literal>"
    else:
        value = rng.choice(BIG_INTS)
        shown = json.dumps(value)
    if field in ("prompt_token_ids", "stop_token_ids"):
        if field == "prompt_token_ids":
            f.pop("prompt", None)
        value, shown = [value], f"[{shown}]"
    f[field] = value
    return f"{field} = {shown}"


def _mutate_non_finite(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    field = rng.choice([*_FLOAT_FIELDS, *_INT_FIELDS]) if kind in _REQUEST_KINDS else rng.choice(["id", "reset_loop_lag"])
    text = rng.choice(NON_FINITE)
    f[field] = d.literal(text)
    return f"{field} = {text}"


def _mutate_surrogate(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    bad = rng.choice(SURROGATES)
    targets = _str_fields(kind) + (["key", "stop"] if kind in _REQUEST_KINDS else ["key"])
    if kind == "chat":
        targets += ["role", "content"]
    target = rng.choice(targets)
    d.ascii = True
    if target == "key":
        f[bad] = 1
    elif target == "stop":
        f["stop"] = [bad]
    elif target in ("role", "content"):
        f["messages"] = [{"role": "user", "content": "hi", target: bad}]
    else:
        f[target] = _unique(rid, target, bad)
    return f"lone surrogate {bad.encode('ascii', 'backslashreplace').decode()} in {target}"


def _mutate_unknown_field(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    key = rng.choice(ODD_KEYS)
    f[key] = rng.choice(ODD_VALUES)
    return f"unknown field {key[:20]!r}"


def _mutate_missing_field(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    if rng.random() < 0.15:
        for key in [k for k in f if k != "type"]:
            del f[key]
        return "only type"
    key = rng.choice(sorted(f))
    del f[key]
    return f"no {key}"


def _nesting(rng: random.Random) -> tuple[str, str]:
    depth = rng.choice((32, 512, 1000, 5000, 100_000))
    if rng.random() < 0.5:
        return "[" * depth + "]" * depth, f"{depth} nested lists"
    return '{"a":' * depth + "1" + "}" * depth, f"{depth} nested objects"


def _mutate_deep_nesting(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    text, what = _nesting(rng)
    if rng.random() < 0.3:
        d.raw = text
        return f"the frame is {what}"
    f = d.frame or {}
    field = rng.choice(_str_fields(kind) + (["stop", "messages", "prompt_token_ids"] if kind in _REQUEST_KINDS else []))
    f[field] = d.literal(text)
    return f"{field} = {what}"


def _mutate_long_string(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    char = rng.choice(("x", "\u00e9", "\U0001f600"))
    length = min(rng.choice((257, 5000, 200_000, 900_000)), 1_800_000 // len(char.encode()))  # at most ~1.8 MB
    d.ascii = False  # the characters as UTF-8, not as 6-12 byte escapes
    targets = _str_fields(kind) + (["stop", "content"] if kind in _REQUEST_KINDS else [])
    field = rng.choice(targets)
    value = char * length
    if field == "content":
        f["messages"] = [{"role": "user", "content": value}]
    elif field == "stop":
        f["stop"] = [value]
    else:
        f[field] = _unique(rid, field, value)
    return f"{field}: {length:,} x {char.encode('unicode_escape').decode()}"


def _mutate_huge_list(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    choice = rng.choice(("prompt_token_ids", "stop", "stop_token_ids", "messages", "nulls"))
    size = rng.choice((2000, 100_000))
    if choice == "prompt_token_ids" or choice == "nulls":
        f.pop("prompt", None)
        f.pop("messages", None)
        f["type"] = "generate"
        f["prompt_token_ids"] = [None] * size if choice == "nulls" else [rng.randrange(ctx.vocab_size)] * size
    elif choice == "stop":
        size = min(size, 10_000)
        f["stop"] = [f"zz{i}" for i in range(size)]
    elif choice == "stop_token_ids":
        f["stop_token_ids"] = [ctx.vocab_size - 1] * size
    else:
        size = min(size, 5000)
        f.pop("prompt", None)
        f["type"] = "chat"
        f["messages"] = [{"role": "user", "content": "hi"}] * size
    return f"{choice}: {size:,} items"


def _mutate_huge_n(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    f["n"] = rng.choice((0, -1, 1.5, True, 16, 256, 4096, 10**6, 2**31 - 1, 2**63 - 1, 2**64))
    f["max_tokens"] = 2
    return f"n = {json.dumps(f['n'])}"


def _mutate_huge_max_tokens(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    value = rng.choice((ctx.max_model_len, ctx.max_model_len + 1, 10**6, 2**31, 2**63 - 1))
    f["max_tokens"] = value
    f["ignore_eos"] = True
    if rng.random() < 0.5:
        f["min_tokens"] = value
    return f"max_tokens = {value}" + (" = min_tokens" if "min_tokens" in f else "")


def _out_of_range_values(kind: str, rid: str) -> list[tuple[str, Any]]:
    common: list[tuple[str, Any]] = [("id", ""), ("id", rid + "x" * 257), ("model", ""), ("model", "no-such-model")]
    if kind == "stats":
        return [*common[:2], ("reset_loop_lag", 1), ("reset_loop_lag", "yes"), ("reset_loop_lag", None)]
    if kind not in _REQUEST_KINDS:
        return common[:2]
    values: list[tuple[str, Any]] = [
        ("temperature", -1), ("temperature", -1e-300), ("temperature", 1e308), ("temperature", 1e-320),
        ("top_p", 0), ("top_p", -0.0), ("top_p", 1.0000001), ("top_p", 5e-324), ("top_k", -2), ("top_k", 0),
        ("min_p", -0.0001), ("min_p", 1.0001), ("repetition_penalty", 0), ("repetition_penalty", -1),
        ("repetition_penalty", 1e-320), ("presence_penalty", 2.0000001), ("frequency_penalty", -3),
        ("logprobs", 21), ("logprobs", -1), ("logprobs", 20), ("min_tokens", 5), ("seed", -1),
        ("seed", 2**64 - 1), ("seed", 2**64), ("priority", 2**63), ("priority", -(2**63) - 1),
        ("stop", [""]), ("stop", ""), ("stop", [["a"]]), ("stop", {"a": 1}), ("stop_token_ids", [-1]),
        ("ignore_eos", "true"), ("ignore_eos", 1), *common,
    ]
    if kind == "generate":
        values += [("prompt", ""), ("prompt_token_ids", [])]
    else:
        values += [("messages", []), ("messages", [{"role": "user"}]), ("messages", [{"role": "", "content": "x"}]),
                   ("messages", [{"role": "user", "content": "x", "name": "y"}]), ("messages", ["hi"]),
                   ("messages", [{"role": "user", "content": None}]), ("messages", {"role": "user"})]
    return values


def _mutate_out_of_range(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    field, value = rng.choice(_out_of_range_values(kind, rid))
    if field == "prompt_token_ids":
        f.pop("prompt", None)
    f[field] = value
    return f"{field} = {_short_json(value)}"


def _mutate_vocab(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    f.pop("prompt", None)
    v, n = ctx.vocab_size, ctx.max_model_len
    choice = rng.choice(("at vocab", "far outside", "2**63-1", "2**64", "max_model_len", "almost", "stop id"))
    ids: dict[str, list[int]] = {
        "at vocab": [v], "far outside": [v + 12_345], "2**63-1": [2**63 - 1], "2**64": [2**64],
        "max_model_len": [1] * n, "almost": [1] * (n - 1), "stop id": [1],
    }
    f["prompt_token_ids"] = ids[choice]
    if choice == "stop id":
        f["stop_token_ids"] = [v]
    if choice == "almost":
        f["max_tokens"] = 2  # prompt + output one past max_model_len
    return f"prompt_token_ids: {choice}"


def _mutate_not_json(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    pick = rng.random()
    if pick < 0.5:
        d.raw = rng.choice(NOT_JSON)
        return f"not JSON: {d.raw[:20]!r}"
    valid = json.dumps(d.frame)
    if pick < 0.7:
        d.raw = valid[: rng.randrange(1, len(valid))]
        return "a valid frame cut short"
    if pick < 0.85:
        d.raw = valid + rng.choice(("x", "}", ",", " {}", "\u0000"))
        return "a valid frame with trailing garbage"
    d.raw = "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 200)))
    return "random printable text"


def _mutate_binary(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    pick = rng.random()
    if pick < 0.4:
        d.binary = rng.randbytes(rng.randint(1, 512))
        return "random bytes"
    if pick < 0.8:
        d.binary = json.dumps(d.frame).encode()
        return "a valid frame as a binary frame"
    d.binary = rng.choice((b"", b"\x00" * 1000, b"\xff\xfe", b"\xc3\x28"))
    return "odd bytes"


def _mutate_type_field(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    f["type"] = rng.choice(_ODD_TYPES)
    return f"type = {_short_json(f['type'])}"


def _mutate_oversize(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    f.pop("messages", None)
    f["type"] = "generate"
    if rng.random() < 0.5:
        f["prompt"] = "x" * (ctx.max_frame_bytes + rng.randint(1, 1000))
        return "over the frame limit"
    d.ascii = False
    f["prompt"] = "\u00e9" * (ctx.max_frame_bytes // 2 + 1000)  # under the limit in characters, over in bytes
    return "over the frame limit in UTF-8 bytes only"


def _mutate_unicode(rng: random.Random, d: Draft, kind: str, rid: str, ctx: FuzzContext) -> str:
    f = d.frame or {}
    text = rng.choice(_ODD_TEXT)
    d.ascii = rng.random() < 0.5
    field = rng.choice(_str_fields(kind)[:-1] + (["content"] if kind == "chat" else []))
    if field == "content":
        f["messages"] = [{"role": "user", "content": text}]
    else:
        f[field] = _unique(rid, field, text)
    return f"{field} = {text.encode('unicode_escape').decode()[:30]}"


Mutator = Callable[[random.Random, Draft, str, str, FuzzContext], str]


@attrs.frozen
class Family:
    weight: int
    kinds: tuple[str, ...]
    mutate: Mutator
    composable: bool = True  # may be followed by a second mutation of the same frame


FAMILIES: Mapping[str, Family] = {
    "valid": Family(10, KINDS, _mutate_valid, composable=False),
    "wrong_type": Family(12, KINDS, _mutate_wrong_type),
    "bad_int": Family(12, _REQUEST_KINDS, _mutate_bad_int),
    "non_finite": Family(6, (*_REQUEST_KINDS, "stats"), _mutate_non_finite),
    "surrogate": Family(6, KINDS, _mutate_surrogate),
    "unknown_field": Family(6, KINDS, _mutate_unknown_field),
    "missing_field": Family(6, KINDS, _mutate_missing_field),
    "deep_nesting": Family(3, KINDS, _mutate_deep_nesting, composable=False),
    "long_string": Family(3, KINDS, _mutate_long_string, composable=False),
    "huge_list": Family(2, _REQUEST_KINDS, _mutate_huge_list, composable=False),
    "huge_n": Family(3, _REQUEST_KINDS, _mutate_huge_n),
    "huge_max_tokens": Family(3, _REQUEST_KINDS, _mutate_huge_max_tokens),
    "out_of_range": Family(8, KINDS, _mutate_out_of_range),
    "vocab": Family(4, ("generate",), _mutate_vocab, composable=False),
    "not_json": Family(8, KINDS, _mutate_not_json, composable=False),
    "binary": Family(4, KINDS, _mutate_binary, composable=False),
    "type_field": Family(5, KINDS, _mutate_type_field),
    "oversize": Family(1, _REQUEST_KINDS, _mutate_oversize, composable=False),
    "unicode": Family(4, KINDS, _mutate_unicode),
}


def _short_json(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def readable_id(payload: str | bytes) -> str | None:
    """The id a JSON reader finds in ``payload`` (a string), or None: then its answers carry id null."""
    if isinstance(payload, bytes):
        return None
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    rid = value.get("id") if isinstance(value, dict) else None
    return rid if isinstance(rid, str) else None


def make_frame(seed: int, index: int, ctx: FuzzContext, skip: frozenset[str] = frozenset()) -> FuzzFrame:
    """Frame number ``index`` of the run with ``seed``: the same frame whatever else ran before it."""
    rng = random.Random(f"{seed}:frame:{index}")
    names = [n for n in FAMILIES if n not in skip]
    name = rng.choices(names, weights=[FAMILIES[n].weight for n in names])[0]
    family = FAMILIES[name]
    kind = rng.choice(family.kinds)
    rid = f"f{index}"
    draft = Draft(base_frame(kind, rid, ctx))
    what = family.mutate(rng, draft, kind, rid, ctx)
    if family.composable and draft.raw is None and draft.binary is None and rng.random() < 0.15:
        second = [n for n in names if FAMILIES[n].composable and kind in FAMILIES[n].kinds and n != name]
        if second:
            other = rng.choice(second)
            what += "; " + FAMILIES[other].mutate(rng, draft, kind, rid, ctx)
            name += "+" + other
    payload = draft.render()
    return FuzzFrame(index, name, kind, what, payload, readable_id(payload))


# ---- the run -----------------------------------------------------------------------------------


@attrs.frozen
class FuzzConfig:
    url: str
    frames: int
    seed: int = 0
    model: str | None = None
    connections: int = 4
    reply_timeout: float = 10.0
    ttft_bound_ms: float | None = None  # None: from the good client's TTFT before the fuzzing
    time_limit: float = 600.0
    idle_timeout: float = 60.0
    skip: frozenset[str] = frozenset()
    progress_interval: float | None = 10.0

    def __attrs_post_init__(self) -> None:
        check_ws_url(self.url)
        if self.frames < 1:
            raise ConfigError(f"--frames must be >= 1, got {self.frames}")
        if self.connections < 1:
            raise ConfigError(f"--connections must be >= 1, got {self.connections}")
        check_seconds(("--reply-timeout", self.reply_timeout), ("--time-limit", self.time_limit),
                      ("--idle-timeout", self.idle_timeout))
        if self.ttft_bound_ms is not None and not (math.isfinite(self.ttft_bound_ms) and self.ttft_bound_ms > 0):
            raise ConfigError(f"--ttft-bound must be a number of milliseconds > 0, got {self.ttft_bound_ms}")
        unknown = sorted(self.skip - FAMILIES.keys())
        if unknown:
            raise ConfigError(f"--skip: unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)} "
                              f"(known: {', '.join(FAMILIES)})")
        if not FAMILIES.keys() - self.skip:
            raise ConfigError("--skip leaves no family of frames to send")


@attrs.define
class FamilyTally:
    sent: int = 0
    error: int = 0
    completion: int = 0
    reply: int = 0
    unanswered: int = 0
    dropped: int = 0


@attrs.define
class FuzzTally:
    sent: int = 0
    by_family: dict[str, FamilyTally] = attrs.field(factory=dict)
    errors: Counter[str] = attrs.field(factory=Counter)
    completions: int = 0
    completion_errors: Counter[str] = attrs.field(factory=Counter)  # completions that ended with an error
    replies: Counter[str] = attrs.field(factory=Counter)
    unanswered: int = 0
    dropped: int = 0
    internal: int = 0
    without_end: int = 0  # completions whose end never came after the cancel
    stray: Counter[str] = attrs.field(factory=Counter)  # frames that answer nothing that was sent
    connect_failures: Counter[str] = attrs.field(factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)

    def family(self, frame: FuzzFrame) -> FamilyTally:
        return self.by_family.setdefault(frame.family.split("+")[0], FamilyTally())

    def example(self, kind: str, item: dict[str, Any]) -> None:
        bucket = self.examples.setdefault(kind, [])
        if len(bucket) < MAX_EXAMPLES:
            bucket.append(item)


@attrs.define
class GoodTally:
    requests: int = 0
    exact: int = 0
    wrong: int = 0
    lost: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)
    ttfts_ms: list[float] = attrs.field(factory=list)
    wrong_examples: list[dict[str, Any]] = attrs.field(factory=list)
    slow_examples: list[dict[str, Any]] = attrs.field(factory=list)
    worst: dict[str, Any] | None = None  # the slowest first token, and the fuzz frames in flight meanwhile


@attrs.define
class _Sent:
    """When a frame went out and was answered; its description only (a frame may weigh megabytes)."""

    frame: dict[str, Any]
    at: float
    answered_at: float | None = None


class _Lane:
    """One fuzzing connection: frames for completions still running, and those that ended."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.running: dict[str, FuzzFrame] = {}  # id -> the frame that started it (cancel sent, end awaited)
        self.ended: set[str] = set()


FrameSource = Callable[[int], FuzzFrame]  # frame number -> frame


def fixed_frame(index: int, payload: str | bytes, what: str = "given") -> FuzzFrame:
    """A frame of one's own (a test's, or one to replay from a report's examples)."""
    return FuzzFrame(index, "given", "given", what, payload, readable_id(payload))


class Fuzz:
    def __init__(
        self, config: FuzzConfig, ctx: FuzzContext, good: Expected, bound_ms: float, source: FrameSource | None = None
    ) -> None:
        self.config = config
        self.ctx = ctx
        self._source: FrameSource = source or (lambda index: make_frame(config.seed, index, ctx, config.skip))
        self.good = good
        self.bound_ms = bound_ms
        self.tally = FuzzTally()
        self.good_tally = GoodTally()
        self.log: list[_Sent] = []
        self.stopped: str | None = None  # why no more frames are sent before --frames
        self.stopped_by_time = False  # --time-limit, rather than a server that stopped answering
        self._next = 0
        self._start = 0.0
        self._fuzzing_done = trio.Event()
        self._good_stopped = trio.Event()

    # ---- the lanes ----------------------------------------------------------------------------
    def _take(self) -> FuzzFrame | None:
        if self.stopped is not None or self._next >= self.config.frames:
            return None
        if trio.current_time() - self._start > self.config.time_limit:
            self.stopped = f"--time-limit of {self.config.time_limit:g} s reached after {self._next} frames"
            self.stopped_by_time = True
            return None
        self._next += 1
        return self._source(self._next - 1)

    async def run(self) -> float:
        self._start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._good_client)
            if self.config.progress_interval:
                nursery.start_soon(self._progress, self.config.progress_interval)
            async with trio.open_nursery() as lanes:
                for _ in range(self.config.connections):
                    lanes.start_soon(self._lane)
            self._fuzzing_done.set()  # the good client finishes its request, then stops
            await self._good_stopped.wait()
            nursery.cancel_scope.cancel()
        return trio.current_time() - self._start

    async def _progress(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            t, g = self.tally, self.good_tally
            print(
                f"[bench fuzz] {trio.current_time() - self._start:.0f} s: {t.sent:,}/{self.config.frames:,} frames, "
                f"{t.internal} internal, {t.unanswered} unanswered, {t.dropped} dropped; good client "
                f"{g.exact}/{g.requests} exact",
                file=sys.stderr, flush=True,
            )

    async def _lane(self) -> None:
        while self.stopped is None and self._next < self.config.frames:
            try:
                async with open_websocket_url(
                    self.config.url, max_message_size=_MAX_FRAME, connect_timeout=self.config.reply_timeout,
                    disconnect_timeout=2,
                ) as ws:
                    lane = _Lane(ws)
                    finished = await self._frames_on(lane)
                    await self._drain(lane)
                if finished:
                    return
            except (HandshakeError, OSError) as exc:
                self.tally.connect_failures[connect_failure(exc)] += 1
                if not await self._alive():
                    self.stopped = f"the server stopped accepting connections ({connect_failure(exc)})"
                    return
                await trio.sleep(0.2)  # e.g. a connection limit: let others finish first

    async def _frames_on(self, lane: _Lane) -> bool:
        """Send frames on this connection until they run out (True) or it must be replaced (False)."""
        while (frame := self._take()) is not None:
            if not await self._one(lane, frame):
                return False
        return True

    async def _one(self, lane: _Lane, frame: FuzzFrame) -> bool:
        """Send ``frame`` and classify its answer; False when the connection is no longer usable."""
        t = self.tally
        fam = t.family(frame)
        sent = _Sent(frame.describe(), trio.current_time())
        self.log.append(sent)
        t.sent += 1
        fam.sent += 1
        reply: dict[str, Any] | None = None
        try:
            await lane.ws.send_message(frame.payload)
            with trio.move_on_after(self.config.reply_timeout):
                while reply is None:
                    reply = self._route(lane, await lane.ws.get_message(), frame)
        except ConnectionClosed as exc:
            t.dropped += 1
            fam.dropped += 1
            t.example("dropped", {**frame.describe(), "close": close_reason(exc)})
            return False
        sent.answered_at = trio.current_time()
        if reply is None:
            t.unanswered += 1
            fam.unanswered += 1
            t.example("unanswered", {**frame.describe(), "waited_s": self.config.reply_timeout})
            if not await self._alive():
                self.stopped = f"the server stopped answering (after frame {frame.index}: {frame.what})"
            return False  # a late answer would be taken for the next frame's
        to_cancel = self._classify(lane, frame, reply, fam)
        if to_cancel is not None:
            try:
                await lane.ws.send_message(protocol.cancel_request(to_cancel))
            except ConnectionClosed as exc:
                t.dropped += 1
                t.example("dropped", {**frame.describe(), "close": close_reason(exc), "while": "sending its cancel"})
                return False
        return True

    def _route(self, lane: _Lane, message: str | bytes, current: FuzzFrame | None) -> dict[str, Any] | None:
        """The frame in ``message`` if it answers ``current``; frames of running completions are noted."""
        t = self.tally
        try:
            frame = json.loads(message)
        except (ValueError, TypeError):
            frame = None
        if not isinstance(frame, dict):
            t.stray["not a JSON object"] += 1
            t.example("stray", {"frame": str(message)[:_HEAD]})
            return None
        fid = frame.get("id")
        if isinstance(fid, str) and fid in lane.running:
            self._on_running(lane, fid, frame)
            return None
        if isinstance(fid, str) and fid in lane.ended:
            return None  # e.g. the other samples' done, or unknown_id for a cancel that raced the end
        if current is not None and (fid is None or fid == current.rid):
            return frame
        t.stray[str(frame.get("type"))] += 1
        t.example("stray", {"frame": json.dumps(frame)[:_HEAD]})
        return None

    def _on_running(self, lane: _Lane, fid: str, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind not in ("done", "error"):
            return
        started = lane.running.pop(fid)
        lane.ended.add(fid)
        code = end_error_code(frame)
        if code is not None:
            self._completion_error(started, code, frame)

    def _completion_error(self, started: FuzzFrame, code: str, frame: dict[str, Any]) -> None:
        t = self.tally
        t.completion_errors[code] += 1
        if code == "internal":
            t.internal += 1
            t.example("internal", {**started.describe(), "answer": json.dumps(frame)[:_HEAD]})
        else:
            t.example("completion_error", {**started.describe(), "answer": json.dumps(frame)[:_HEAD]})

    def _classify(self, lane: _Lane, frame: FuzzFrame, reply: dict[str, Any], fam: FamilyTally) -> str | None:
        """Count the answer; the id of a completion to cancel, if it is one that has not ended."""
        t = self.tally
        kind = reply.get("type")
        if kind == "error":
            code = str(reply.get("code"))
            t.errors[code] += 1
            fam.error += 1
            if code == "internal":
                t.internal += 1
                t.example("internal", {**frame.describe(), "answer": json.dumps(reply)[:_HEAD]})
            elif code not in protocol.ERROR_CODES:
                t.example("unknown_code", {**frame.describe(), "answer": json.dumps(reply)[:_HEAD]})
        elif kind in ("token", "done"):
            t.completions += 1
            fam.completion += 1
            fid = str(reply.get("id"))
            if kind == "token":  # stop it at once: the fuzzer never waits for a long answer
                lane.running[fid] = frame
                return fid
            else:
                lane.ended.add(fid)
                code = end_error_code(reply)
                if code is not None:
                    self._completion_error(frame, code, reply)
        elif kind in ("models", "stats"):
            t.replies[str(kind)] += 1
            fam.reply += 1
        else:
            t.stray[str(kind)] += 1
            t.example("stray", {**frame.describe(), "answer": json.dumps(reply)[:_HEAD]})
        return None

    async def _drain(self, lane: _Lane) -> None:
        """Wait for the end of every completion still running on ``lane`` (their cancels were sent)."""
        with trio.move_on_after(self.config.reply_timeout):
            while lane.running:
                try:
                    self._route(lane, await lane.ws.get_message(), None)
                except ConnectionClosed:
                    return  # the close cancelled them
        for fid, frame in lane.running.items():
            self.tally.without_end += 1
            self.tally.example("without_end", {**frame.describe(), "id": fid})
        lane.running.clear()

    async def _alive(self) -> bool:
        """Whether a fresh connection gets an answer to ``models`` in time."""
        return await answers_models(self.config.url, self.config.reply_timeout)

    # ---- the good client ------------------------------------------------------------------------
    async def _good_client(self) -> None:
        try:
            k = 0
            while not self._fuzzing_done.is_set():
                try:
                    async with open_wire(self.config.url, connect_timeout=self.config.reply_timeout) as wire:
                        while not self._fuzzing_done.is_set():
                            k += 1
                            sent_at = trio.current_time()
                            stream = await run_alone(wire, GOOD_PROMPT, f"good-{k}", self.ctx.model,
                                                     self.config.reply_timeout)
                            if not self._good_account(stream, sent_at):
                                break  # lost: a fresh connection for the next one
                            if stream.end is not None and end_error_code(stream.end) in _REFUSALS:
                                await trio.sleep(0.1)  # refused as overloaded: not at once again
                except (HandshakeError, OSError) as exc:
                    self.good_tally.errors[f"connection: {connect_failure(exc)}"] += 1
                    await trio.sleep(0.2)
        finally:
            self._good_stopped.set()

    def _good_account(self, stream: Stream, sent_at: float) -> bool:
        g = self.good_tally
        g.requests += 1
        first = stream.first_token_at
        if first is None and stream.end is None:
            first = trio.current_time()  # lost: it waited at least this long (a lower bound)
        if first is not None:
            ttft = 1e3 * (first - sent_at)
            g.ttfts_ms.append(ttft)
            slow = ttft > self.bound_ms and len(g.slow_examples) < MAX_EXAMPLES
            worst = g.worst is None or ttft > g.worst["ttft_ms"]
            if slow or worst:
                seen = {"ttft_ms": round(ttft, 1), "at_s": round(sent_at - self._start, 3),
                        "frames_in_flight": self._suspects(sent_at, first)}
                if slow:
                    g.slow_examples.append(seen)
                if worst:
                    g.worst = seen
        end = stream.end
        if end is None:
            g.lost += 1
            return False
        code = end_error_code(end)
        if code is not None:
            g.errors[code] += 1
            return True
        problem = mismatch(self.good, stream, whole=True)
        if problem is None:
            g.exact += 1
        else:
            g.wrong += 1
            if len(g.wrong_examples) < MAX_EXAMPLES:
                g.wrong_examples.append({"problem": problem, "expected_ids": list(self.good.token_ids),
                                         "got_ids": stream.token_ids[:64]})
        return True

    def _suspects(self, start: float, end: float) -> list[dict[str, Any]]:
        """The fuzz frames that were waiting for their answer while the good request waited for its first token."""
        now = trio.current_time()
        overlapping = [s for s in self.log if s.at <= end and (s.answered_at or now) >= start]
        overlapping.sort(key=lambda s: (s.answered_at or now) - s.at, reverse=True)
        return [{**s.frame, "answer_after_ms": round(1e3 * ((s.answered_at or now) - s.at), 1)}
                for s in overlapping[:3]]


async def answers_models(url: str, seconds: float) -> bool:
    try:
        with trio.move_on_after(seconds + 5):
            async with open_wire(url, connect_timeout=seconds) as wire:
                return await ask(wire, "models", "alive", seconds) is not None
    except (HandshakeError, OSError):
        return False
    return False


async def learn_good(config: FuzzConfig, model: str | None) -> tuple[Expected, list[float]]:
    """The good client's expected answer (run alone on a clean connection) and a few TTFTs before the fuzzing."""
    ttfts: list[float] = []
    expected: Expected | None = None
    async with open_wire(config.url, connect_timeout=config.reply_timeout) as wire:
        for k in range(1 + _BASELINE_RUNS):
            sent_at = trio.current_time()
            stream = await run_alone(wire, GOOD_PROMPT, f"baseline-{k}", model, config.reply_timeout)
            got = expected_of(stream)
            if got is None:
                why = stream.closed or (end_error_code(stream.end) if stream.end else "no end in time")
                raise ConfigError(f"the good client's request failed before the fuzzing began: {why}")
            if expected is None:
                expected = got
            elif got != expected:
                raise ConfigError("the good client's greedy answer changed between two runs on an idle server: "
                                  "is someone else using it, or is the server not deterministic?")
            if k and stream.first_token_at is not None:
                ttfts.append(1e3 * (stream.first_token_at - sent_at))
    if expected is None:  # range() above is never empty; this keeps the type checker honest
        raise ConfigError("no baseline run")
    return expected, ttfts


def auto_bound_ms(baseline_ms: Sequence[float]) -> float:
    """The default ``--ttft-bound``: 20 times the idle server's median TTFT, at least 1 s. Generous on
    purpose: it catches a frame that stalls the server (seconds), not the cost of parsing a big one."""
    median = percentile(baseline_ms, 50) if baseline_ms else 0.0
    return round(max(_MIN_AUTO_BOUND_MS, _AUTO_BOUND_FACTOR * median), 1)


def _dist(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2),
            "max": round(max(values), 2)}


async def fuzz(config: FuzzConfig, source: FrameSource | None = None) -> dict[str, Any]:
    """Learn the good answer, fuzz (``source``: frames of one's own instead of the mutations), check
    the server at the end; the record (without the environment)."""
    info = await served_model(config.url, config.model, config.reply_timeout)
    model = None if config.model is None else str(info["name"])
    ctx = FuzzContext(model, int(info.get("vocab_size") or 1), int(info.get("max_model_len") or 1))
    good, baseline = await learn_good(config, model)
    bound = config.ttft_bound_ms if config.ttft_bound_ms is not None else auto_bound_ms(baseline)
    print(f"[bench fuzz] {config.frames:,} frames over {config.connections} connections; good client's TTFT "
          f"bound {bound:g} ms ...", file=sys.stderr, flush=True)
    run = Fuzz(config, ctx, good, bound, source)
    took = await run.run()
    alive = await answers_models(config.url, config.reply_timeout)
    correct = False
    if alive:
        with trio.move_on_after(config.reply_timeout + 5):
            try:
                async with open_wire(config.url, connect_timeout=config.reply_timeout) as wire:
                    stream = await run_alone(wire, GOOD_PROMPT, "final", model, config.reply_timeout)
                    correct = stream.end is not None and mismatch(good, stream, whole=True) is None
            except (HandshakeError, OSError):
                correct = False
    after = await wait_idle(config.url, config.idle_timeout)
    t, g = run.tally, run.good_tally
    record: dict[str, Any] = {
        "url": config.url,
        "model": info.get("name"),
        "config": {
            "frames": config.frames, "seed": config.seed, "connections": config.connections,
            "reply_timeout_s": config.reply_timeout, "time_limit_s": config.time_limit,
            "ttft_bound_ms": bound, "ttft_bound_source": "--ttft-bound" if config.ttft_bound_ms is not None else "auto",
            "skip": sorted(config.skip),
        },
        "duration_s": round(took, 3),
        "stopped_early": run.stopped if run.stopped and t.sent < config.frames else None,
        "stopped_by_time_limit": run.stopped_by_time,
        "frames": {
            "sent": t.sent, "answered_by_error": sum(t.errors.values()), "answered_by_completion": t.completions,
            "answered_by_reply": sum(t.replies.values()), "unanswered": t.unanswered,
            "dropped_connections": t.dropped, "internal_errors": t.internal, "completions_without_end": t.without_end,
        },
        "errors_by_code": dict(t.errors),
        "completion_errors_by_code": dict(t.completion_errors),
        "replies_by_type": dict(t.replies),
        "by_family": {name: attrs.asdict(f) for name, f in sorted(t.by_family.items())},
        "stray_frames": dict(t.stray),
        "connect_failures": dict(t.connect_failures),
        "examples": t.examples,
        "good_client": {
            "requests": g.requests, "exact": g.exact, "wrong": g.wrong, "lost": g.lost, "errors_by_code": dict(g.errors),
            "ttft_ms": _dist(g.ttfts_ms), "baseline_ttft_ms": _dist(baseline), "ttft_bound_ms": bound,
            "within_bound": bool(g.ttfts_ms) and max(g.ttfts_ms) <= bound,
            "wrong_examples": g.wrong_examples, "slow_examples": g.slow_examples, "worst_ttft": g.worst,
        },
        "end": {
            "alive": alive, "serving_correctly": correct, "idle": after.idle,
            "kv_blocks_in_use": after.kv_blocks_in_use, "other_connections_open": after.connections_open,
        },
    }
    record["failures"], record["warnings"] = fuzz_verdict(record)
    record["ok"] = not record["failures"]
    return record


def fuzz_verdict(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    f, g, end = record["frames"], record["good_client"], record["end"]
    failures = [
        f"{n} {what}" for n, what in (
            (f["internal_errors"], "internal errors"), (f["unanswered"], "frames unanswered"),
            (f["dropped_connections"], "connections dropped by the server"),
            (f["completions_without_end"], "completions without an end after cancel"),
            (g["wrong"], "wrong answers of the good client"), (g["lost"], "good client's requests lost"),
        ) if n
    ]
    failed = {code: n for code, n in g["errors_by_code"].items() if code not in _REFUSALS}
    if failed:  # e.g. model_error: a fuzz frame in the same batch broke the step for everyone
        failures.append(f"good client's requests failed: {counts(failed)}")
    broken = {code: n for code, n in record["completion_errors_by_code"].items() if code != "internal"}
    if broken:  # a frame that passed validation and then broke the model
        failures.append(f"fuzz completions ended with errors: {counts(broken)}")
    if not end["alive"]:
        failures.append("the server does not answer at the end")
    elif not end["serving_correctly"]:
        failures.append("the server does not serve the good request correctly at the end")
    if end["kv_blocks_in_use"]:
        failures.append(f"{end['kv_blocks_in_use']} KV blocks still in use at the end")
    warnings = []
    if record["stopped_early"]:
        (warnings if record["stopped_by_time_limit"] else failures).append(f"stopped early: {record['stopped_early']}")
    if not g["within_bound"]:
        warnings.append(f"the good client's TTFT exceeded {g['ttft_bound_ms']:g} ms (max {g['ttft_ms']['max']} ms)")
    if end["idle"] is not True:
        warnings.append("the server did not become idle at the end")
    if record["stray_frames"]:
        warnings.append(f"frames that answer nothing sent: {counts(record['stray_frames'])}")
    return failures, warnings


# ---- the command -------------------------------------------------------------------------------


def _family(text: str) -> str:
    if text not in FAMILIES:
        raise argparse.ArgumentTypeError(f"unknown family {text!r} (known: {', '.join(FAMILIES)})")
    return text


def add_bench_fuzz(bench_subparsers: Any) -> None:
    p = bench_subparsers.add_parser(
        "fuzz", help="malformed and hostile frames while a good client checks its answers and TTFT",
        description=(__doc__ or "").split("\n\n")[0], formatter_class=HelpFormatter,
    )
    p.add_argument("--url", required=True, help="the server, ws://HOST:PORT (required: no default)")
    p.add_argument("--model", default=None, help="the model's name (default: the server's only model)")
    p.add_argument("--protocol", choices=("websocket", "http"), default="websocket",
                   help="websocket: mutated frames; http: hostile HTTP requests on the same port (bench/http_fuzz.py)")
    p.add_argument("--frames", type=positive_int, default=1000, help="mutated frames to send (websocket)")
    p.add_argument("--requests", type=positive_int, default=None,
                   help="hostile HTTP requests to send (http only; default 1000)")
    p.add_argument("--seed", type=int, default=0, help="with a frame's number, decides the frame")
    p.add_argument("--connections", type=positive_int, default=4, help="fuzzing connections, one frame at a time each")
    p.add_argument("--reply-timeout", type=positive("seconds"), default=10.0,
                   help="seconds a frame's answer (and the good client's whole answer) may take")
    p.add_argument("--ttft-bound", type=positive("milliseconds"), default=None, metavar="MS",
                   help=f"the good client's TTFT bound in ms (default: {_AUTO_BOUND_FACTOR:g} x its median TTFT "
                        f"on the idle server before the fuzzing, at least {_MIN_AUTO_BOUND_MS:g} ms)")
    p.add_argument("--skip", type=_family, action="append", default=[], metavar="FAMILY",
                   help=f"leave out a family of frames; repeatable (default: none; families: {', '.join(FAMILIES)})")
    p.add_argument("--time-limit", type=positive("seconds"), default=600.0,
                   help="stop sending frames after this many seconds")
    p.add_argument("--idle-timeout", type=positive("seconds"), default=60.0,
                   help="seconds to wait for the server to become idle at the end")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="the JSON file (default: fuzz-DATE.json in the current directory)")
    p.set_defaults(func=run_fuzz)


@interruptible("fuzz")
def run_fuzz(args: argparse.Namespace) -> int:
    if getattr(args, "protocol", "websocket") == "http":
        return _run_http_fuzz(args)
    if getattr(args, "requests", None) is not None:
        return fail("fuzz", "--requests is for --protocol http; the WebSocket mode counts --frames")
    try:
        config = FuzzConfig(
            url=args.url, frames=args.frames, seed=args.seed, model=args.model, connections=args.connections,
            reply_timeout=args.reply_timeout, ttft_bound_ms=args.ttft_bound, time_limit=args.time_limit,
            idle_timeout=args.idle_timeout, skip=frozenset(args.skip),
        )
    except ConfigError as exc:
        return fail("fuzz", str(exc))
    return run_tool("fuzz", fuzz, config, print_fuzz, args)


def _run_http_fuzz(args: argparse.Namespace) -> int:
    from mini_vllm.bench.http_fuzz import HttpFuzzConfig, http_fuzz, print_http_fuzz  # it imports this module

    if args.skip or args.ttft_bound is not None:
        return fail("fuzz", "--skip and --ttft-bound are for the WebSocket mode, not --protocol http")
    try:
        config = HttpFuzzConfig(
            url=args.url, requests=args.requests or 1000, seed=args.seed, model=args.model,
            connections=args.connections, reply_timeout=args.reply_timeout, time_limit=args.time_limit,
            idle_timeout=args.idle_timeout,
        )
    except ConfigError as exc:
        return fail("fuzz", str(exc))
    return run_tool("fuzz", http_fuzz, config, print_http_fuzz, args)


def print_fuzz(record: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    c, f, g, end = record["config"], record["frames"], record["good_client"], record["end"]
    print(f"\nbench fuzz: {record['url']} ({record['model']}), {f['sent']:,} frames over {c['connections']} "
          f"connections, seed {c['seed']}, {record['duration_s']:g} s", file=out)
    ex = record["examples"]

    def first(kind: str) -> str:
        items = ex.get(kind) or []
        return f"e.g. frame {items[0]['frame']} {items[0]['family']}: {items[0]['what']}" if items else ""

    rows = [
        ("answered by an error", f["answered_by_error"], counts(record["errors_by_code"])),
        ("answered by a completion", f["answered_by_completion"],
         f"ended with errors: {counts(record['completion_errors_by_code'])}" if record["completion_errors_by_code"]
         else "each cancelled at its first token"),
        ("answered (models/stats)", f["answered_by_reply"], counts(record["replies_by_type"])),
        ("unanswered", f["unanswered"], first("unanswered")),
        ("dropped connections", f["dropped_connections"], first("dropped")),
        ("internal errors", f["internal_errors"], first("internal")),
        ("completions without end", f["completions_without_end"], first("without_end")),
    ]
    for name, value, note in rows:
        print(f"  {name:<26} {value!s:>7}  {note}".rstrip(), file=out)
    t = g["ttft_ms"]
    print(f"  good client: {g['exact']}/{g['requests']} exact, {g['wrong']} wrong, {g['lost']} lost"
          + (f", errors {counts(g['errors_by_code'])}" if g["errors_by_code"] else ""), file=out)
    print(f"  good client TTFT ms: p50 {t['p50']}, p99 {t['p99']}, max {t['max']} (bound {g['ttft_bound_ms']:g}: "
          f"{'within' if g['within_bound'] else 'EXCEEDED'}; idle server p50 {g['baseline_ttft_ms']['p50']})", file=out)
    print(f"  at the end: alive {end['alive']}, serving correctly {end['serving_correctly']}, KV blocks in use "
          f"{end['kv_blocks_in_use']} (idle: {end['idle']})", file=out)
    for w in record["warnings"]:
        print(f"  warning: {w}", file=out)
    print("  result: " + ("OK" if record["ok"] else "FAILED: " + "; ".join(record["failures"])), file=out)
