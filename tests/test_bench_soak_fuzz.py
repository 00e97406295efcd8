"""``mini-vllm bench soak`` and ``bench fuzz``: brief runs against an in-process server on the demo
model, their counting against a scripted fake server (answers that go wrong, go missing, break the
connection), the frames the fuzzer builds, and the command line's errors."""

from __future__ import annotations

import argparse
import json
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from conftest_serving import build_engine, running_server
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from mini_vllm import cli
from mini_vllm.bench import fuzz as bench_fuzz
from mini_vllm.bench.command import HelpFormatter
from mini_vllm.bench.fuzz import FAMILIES, FuzzConfig, FuzzContext, fixed_frame, fuzz, make_frame, readable_id
from mini_vllm.bench.soak import Expected, SoakConfig, Stream, mismatch, prompt_pool, resident_memory, soak

pytestmark = pytest.mark.timeout(60)

SOAK_REQUEST_KEYS = {"sent", "completed_exact", "completed_wrong", "cancelled", "cancel_raced_end", "disconnected",
                     "lost", "errors"}
FUZZ_FRAME_KEYS = {"sent", "answered_by_error", "answered_by_completion", "answered_by_reply", "unanswered",
                   "dropped_connections", "internal_errors", "completions_without_end"}


def _answered(record: dict[str, Any]) -> int:
    f = record["frames"]
    return (f["answered_by_error"] + f["answered_by_completion"] + f["answered_by_reply"] + f["unanswered"]
            + f["dropped_connections"])


def _ended(r: dict[str, int]) -> int:
    """Each request sent ends in exactly one of these (a cancel that raced the end is within completed)."""
    return r["completed_exact"] + r["completed_wrong"] + r["cancelled"] + r["disconnected"] + r["lost"] + r["errors"]


# ---- against the real server ---------------------------------------------------------------------


async def test_soak_against_the_demo_model_loses_nothing(demo_model_dir: Path) -> None:
    async with running_server([build_engine(demo_model_dir)]) as (_service, server):
        config = SoakConfig(server.url, duration=3, concurrency=4, disconnect_rate=0.2, cancel_rate=0.2, seed=1,
                            request_timeout=30, progress_interval=None)
        record = await soak(config)
    r = record["requests"]
    assert set(r) == SOAK_REQUEST_KEYS
    assert r["sent"] > 0 and r["completed_exact"] > 0
    assert r["completed_wrong"] == 0 and r["lost"] == 0, (record["wrong_examples"], record["lost_examples"])
    assert _ended(r) == r["sent"]
    assert record["after_load"]["idle"] is True and record["after_load"]["kv_blocks_in_use"] == 0
    assert record["ok"] and record["failures"] == []
    assert len(record["pool"]) == len(prompt_pool()) and record["pool_skipped"] == []
    # The frontend's and the engine core's resident memory, from the server's stats, before and after.
    memory = record["memory"]
    assert memory["reported_by_server"] and set(memory["before"]) == set(memory["after"]) == set(memory["growth_pct"])
    assert "server.rss_bytes" in memory["before"] and any("schedulers" in k for k in memory["before"])
    assert all(v > 0 for v in memory["before"].values())
    json.dumps(record)  # all of it is JSON


async def test_fuzz_against_the_demo_model(demo_model_dir: Path) -> None:
    # Every family, huge n included (at 7d60c73, n = 10**6 made the server allocate until the OOM
    # killer came; the edge now refuses it before any work).
    async with running_server([build_engine(demo_model_dir)]) as (_service, server):
        config = FuzzConfig(server.url, frames=200, seed=3, progress_interval=None)
        record = await fuzz(config)
    f = record["frames"]
    assert set(f) == FUZZ_FRAME_KEYS
    assert f["sent"] == 200 and _answered(record) == 200
    assert sum(record["errors_by_code"].values()) == f["answered_by_error"]
    assert sum(x["sent"] for x in record["by_family"].values()) == 200 and "huge_n" in record["by_family"]
    assert f["answered_by_error"] > 100  # most mutations are refused ...
    assert f["answered_by_completion"] > 0  # ... some are valid, and were cancelled at their first token
    g = record["good_client"]
    assert g["requests"] >= 1 and g["wrong"] == 0 and g["lost"] == 0
    assert g["exact"] + sum(g["errors_by_code"].values()) == g["requests"]
    assert g["ttft_ms"]["p50"] is not None and g["ttft_bound_ms"] >= 1000
    assert record["end"]["alive"] and record["end"]["serving_correctly"]
    assert record["end"]["kv_blocks_in_use"] == 0
    assert f["internal_errors"] == 0 and f["unanswered"] == 0, record["examples"]  # issue 14's bar
    assert record["ok"], record["failures"]
    json.dumps(record)


