"""First contact with the command line: bad flags are refused while parsing, every error is one
line saying what to do, a failed connection says why, and every option's help states its default."""

from __future__ import annotations

import argparse
import errno
import socket
from pathlib import Path

import pytest
import trio

from mini_vllm import cli
from mini_vllm.actors import open_service
from mini_vllm.actors.core import check_model_names
from mini_vllm.engine import ConfigError, EngineArgs
from mini_vllm.engine.loader import resolve_model, served_name
from mini_vllm.transport import commands, flags
from mini_vllm.transport.client import ConnectionLost, InvalidURL, connect

pytestmark = pytest.mark.timeout(60)


def _one_line_error(err: str, prefix: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == flags.EXIT_USAGE
    return _one_line_error(capsys.readouterr().err, f"mini-vllm {argv[0]}: error: ")


# ---- ports ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["99999", "65536", "-1", "eighty"])
def test_a_port_outside_0_to_65535_is_refused_while_parsing(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(["serve", "--port", value], capsys)
    assert "--port" in line and value in line
    assert "0..65535" in line or "not an integer" in line
    assert "--help" in line  # says where to look


def test_the_ends_of_the_port_range_parse() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["serve", "--port", "0"]).port == 0
    assert parser.parse_args(["serve", "--port", "65535"]).port == 65535


def test_a_usage_error_of_generate_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert "PROMPT" in _usage_error(["generate"], capsys)  # no prompt of any kind
    assert "--max-tokens" in _usage_error(["generate", "hi", "--max-tokens", "0"], capsys)


# ---- model names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "specs",
    [
        ["a=demo", "a=/nonexistent/x"],
        ["qwen3-0.6b", "qwen3-0.6b"],  # the same preset twice: would load 2 x 0.6B parameters first
        ["demo", "demo"],
        ["one/x", "two/x"],  # two directories, one last component (made below)
    ],
)
def test_two_models_of_one_name_are_refused_before_anything_loads(
    specs: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for spec in specs:
        if spec.endswith("/x"):
            (tmp_path / spec).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    argv = ["serve", "--port", "0"] + [arg for spec in specs for arg in ("--model", spec)]
    assert cli.main(argv) == flags.EXIT_USAGE
    line = _one_line_error(capsys.readouterr().err, "mini-vllm serve: error: two models share the name ")
    assert "--model NAME=PATH" in line  # and nothing loaded: no progress line, no missing-directory error


async def test_open_service_refuses_a_duplicate_name_before_loading() -> None:
    # Loading would fail on the missing directory: the name clash must be found first.
    models = [EngineArgs(model_name="a"), EngineArgs(model="/nonexistent/x", model_name="a")]
    with pytest.raises(ConfigError, match="two models share the name 'a'"):
        async with open_service(models):
            pass


def test_served_name_is_the_name_the_loader_gives(demo_model_dir: Path) -> None:
    cases = [
        EngineArgs(),
        EngineArgs(model=str(demo_model_dir)),
        EngineArgs(model=str(demo_model_dir), model_name="chat"),
        EngineArgs(model="qwen3-0.6b", load_format="dummy"),
    ]
    for args in cases:
        assert served_name(args) == resolve_model(args).name
    check_model_names(cases[:3] + [EngineArgs(model="llama3-8b")])  # all distinct: no error


# ---- URLs and connections ---------------------------------------------------------------------


def test_generate_with_an_http_url_says_it_must_be_ws(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "hi", "--url", "http://127.0.0.1:8000"]) == flags.EXIT_USAGE
    line = _one_line_error(capsys.readouterr().err, "mini-vllm generate: error: --url: ")
    assert "ws:// or wss://" in line and "ws://127.0.0.1:8000" in line


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_against_nothing_says_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"ws://127.0.0.1:{_closed_port()}"
    assert cli.main(["generate", "hi", "--url", url]) == flags.EXIT_ERROR
    line = _one_line_error(capsys.readouterr().err, f"mini-vllm generate: error: cannot connect to {url}: ")
    assert "connection refused" in line


async def test_connect_refused() -> None:
    url = f"ws://127.0.0.1:{_closed_port()}"
    with trio.fail_after(10), pytest.raises(ConnectionLost, match=f"cannot connect to {url}: connection refused"):
        async with connect(url):
            pass


@pytest.mark.parametrize("status", [b"400 Bad Request", b"404 Not Found"])
async def test_connect_to_an_http_server_says_it_is_not_a_websocket_server(status: bytes) -> None:
    async def http(stream: trio.SocketStream) -> None:
        await stream.receive_some(1 << 16)
        await stream.send_all(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, http, 0)
        url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        with trio.fail_after(10), pytest.raises(ConnectionLost) as info:
            async with connect(url):
                pass
        nursery.cancel_scope.cancel()
    assert f"cannot connect to {url}: not a WebSocket server" in str(info.value)
    assert f"HTTP {status[:3].decode()}" in str(info.value)


async def test_connect_to_a_server_that_never_answers_times_out(autojump_clock: trio.abc.Clock) -> None:
    # trio-websocket's own timeout would leave its reader waiting on this server forever.
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        with pytest.raises(ConnectionLost, match="timed out after 5 s"):
            async with connect(url, connect_timeout=5):
                pass
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:8000", "must start with ws:// or wss:// (e.g. ws://127.0.0.1:8000)"),
        ("https://example.com", "e.g. wss://example.com"),
        ("127.0.0.1:8000", "must start with ws:// or wss://"),
        ("ws://127.0.0.1:99999", "out of range"),
        ("ws://:8000", "names no host"),
    ],
)
async def test_connect_refuses_a_url_that_is_not_a_websocket_url(url: str, message: str) -> None:
    with pytest.raises(InvalidURL, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        async with connect(url):
            pass


# ---- help -------------------------------------------------------------------------------------


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    return parser._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_option_states_its_default(command: str) -> None:
    parser = _subparser(command)
    missing = [
        action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and "default" not in (action.help or "")
    ]
    assert missing == []
    text = parser.format_help()  # every %(...)s fills in
    assert "%(" not in text and "(default: " in text


def test_engine_defaults_in_the_help_are_engine_args_own() -> None:
    text = " ".join(_subparser("serve").format_help().split())  # unwrap the lines
    defaults = EngineArgs()
    assert f"(default: {defaults.block_size})" in text
    assert f"(default: {defaults.max_num_batched_tokens})" in text
    assert f"(default: {defaults.gpu_memory_utilization})" in text
    assert "(default: on GPUs only)" in text  # async_scheduling=None explained, not "None"
    assert "(default: None)" not in text


# ---- serve's listening errors and Ctrl-C in any subcommand -------------------------------------


def test_a_listening_failure_says_what_to_change() -> None:
    assert "--port 0" in commands._listen_failure(OSError(errno.EADDRINUSE, "Address already in use"))
    assert "check --host" in commands._listen_failure(OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    assert "--host takes" in commands._listen_failure(socket.gaierror(-2, "Name or service not known"))
    assert commands._listen_failure(OSError(errno.EIO, "I/O error")) == "I/O error"


@pytest.mark.parametrize("raised", [KeyboardInterrupt(), BaseExceptionGroup("from a nursery", [KeyboardInterrupt()])])
def test_ctrl_c_that_a_subcommand_does_not_handle_exits_130(
    raised: BaseException, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise raised

    monkeypatch.setattr(commands, "run_serve", interrupted)
    assert cli.main(["serve"]) == flags.EXIT_INTERRUPTED
    assert _one_line_error(capsys.readouterr().err, "mini-vllm serve: interrupted")
