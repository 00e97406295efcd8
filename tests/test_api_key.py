"""API keys: refused (401) and accepted on HTTP and on WebSocket (header and subprotocol), the
public paths, the bundled client and the command line's flags; keys are never logged."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest_serving import build_engine, greedy
from test_front_door import FakeService, check_error, http, raw_exchange, serving
from trio_websocket import ConnectionRejected, open_websocket_url

from mini_vllm import cli
from mini_vllm.actors import open_service
from mini_vllm.engine.errors import ConfigError
from mini_vllm.transport import auth, commands, flags
from mini_vllm.transport.client import AuthenticationFailed, connect
from mini_vllm.transport.http import HttpRequest, HttpResponder, Routes, send_json
from mini_vllm.transport.server import Server

pytestmark = pytest.mark.timeout(60)
KEYS = ("first-key", "ключ/+= с пробелом")  # the second: non-ASCII, spaces, base64's own characters
TCHARS = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


async def private(request: HttpRequest, responder: HttpResponder) -> None:
    await send_json(responder, 200, {"ok": True})


PRIVATE: Routes = {("GET", "/private"): private}


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [auth.bearer_header(key)]  # UTF-8: the second key is not ASCII


# ---- the keys themselves --------------------------------------------------------------------------


def test_keys_match_in_full_and_show_nowhere() -> None:
    keys = auth.ApiKeys.of(KEYS)
    assert keys.enabled and len(keys) == 2
    assert all(keys.matches(k.encode()) for k in KEYS)
    for wrong in ("", "first-ke", "first-key ", "FIRST-KEY", "first-keyx"):
        assert not keys.matches(wrong.encode())
    assert "first-key" not in repr(keys) and "first-key" not in str(keys)
    assert not auth.ApiKeys.of(()).enabled
    assert auth.ApiKeys.of("one").matches(b"one")  # a bare string is one key, not one per letter


def test_bad_keys_are_config_errors_that_do_not_repeat_the_key() -> None:
    for bad, why in (("", "non-empty"), (" padded", "whitespace"), ("line\nbreak", "control"), ("x" * 5000, "at most")):
        with pytest.raises(ConfigError, match=why) as info:
            auth.ApiKeys.of([bad], "--api-key")
        assert "--api-key" in str(info.value) and (not bad.strip() or bad.strip()[:6] not in str(info.value))


def test_the_subprotocol_token_is_an_rfc6455_token_for_any_key() -> None:
    for key in (*KEYS, "a", "\u00ff\u2603 ,;=\"/\\", "x" * 300):
        token = auth.subprotocol_token(key)
        assert token.startswith(auth.BEARER_SUBPROTOCOL_PREFIX) and set(token) <= TCHARS
        encoded = token.removeprefix(auth.BEARER_SUBPROTOCOL_PREFIX)
        assert base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode() == key
    assert auth.select_subprotocol(["mini-vllm.bearer.eA", "mini-vllm"]) == "mini-vllm"
    assert auth.select_subprotocol(["other"]) is None


def test_where_keys_come_from() -> None:
    env = {auth.API_KEY_ENV: "from-env"}
    assert auth.keys_from(None, env) == ("from-env",)
    assert auth.keys_from(["a", "b"], env) == ("a", "b")  # the flags win, as vLLM's
    assert auth.keys_from(None, {}) == () and auth.keys_from(None, {auth.API_KEY_ENV: ""}) == ()
    assert auth.client_key(None, env) == "from-env"
    assert auth.client_key("given", env) == "given"
    assert auth.client_key("", env) is None  # explicitly none
    assert auth.client_key(None, {}) is None


# ---- HTTP -----------------------------------------------------------------------------------------


async def test_http_routes_need_a_key_except_the_public_ones(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(10):
        async with serving(FakeService(), routes=PRIVATE, api_keys=KEYS) as server, http(server) as client:
            missing = await client.request("GET", "/private")
            error = check_error(missing, 401, "invalid_api_key")
            assert error["type"] == "authentication_error" and "Authorization: Bearer" in error["message"]
            assert missing.headers["www-authenticate"].startswith("Bearer")
            wrong = await client.request("GET", "/private", bearer("not-the-key"))
            assert "not valid" in check_error(wrong, 401, "invalid_api_key")["message"]
            check_error(await client.request("GET", "/private", [("Authorization", "Basic Zmlyc3Qta2V5")]), 401,
                        "invalid_api_key")
            check_error(await client.request("GET", "/nope"), 401, "invalid_api_key")  # no key: no route map either
            for key in KEYS:
                assert (await client.request("GET", "/private", bearer(key))).json() == {"ok": True}
            assert (await client.request("GET", "/private", [("Authorization", "bearer   first-key")])).status == 200
            assert (await client.request("GET", "/nope", bearer("first-key"))).status == 404
            for public in ("/health", "/version", "/", "/app.js"):
                assert (await client.request("GET", public)).status == 200, public
            # The real /metrics, over a service with no statistics: anything but a refusal.
            assert (await client.request("GET", "/metrics")).status not in (401, 403)
            assert server.statistics().auth_refused == 4
    assert "not-the-key" not in caplog.text and "first-key" not in caplog.text


async def test_two_authorization_headers_are_refused() -> None:
    with trio.fail_after(10):
        async with serving(FakeService(), routes=PRIVATE, api_keys=KEYS) as server:
            twice = (b"GET /private HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer first-key\r\n"
                     b"Authorization: Bearer other\r\nConnection: close\r\n\r\n")
            check_error(await raw_exchange(server, twice), 401, "invalid_api_key")


async def test_without_keys_nothing_is_asked() -> None:
    with trio.fail_after(10):
        async with serving(FakeService(), routes=PRIVATE) as server, http(server) as client:
            assert (await client.request("GET", "/private")).status == 200


# ---- WebSocket ------------------------------------------------------------------------------------


async def handshake(url: str, headers: Sequence[tuple[bytes, bytes]] = (), subprotocols: Sequence[str] = ()) -> Any:
    """101's chosen subprotocol (or "" for none), or the HTTP status and body it was refused with."""
    try:
        async with open_websocket_url(url, extra_headers=list(headers), subprotocols=list(subprotocols)) as ws:
            await ws.send_message(json.dumps({"type": "models", "id": "m"}))
            assert json.loads(await ws.get_message())["type"] == "models"
            return ws.subprotocol or ""
    except ConnectionRejected as exc:
        return exc.status_code, json.loads(exc.body or b"{}")


