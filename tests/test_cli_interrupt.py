"""Ctrl-C: a command it stops exits 130 with a one-line message; ``serve`` stopped gracefully exits 0
(tests/test_cli.py), but interrupted while loading its models exits 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest_serving import build_engine, running_server

from mini_vllm.transport import flags

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parent.parent


async def _start(argv: list[str], isolated_cache: Path) -> trio.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINI_VLLM_CACHE_DIR": str(isolated_cache)}
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "mini_vllm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
    )


async def _interrupt_once(proc: trio.Process, stream: trio.abc.ReceiveStream, until: bytes) -> tuple[int, str]:
    """Read ``stream`` until ``until`` shows (b"": any output), send SIGINT, return (exit code, stderr)."""
    try:
        seen = b""
        with trio.fail_after(90):
            while not seen or until not in seen:
                chunk = await stream.receive_some()
                assert chunk, f"exited before printing {until!r}"
                seen += chunk
            proc.send_signal(signal.SIGINT)
            code = await proc.wait()
        assert proc.stderr is not None
        err = b""
        while chunk := await proc.stderr.receive_some():
            err += chunk
        return code, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _last_line(err: str) -> str:
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


async def test_ctrl_c_during_generate_in_process_exits_130(demo_model_dir: Path, isolated_cache: Path) -> None:
    argv = ["generate", "Hello", "--model", str(demo_model_dir), "--num-kv-blocks", "64", "--max-tokens", "5000",
            "--ignore-eos", "--temperature", "0"]  # fmt: skip
    proc = await _start(argv, isolated_cache)
    assert proc.stdout is not None
    code, err = await _interrupt_once(proc, proc.stdout, b"")  # any output: it is generating
    assert code == flags.EXIT_INTERRUPTED
    assert _last_line(err) == "mini-vllm generate: interrupted"


async def test_ctrl_c_during_generate_against_a_server_exits_130(demo_model_dir: Path, isolated_cache: Path) -> None:
    async with running_server([build_engine(demo_model_dir)]) as (_, server):
        argv = ["generate", "Hello", "--url", server.url, "--max-tokens", "5000", "--ignore-eos"]
        proc = await _start(argv, isolated_cache)
        assert proc.stdout is not None
        code, err = await _interrupt_once(proc, proc.stdout, b"")
    assert code == flags.EXIT_INTERRUPTED
    assert _last_line(err) == "mini-vllm generate: interrupted"


async def test_ctrl_c_while_serve_loads_its_models_exits_130(isolated_cache: Path) -> None:
    # A preset of real shapes takes seconds to build on the CPU: the signal lands while it loads.
    argv = ["serve", "--port", "0", "--model", "qwen3-0.6b", "--dtype", "bfloat16", "--device", "cpu",
            "--num-kv-blocks", "4", "--max-model-len", "32"]  # fmt: skip
    proc = await _start(argv, isolated_cache)
    assert proc.stderr is not None
    code, err = await _interrupt_once(proc, proc.stderr, b"loading")
    assert code == flags.EXIT_INTERRUPTED
    assert _last_line(err) == "mini-vllm serve: interrupted while loading the models"
    assert "serving" not in err