async def test_fuzz_counts_known_frames_as_the_server_answers_them(demo_model_dir: Path) -> None:
    frames = [
        "{",  # invalid_json
        b"\x00\x01",  # binary_frame
        json.dumps({"type": "generate", "id": "x1", "prompt": "hi", "max_tokens": "six"}),  # invalid_field
        json.dumps({"type": "models", "id": "m1"}),
        json.dumps({"type": "stats"}),  # no id: its answer has none either
        json.dumps({"type": "generate", "id": "g1", "prompt": "hi", "max_tokens": 500, "temperature": 0,
                    "ignore_eos": True}),  # a completion, cancelled at its first token
        json.dumps({"type": "cancel", "id": "nothing"}),  # unknown_id
    ]
    async with running_server([build_engine(demo_model_dir)]) as (_service, server):
        config = FuzzConfig(server.url, frames=len(frames), connections=1, progress_interval=None)
        record = await fuzz(config, lambda i: fixed_frame(i, frames[i]))
    assert record["errors_by_code"] == {"invalid_json": 1, "binary_frame": 1, "invalid_field": 1, "unknown_id": 1}
    assert record["replies_by_type"] == {"models": 1, "stats": 1}
    f = record["frames"]
    assert f["answered_by_completion"] == 1 and f["completions_without_end"] == 0
    assert f["unanswered"] == f["dropped_connections"] == f["internal_errors"] == 0
    assert record["end"]["kv_blocks_in_use"] == 0 and record["ok"], record["failures"]


# ---- against a scripted server -------------------------------------------------------------------


@attrs.define
class FakeServer:
    """Speaks enough of the protocol for both tools, and misbehaves on cue.

    Answers are ids ``[(len(prompt) + i) % 97 ...]``, one token frame each. After a prompt's first
    answer (the tools learn it), prompts listed in ``corrupt`` get a wrong last token and those in
    ``lose`` get no answer at all. Text frames that are exactly IGNORE, DROP or INTERNAL get no
    answer, a closed connection, and an ``internal`` error."""

    corrupt: frozenset[int] = frozenset()  # max_tokens values whose answers go wrong
    lose: frozenset[int] = frozenset()  # max_tokens values whose answers never come
    rss: int | None = None
    seen: dict[str, int] = attrs.field(factory=dict)

    async def handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        cancelled: set[str] = set()
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    message = await ws.get_message()
                    if message == "DROP":
                        await ws.aclose()
                        return
                    if message == "IGNORE":
                        continue
                    if message == "INTERNAL":
                        await ws.send_message(json.dumps({"type": "error", "id": None, "code": "internal",
                                                          "message": "scripted"}))
                        continue
                    try:
                        frame = json.loads(message)
                    except ValueError:
                        await ws.send_message(json.dumps({"type": "error", "id": None, "code": "invalid_json",
                                                          "message": "not JSON"}))
                        continue
                    kind, rid = frame.get("type"), frame.get("id")
                    if kind == "models":
                        await ws.send_message(json.dumps({"type": "models", "id": rid, "models": [
                            {"name": "fake", "max_model_len": 4096, "vocab_size": 97, "has_chat_template": False,
                             "available": True}]}))
                    elif kind == "stats":
                        server: dict[str, Any] = {"requests_in_flight": 0, "connections_open": 1}
                        if self.rss is not None:
                            server["rss_bytes"] = self.rss
                        await ws.send_message(json.dumps({"type": "stats", "id": rid, "server": server, "service": {
                            "schedulers": [], "blocks": {"models": [{"blocks": {"used_blocks": 0}}]}}}))
                    elif kind == "cancel":
                        cancelled.add(rid)
                    elif kind == "generate":
                        nursery.start_soon(self._generate, ws, frame, cancelled)
            except ConnectionClosed:
                pass
            nursery.cancel_scope.cancel()

    async def _generate(self, ws: Any, frame: dict[str, Any], cancelled: set[str]) -> None:
        rid, prompt, n = frame["id"], frame["prompt"], frame["max_tokens"]
        answers = self.seen[prompt] = self.seen.get(prompt, 0) + 1
        if answers > 1 and n in self.lose:
            return
        ids = [(len(prompt) + i) % 97 for i in range(n)]
        if answers > 1 and n in self.corrupt:
            ids[-1] = (ids[-1] + 1) % 97
        try:
            for k, t in enumerate(ids):
                if rid in cancelled:
                    await ws.send_message(json.dumps({"type": "done", "id": rid, "index": 0, "finish_reason": "cancelled",
                                                      "usage": {"prompt_tokens": 1, "completion_tokens": k}}))
                    return
                await ws.send_message(json.dumps({"type": "token", "id": rid, "index": 0, "text": "a",
                                                  "token_ids": [t]}))
                await trio.lowlevel.checkpoint()  # let a cancel in
            await ws.send_message(json.dumps({"type": "done", "id": rid, "index": 0, "finish_reason": "length",
                                              "usage": {"prompt_tokens": 1, "completion_tokens": n}}))
        except ConnectionClosed:
            pass