async def test_websocket_handshakes_need_a_key_in_the_header_or_a_subprotocol(demo_model_dir: Path) -> None:
    with trio.fail_after(30):
        async with open_service([build_engine(demo_model_dir)]) as service, serving(service, api_keys=KEYS) as server:
            url = server.url
            status, body = await handshake(url)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
            assert "mini-vllm.bearer." in body["error"]["message"]
            assert (await handshake(url, [auth.bearer_header("wrong")]))[0] == 401
            assert (await handshake(url, subprotocols=["mini-vllm", auth.subprotocol_token("wrong")]))[0] == 401
            assert (await handshake(url, subprotocols=["mini-vllm", "mini-vllm.bearer.!!"]))[0] == 401
            assert await handshake(url, [auth.bearer_header(KEYS[0])]) == ""
            assert await handshake(url, [auth.bearer_header(KEYS[1])], ["mini-vllm"]) == "mini-vllm"
            # A browser: the key as a token beside "mini-vllm", which the server selects (never the token).
            assert await handshake(url, subprotocols=["mini-vllm", auth.subprotocol_token(KEYS[1])]) == "mini-vllm"
            assert await handshake(url, subprotocols=[auth.subprotocol_token(KEYS[0])]) == ""
            assert server.statistics().auth_refused == 4


