"""The ``mini-vllm`` command line: flags, generate (local and remote), serve and its Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest_serving import Reference, build_engine, greedy, running_server

from mini_vllm import cli
from mini_vllm.engine import EngineArgs
from mini_vllm.transport import commands, flags
from mini_vllm.transport.client import GenerationFailed, connect

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference(demo_model_dir: Path) -> Reference:
    return Reference(demo_model_dir)


def test_model_specs() -> None:
    assert flags.parse_model_spec(None) == (None, None)
    assert flags.parse_model_spec("demo") == (None, None)
    assert flags.parse_model_spec("small=/models/x") == ("small", "/models/x")
    assert flags.parse_model_spec("/models/x") == (None, "/models/x")
    assert flags.parse_model_spec("Qwen/Qwen3-0.6B") == (None, "Qwen/Qwen3-0.6B")
    assert flags.parse_model_spec("bench=qwen3-0.6b") == ("bench", "qwen3-0.6b")
    assert flags.parse_model_spec("chat=demo") == ("chat", None)


def test_serve_defaults_and_engine_flags_with_vllm_spellings() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)
    assert flags.engine_args_from(args, None) == EngineArgs()
    args = parser.parse_args(
        [
            "serve",
            "--model", "a=/x",
            "--model", "/y",
            "--max-model-len", "512",
            "--block-size", "32",
            "--max-num-seqs", "8",
            "--max-num-batched-tokens", "1024",
            "--gpu-memory-utilization", "0.5",
            "--no-enable-prefix-caching",
            "--dtype", "bfloat16",
            "--load-format", "dummy",
            "--num-kv-blocks", "100",
            "--seed", "7",
            "--no-skinny-kernels",
            "--programmatic-dependent-launch",
            "--port", "0",
        ]
    )  # fmt: skip
    first = flags.engine_args_from(args, args.model[0])
    assert (first.model, first.model_name) == ("/x", "a")
    assert (first.max_model_len, first.block_size, first.max_num_seqs, first.max_num_batched_tokens) == (
        512,
        32,
        8,
        1024,
    )
    assert first.gpu_memory_utilization == 0.5 and first.enable_prefix_caching is False and first.dtype == "bfloat16"
    assert (first.load_format, first.num_kv_blocks, first.seed) == ("dummy", 100, 7)
    assert first.skinny_kernels is False and EngineArgs().skinny_kernels is True  # on unless turned off
    assert first.programmatic_dependent_launch is True and EngineArgs().programmatic_dependent_launch is None  # auto
    assert flags.engine_args_from(args, args.model[1]).model == "/y"
    off = parser.parse_args(["serve", "--no-programmatic-dependent-launch"])
    assert flags.engine_args_from(off, None).programmatic_dependent_launch is False


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == flags.EXIT_USAGE
    assert "serve" in capsys.readouterr().out


def test_subcommands_are_registered_in_one_place() -> None:
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"serve", "generate"} <= names


def test_generate_in_process_streams_the_offline_engines_text(
    demo_model_dir: Path, reference: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "Hello", "--model", str(demo_model_dir), "--num-kv-blocks", "64"]
    assert cli.main([*argv, "--max-tokens", "12", "--temperature", "0", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert out == reference("Hello", **greedy()).text + "\n"
    assert "finish_reason=length" in err and "completion_tokens=12" in err


def test_bad_model_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["serve", "--model", str(tmp_path / "missing"), "--port", "0"]) == flags.EXIT_ERROR
    assert "error:" in capsys.readouterr().err
    assert cli.main(["serve", "--block-size", "3"]) == flags.EXIT_USAGE
    assert "block_size" in capsys.readouterr().err


async def test_generate_against_a_server(
    demo_model_dir: Path, reference: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    hello = commands.PromptSpec("Hello")
    async with running_server([build_engine(demo_model_dir)]) as (_, server):
        code = await commands._generate_remote(server.url, hello, None, False, greedy(), commands._Output(sys.stdout))
        assert code == 0
        out, err = capsys.readouterr()
        assert out == reference("Hello", **greedy()).text + "\n"
        assert "finish_reason=length" in err
        code = await commands._generate_remote(server.url, hello, "nope", False, greedy(), commands._Output(sys.stdout))
        assert code == flags.EXIT_ERROR and "unknown_model" in capsys.readouterr().err


async def test_serve_prints_its_url_and_ctrl_c_ends_in_flight_requests_and_exits_0(
    demo_model_dir: Path, isolated_cache: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINI_VLLM_CACHE_DIR": str(isolated_cache)}
    argv = [sys.executable, "-m", "mini_vllm", "serve", "--port", "0", "--model", f"demo={demo_model_dir}"]
    proc = await trio.lowlevel.open_process(
        [*argv, "--num-kv-blocks", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out = b""
        while b"browser page" not in out or not out.endswith(b"\n"):
            chunk = await proc.stdout.receive_some()
            assert chunk, "the server exited before printing its URLs"
            out += chunk
        line, page_line = out.decode().splitlines()[:2]
        assert line.startswith("mini-vllm: serving demo on ws://127.0.0.1:")
        url = line.split(" on ")[1].strip()
        assert not url.endswith(":0")
        port = url.rsplit(":", 1)[1]
        assert page_line == f"mini-vllm: browser page: http://127.0.0.1:{port}/"
        async with await trio.open_tcp_stream("127.0.0.1", int(port)) as http:  # the page, on the same port
            await http.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := await http.receive_some():
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and b"<title>mini-vllm</title>" in answer
        async with connect(url) as client:
            stream = client.generate("Hello", **greedy(5000))
            interrupted = False
            with pytest.raises(GenerationFailed) as info:
                async for _ in stream:
                    if not interrupted:  # once: a second Ctrl-C forces an immediate exit
                        proc.send_signal(signal.SIGINT)
                        interrupted = True
            assert info.value.code == "shutting_down" and "shutting down" in info.value.message
        assert await proc.wait() == 0
        err = (await proc.stderr.receive_some(1 << 20)).decode()
        assert "loaded in" in err and "stopped" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