@asynccontextmanager
async def fake_server(fake: FakeServer) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, fake.handle, "127.0.0.1", 0, None)
        yield f"ws://127.0.0.1:{server.port}"
        nursery.cancel_scope.cancel()


async def test_soak_stops_at_max_requests() -> None:
    async with fake_server(FakeServer()) as url:
        config = SoakConfig(url, duration=30, concurrency=5, disconnect_rate=0, cancel_rate=0, max_requests=7,
                            progress_interval=None)
        record = await soak(config)
    assert record["requests"]["sent"] == record["requests"]["completed_exact"] == 7 and record["ok"]
    assert record["load_s"] < 10


async def test_soak_counts_wrong_and_lost_answers_and_fails() -> None:
    # Pool entries with max_tokens 8 come back wrong, those with 3 never come back.
    fake = FakeServer(corrupt=frozenset({8}), lose=frozenset({3}), rss=123_456)
    async with fake_server(fake) as url:
        config = SoakConfig(url, duration=1.0, concurrency=3, disconnect_rate=0.2, cancel_rate=0.2, seed=0,
                            request_timeout=0.3, idle_timeout=2, progress_interval=None)
        record = await soak(config)
    r = record["requests"]
    assert r["completed_wrong"] > 0 and r["lost"] > 0 and r["completed_exact"] > 0
    assert _ended(r) == r["sent"]
    assert record["lost_by_reason"] == {"no end within 0.3 s": r["lost"]}
    wrong = record["wrong_examples"][0]
    assert wrong["problem"].startswith(("token ids differ from index 7", "cancelled: ", "disconnected: "))
    assert not record["ok"]
    assert any("lost" in f for f in record["failures"]) and any("wrong" in f for f in record["failures"])
    assert record["memory"]["reported_by_server"]
    assert record["memory"]["before"] == record["memory"]["after"] == {"server.rss_bytes": 123_456}


async def test_fuzz_counts_internal_unanswered_and_dropped_and_fails() -> None:
    frames = ["IGNORE", "{", "DROP", json.dumps({"type": "models", "id": "m"}), "INTERNAL"]
    async with fake_server(FakeServer()) as url:
        config = FuzzConfig(url, frames=len(frames), connections=1, reply_timeout=0.3, idle_timeout=2,
                            progress_interval=None)
        record = await fuzz(config, lambda i: fixed_frame(i, frames[i]))
    f = record["frames"]
    assert (f["unanswered"], f["dropped_connections"], f["internal_errors"]) == (1, 1, 1)
    assert record["errors_by_code"] == {"invalid_json": 1, "internal": 1}
    assert record["replies_by_type"] == {"models": 1} and _answered(record) == len(frames)
    assert record["examples"]["unanswered"][0]["head"] == "IGNORE"
    assert record["examples"]["dropped"][0]["head"] == "DROP"
    assert record["examples"]["internal"][0]["head"] == "INTERNAL"
    assert record["end"]["alive"] and record["end"]["serving_correctly"]
    assert not record["ok"] and len(record["failures"]) == 3


async def test_soak_command_writes_json_prints_a_table_and_fails_on_wrong_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "out" / "soak.json"
    async with fake_server(FakeServer(corrupt=frozenset({8}))) as url:
        argv = ["bench", "soak", "--url", url, "--duration", "0.5", "--concurrency", "2", "--seed", "4",
                "--idle-timeout", "2", "--json", str(path)]
        # The command runs trio itself: in a thread, beside this test's loop that serves it.
        code = await trio.to_thread.run_sync(cli.main, argv)
    assert code == 1  # the corrupted answers
    _check_written(path, "soak", url, "fake", capsys.readouterr().out)