@contextlib.asynccontextmanager
async def keyed_server(demo_model_dir: Path) -> AsyncIterator[Server]:
    async with open_service([build_engine(demo_model_dir)]) as service, serving(service, api_keys=KEYS) as server:
        yield server


async def test_the_bundled_client_sends_its_key_or_says_one_is_needed(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(auth.API_KEY_ENV, raising=False)
    with trio.fail_after(30):
        async with keyed_server(demo_model_dir) as server:
            with pytest.raises(AuthenticationFailed, match="needs an API key") as info:
                async with connect(server.url):
                    pass
            assert auth.API_KEY_ENV in str(info.value)
            with pytest.raises(AuthenticationFailed, match="refused the API key"):
                async with connect(server.url, api_key="wrong"):
                    pass
            async with connect(server.url, api_key=KEYS[1]) as client:
                assert (await client.complete("Hello", **greedy(3))).finish_reason == "length"
            monkeypatch.setenv(auth.API_KEY_ENV, KEYS[0])
            async with connect(server.url) as client:  # the environment's key by default
                assert len(await client.models()) == 1
            with pytest.raises(AuthenticationFailed):
                async with connect(server.url, api_key=""):  # "": no key, whatever the environment says
                    pass


# ---- the command line -----------------------------------------------------------------------------


def test_serve_and_generate_take_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "--api-key", "a", "--api-key", "b"])
    assert commands._serve_keys(args.api_key) == ("a", "b")
    monkeypatch.setenv(auth.API_KEY_ENV, "env-key")
    assert commands._serve_keys(parser.parse_args(["serve"]).api_key) == ("env-key",)
    monkeypatch.setenv(auth.API_KEY_ENV, "bad\tkey")
    with pytest.raises(ConfigError, match=auth.API_KEY_ENV):
        commands._serve_keys(None)
    monkeypatch.setenv(auth.API_KEY_ENV, "env-key")
    generate = parser.parse_args(["generate", "hi", "--url", "ws://127.0.0.1:1", "--api-key", "g"])
    assert flags.api_key_from(generate) == "g"
    assert flags.api_key_from(parser.parse_args(["generate", "hi"])) == "env-key"
    with pytest.raises(argparse.ArgumentTypeError, match="control characters"):
        flags.api_key("a\x01b")


def test_a_bad_api_key_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["serve", "--api-key", " padded"])
    assert stop.value.code == flags.EXIT_USAGE
    assert "--api-key" in capsys.readouterr().err


async def test_generate_sends_its_key(demo_model_dir: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(auth.API_KEY_ENV, raising=False)
    hello = commands.PromptSpec("Hello")
    with trio.fail_after(30):
        async with keyed_server(demo_model_dir) as server:
            out = commands._Output(sys.stdout)
            code = await commands._generate_remote(server.url, hello, None, False, greedy(3), out, KEYS[0])
            assert code == flags.EXIT_OK and "finish_reason=length" in capsys.readouterr().err
            code = await commands._generate_remote(server.url, hello, None, False, greedy(3), out)
            assert code == flags.EXIT_ERROR and "needs an API key" in capsys.readouterr().err


def test_serve_notes_name_the_page_and_the_key_rule() -> None:
    server = Server(FakeService(), api_keys=["sekret-value"])  # type: ignore[arg-type]
    server.host, server.port = "127.0.0.1", 8123
    notes = commands.serve_notes(server)
    assert notes[0] == "browser page: http://127.0.0.1:8123/"
    assert "API key is required" in notes[-1] and not any("sekret" in note for note in notes)
    server.host = "0.0.0.0"
    assert commands.serve_notes(server)[:2] == [
        "browser page: http://127.0.0.1:8123/",
        "from another machine the page's origin is http://NAME:PORT: allow it with --allowed-origins http://NAME:PORT",
    ]
    server.host = "::"
    assert commands.serve_notes(server)[0] == "browser page: http://[::1]:8123/"
