"""``mini-vllm bench fuzz --protocol http``: a brief run against an in-process demo-model server finds
nothing; requests rebuild from their number; a fake HTTP server (trio + h11) that answers 500 or
never answers is caught, with the finding named and exit status 1."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import h11
import pytest
import trio
from conftest_serving import build_engine, running_server

from mini_vllm import cli
from mini_vllm.bench.http_fuzz import (
    _GOOD_BODY,
    FAMILIES,
    Answer,
    FuzzTarget,
    HttpCase,
    build_case,
    exchange,
    judge,
    sse_problem,
)

pytestmark = pytest.mark.timeout(60)

TARGET = FuzzTarget("127.0.0.1:8000", "demo")
# Seed 0's first 150 requests hold every family.
CLEAN_SEED, CLEAN_REQUESTS = 0, 150
Misbehaviour = Literal["500", "silent"]


def _cases(seed: int, n: int) -> list[HttpCase]:
    return [build_case(seed, i, TARGET) for i in range(n)]


# ---- the requests --------------------------------------------------------------------------------


def test_the_same_number_rebuilds_the_same_bytes() -> None:
    first, again = _cases(7, 300), _cases(7, 300)
    assert first == again
    assert {c.family for c in first} == set(FAMILIES)
    assert [c.data for c in _cases(8, 300)] != [c.data for c in first]  # the seed matters
    assert build_case(7, 123, TARGET) == first[123]  # alone, without the requests before it


def test_the_clean_run_range_is_what_its_comment_says() -> None:
    cases = _cases(CLEAN_SEED, CLEAN_REQUESTS)
    assert {c.family for c in cases} == set(FAMILIES)


def test_judge_checks_the_shapes_promised() -> None:
    case = build_case(0, 0, TARGET)
    good_error = json.dumps({"error": {"message": "m", "type": "t", "param": None, "code": "c"}}).encode()
    assert judge(case, Answer(400, "application/json", good_error)) is None
    assert judge(case, Answer(400, "application/json", b'{"detail": "x"}'))[0] == "malformed_answer"  # type: ignore[index]
    assert judge(case, Answer(502, "application/json", good_error))[0] == "server_error"  # type: ignore[index]
    assert judge(case, Answer(problem="unanswered", detail="t"))[0] == "unanswered"  # type: ignore[index]
    assert sse_problem(b'data: {"a": 1}\n\ndata: [DONE]\n\n') is None
    assert sse_problem(b'data: {"a": 1}\n\n') == "an SSE stream that does not end with data: [DONE]"
    assert sse_problem(b"data: {oops\n\ndata: [DONE]\n\n") is not None
    assert sse_problem(b'data: {"error": {"message": "x"}}\n\ndata: [DONE]\n\n') is not None


# ---- against the real server -----------------------------------------------------------------------


async def test_a_run_against_the_demo_server_finds_nothing(demo_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.json"
    async with running_server([build_engine(demo_model_dir)]) as (_service, server):
        argv = ["bench", "fuzz", "--url", server.url, "--protocol", "http", "--requests", str(CLEAN_REQUESTS),
                "--seed", str(CLEAN_SEED), "--connections", "4", "--reply-timeout", "20", "--json", str(path)]
        with trio.fail_after(50):
            code = await trio.to_thread.run_sync(cli.main, argv)
    record = json.loads(path.read_text())
    assert record["failures"] == [], record["examples"]
    assert code == 0 and record["ok"]
    assert record["requests"]["sent"] == CLEAN_REQUESTS
    assert set(record["by_family"]) == set(FAMILIES)
    classes = record["requests"]["by_status_class"]
    assert classes.get("4xx", 0) > CLEAN_REQUESTS // 2 and classes.get("2xx", 0) > 0
    g = record["good_client"]
    assert g["requests"] >= 1 and g["exact"] == g["requests"]
    assert record["end"] == {"health_status": 200, "serving_correctly": True, "requests_running": 0.0,
                             "metrics_reachable": True}


async def test_a_bad_ipv6_target_is_answered_400(demo_model_dir: Path) -> None:
    # Found by this tool: urlsplit's ValueError escaped the front door, which closed unanswered.
    async with running_server([build_engine(demo_model_dir)]) as (_service, server):
        port = int(server.url.rsplit(":", 1)[1])
        case = HttpCase(0, "raw_head", "bad IPv6 target", b"GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n", method="GET")
        answer = await exchange("127.0.0.1", port, case, 10)
    assert answer.status == 400, answer


# ---- against a server that misbehaves on purpose ---------------------------------------------------


def _good_answer() -> bytes:
    choice = {"index": 0, "text": " fixed", "token_ids": [5, 6, 7], "finish_reason": "length"}
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [choice]}).encode()


def _is_good(body: bytes) -> bool:
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("prompt") == _GOOD_BODY["prompt"]


async def _answer(stream: trio.SocketStream, conn: h11.Connection, status: int, body: bytes) -> None:
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")]
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _misbehave(stream: trio.SocketStream, how: Misbehaviour) -> None:
    if how == "500":
        await stream.send_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        return
    while await stream.receive_some(65536):  # never answers; waits for the client to leave
        pass


async def _fake_connection(stream: trio.SocketStream, how: Misbehaviour) -> None:
    """The health, models and good-client routes answer right; every other request misbehaves."""
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = b""
    async with stream:
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError:
            request = None
        target = b"" if request is None else request.target
        if target == b"/health":
            await _answer(stream, conn, 200, b'{"status": "ok"}')
        elif target == b"/v1/models":
            await _answer(stream, conn, 200, b'{"object": "list", "data": [{"id": "demo"}]}')
        elif target == b"/v1/completions" and _is_good(body):
            await _answer(stream, conn, 200, _good_answer())
        else:
            await _misbehave(stream, how)


@asynccontextmanager
async def fake_server(how: Misbehaviour) -> AsyncIterator[int]:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _fake_connection(stream, how)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return  # the fuzzer left: nothing to do

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("how", "finding"), [("500", "server_error"), ("silent", "unanswered")])
async def test_a_server_that_fails_or_never_answers_is_caught(how: Misbehaviour, finding: str, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.json"
    async with fake_server(how) as port:
        argv = ["bench", "fuzz", "--url", f"ws://127.0.0.1:{port}", "--protocol", "http", "--requests", "6",
                "--connections", "3", "--reply-timeout", "0.5", "--idle-timeout", "1", "--json", str(path)]
        with trio.fail_after(30):
            code = await trio.to_thread.run_sync(cli.main, argv)
    record = json.loads(path.read_text())
    assert code == 1 and not record["ok"]
    assert record["findings"].get(finding, 0) >= 1, record["findings"]
    assert any(finding in f for f in record["failures"])
    example = record["examples"][finding][0]
    assert build_case(0, example["request"], FuzzTarget(f"127.0.0.1:{port}", "demo")).family == example["family"]
    assert record["good_client"]["exact"] == record["good_client"]["requests"]  # the good route was right
    assert record["end"]["health_status"] == 200 and record["end"]["metrics_reachable"] is False


def test_requests_is_refused_for_the_websocket_mode(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["bench", "fuzz", "--url", "ws://127.0.0.1:1", "--requests", "5"])
    assert code != 0
    assert "--requests is for --protocol http" in capsys.readouterr().err
    code = cli.main(["bench", "fuzz", "--url", "ws://127.0.0.1:1", "--protocol", "http", "--skip", "huge_n"])
    assert code != 0
    assert "--skip and --ttft-bound are for the WebSocket mode" in capsys.readouterr().err