async def test_fuzz_command_writes_json_and_prints_a_table(
    demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fuzz.json"
    async with running_server([build_engine(demo_model_dir)]) as (_service, server):
        argv = ["bench", "fuzz", "--url", server.url, "--frames", "40", "--skip", "huge_n", "--json", str(path)]
        code = await trio.to_thread.run_sync(cli.main, argv)
    record = _check_written(path, "fuzz", server.url, "demo", capsys.readouterr().out)
    assert code == (0 if record["ok"] else 1)
    assert record["config"]["skip"] == ["huge_n"] and record["frames"]["sent"] == 40


def _check_written(path: Path, name: str, url: str, model: str, out: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(path.read_text())
    assert record["benchmark"] == name and record["url"] == url and record["model"] == model
    assert {"date", "command", "versions", "client_machine", "failures", "ok"} <= set(record)
    assert record["command"].startswith(f"mini-vllm bench {name} --url ")
    assert f"bench {name}: {url} ({model})" in out and f"wrote {path}" in out
    assert "result: " + ("OK" if record["ok"] else "FAILED") in out
    return record


# ---- frames and checks, without a server --------------------------------------------------------------


CTX = FuzzContext(model=None, vocab_size=259, max_model_len=1536)


def test_frames_are_reproducible_bounded_and_sendable() -> None:
    seen: set[str] = set()
    for i in range(600):
        frame = make_frame(5, i, CTX)
        assert frame == make_frame(5, i, CTX)  # a frame depends on the seed and its number only
        seen.add(frame.family.split("+")[0])
        assert len(frame.payload) <= 2_000_000
        if isinstance(frame.payload, str):
            frame.payload.encode("utf-8")  # lone surrogates travel as escapes: a text frame can carry it
        assert frame.rid is None or frame.rid.startswith(f"f{i}") or frame.rid == ""
        assert frame.rid == readable_id(frame.payload)
    assert seen == set(FAMILIES)
    assert make_frame(5, 7, CTX) != make_frame(6, 7, CTX)
    assert all(not make_frame(1, i, CTX, frozenset({"huge_n"})).family.startswith("huge_n") for i in range(300))


def test_huge_n_frames_carry_large_n_and_a_small_max_tokens() -> None:
    values = set()
    for k in range(300):
        draft = bench_fuzz.Draft(bench_fuzz.base_frame("generate", "f1", CTX))
        FAMILIES["huge_n"].mutate(random.Random(k), draft, "generate", "f1", CTX)
        frame = json.loads(draft.render())
        assert frame["max_tokens"] == 2  # the answer, if the server takes it, is short (and cancelled)
        values.add(frame["n"])
    assert {10**6, 2**63 - 1, 2**64, 0, -1} <= values


def test_readable_id_is_what_a_json_reader_sees() -> None:
    assert readable_id('{"type":"models","id":"a"}') == "a"
    assert readable_id('{"id":"a","id":"b"}') == "b"  # the last duplicate wins, as in the server
    assert readable_id('{"id":5}') is None and readable_id("[1]") is None and readable_id(b'{"id":"a"}') is None
    assert readable_id("[" * 100_000) is None and readable_id('{"id":"a","n":' + "1" * 5000 + "}") is None


def _stream(ids: list[int], text: str = "", reason: str | None = "length", usage: int | None = None) -> Stream:
    s = Stream(token_ids=ids, text=[text])
    if reason is not None:
        s.end = {"type": "done", "finish_reason": reason,
                 "usage": {"completion_tokens": len(ids) if usage is None else usage}}
    return s


def test_mismatch_names_the_difference() -> None:
    want = Expected((1, 2, 3), "abc", "length")
    assert mismatch(want, _stream([1, 2, 3], "abc"), whole=True) is None
    assert mismatch(want, _stream([1, 9, 3], "abc"), whole=True) == "token ids differ from index 1"
    assert mismatch(want, _stream([1, 2], "ab"), whole=True) == "token ids differ from index 2"
    assert mismatch(want, _stream([1, 2, 3], "abd"), whole=True) == "same ids, different text"
    assert mismatch(want, _stream([1, 2, 3], "abc", "stop"), whole=True).startswith("finish reason 'stop'")
    assert mismatch(want, _stream([1, 2, 3], "abc", usage=4), whole=True) == "usage.completion_tokens 4 for 3 ids"
    assert mismatch(want, _stream([1, 2], "ab", None), whole=False) is None
    assert mismatch(want, _stream([2], "", None), whole=False) == "not a prefix: token ids differ from index 0"
    assert mismatch(want, _stream([1], "x", None), whole=False) == "not a prefix: the text differs"


def test_resident_memory_reports_only_what_stats_carries() -> None:
    assert resident_memory({"server": {"frames_sent": 3}, "service": {"schedulers": [{"pending": 0}]}}) == {}
    stats = {"server": {"rss_bytes": 10, "max_rss_bytes": 12.5, "rss_note": "x"},
             "service": {"cores": [{"resident_bytes": 7, "alive": True}]}}
    assert resident_memory(stats) == {"server.rss_bytes": 10, "server.max_rss_bytes": 12.5,
                                      "service.cores[0].resident_bytes": 7}


def test_the_pool_fits_the_model_and_the_auto_bound_is_generous() -> None:
    assert len(prompt_pool()) == 12
    small = prompt_pool(64)
    assert small and all(len(e.prompt.encode()) + 8 + e.max_tokens <= 64 for e in small)
    assert bench_fuzz.auto_bound_ms([]) == 1000 and bench_fuzz.auto_bound_ms([2, 3, 4]) == 1000
    assert bench_fuzz.auto_bound_ms([100, 200, 300]) == 4000


# ---- the command line ----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(err: str, prefix: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


URL = "ws://127.0.0.1:9"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["bench", "soak"], "--url"),
        (["bench", "soak", "--url", URL, "--duration", "0"], "--duration"),
        (["bench", "soak", "--url", URL, "--duration", "nan"], "--duration"),
        (["bench", "soak", "--url", URL, "--concurrency", "0"], "--concurrency"),
        (["bench", "soak", "--url", URL, "--disconnect-rate", "1.5"], "--disconnect-rate"),
        (["bench", "soak", "--url", URL, "--cancel-rate", "-0.1"], "--cancel-rate"),
        (["bench", "soak", "--url", URL, "--cancel-rate", "half"], "not a probability"),
        (["bench", "soak", "--url", URL, "--max-requests", "0"], "--max-requests"),
        (["bench", "fuzz"], "--url"),
        (["bench", "fuzz", "--url", URL, "--frames", "0"], "--frames"),
        (["bench", "fuzz", "--url", URL, "--frames", "many"], "not an integer"),
        (["bench", "fuzz", "--url", URL, "--skip", "nope"], "unknown family 'nope'"),
        (["bench", "fuzz", "--url", URL, "--ttft-bound", "-5"], "--ttft-bound"),
        (["bench", "fuzz", "--url", URL, "--reply-timeout", "inf"], "--reply-timeout"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    line = _one_line(capsys.readouterr().err, f"mini-vllm {' '.join(argv[:2])}: error: ")
    assert words in line and "--help" in line


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["bench", "soak", "--url", "http://127.0.0.1:8000"], "--url must be ws://HOST:PORT"),
        (["bench", "soak", "--url", "ws://:80"], "--url must be ws://HOST:PORT"),
        (["bench", "soak", "--url", URL, "--disconnect-rate", "0.6", "--cancel-rate", "0.6"], "must be <= 1"),
        (["bench", "fuzz", "--url", "127.0.0.1:8000"], "--url must be ws://HOST:PORT"),
        (["bench", "fuzz", "--url", URL, *[a for f in FAMILIES for a in ("--skip", f)]], "leaves no family"),
    ],
)
def test_a_bad_combination_is_one_line_and_exit_2(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    assert words in _one_line(capsys.readouterr().err, f"mini-vllm {' '.join(argv[:2])}: error: ")


@pytest.mark.parametrize("command", ["soak", "fuzz"])
def test_a_json_path_that_is_a_folder_is_refused_before_running(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", command, "--url", URL, "--json", str(tmp_path)]) == 2
    assert "is a folder" in _one_line(capsys.readouterr().err, f"mini-vllm bench {command}: error: --json ")


@pytest.mark.parametrize("command", ["soak", "fuzz"])
def test_nothing_listening_says_connection_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"ws://127.0.0.1:{_closed_port()}"
    assert cli.main(["bench", command, "--url", url, "--json", str(tmp_path / "x.json")]) == 1
    line = _one_line(capsys.readouterr().err, f"mini-vllm bench {command}: error: cannot connect to {url}: ")
    assert "connection refused" in line
    assert not (tmp_path / "x.json").exists()


def _bench_subparser(name: str) -> argparse.ArgumentParser:
    bench = cli.build_parser()._subparsers._group_actions[0].choices["bench"]  # type: ignore[union-attr]
    sub: Callable[..., Any] = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("command", ["soak", "fuzz"])
def test_every_option_states_its_default(command: str) -> None:
    parser = _bench_subparser(command)
    formatter = HelpFormatter(parser.prog)
    missing = [
        a.dest for a in parser._actions
        if not isinstance(a, argparse._HelpAction) and "default" not in (formatter._get_help_string(a) or "")
    ]
    assert missing == []
    assert "%(" not in parser.format_help()

