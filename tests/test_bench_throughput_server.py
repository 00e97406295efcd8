"""``mini-vllm bench throughput --path ...,server`` on the CPU: the same requests sent over WebSockets to
a ``mini-vllm serve`` subprocess the bench starts and always stops, with exact output lengths
checked, and a server that cannot start reported in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mini_vllm import cli
from mini_vllm.bench import throughput as bench_throughput
from mini_vllm.bench.serve import Tracker
from mini_vllm.bench.throughput import ServerPathError, _check_exact
from mini_vllm.engine.workloads import WorkloadRequest, online_1000

pytestmark = pytest.mark.timeout(180)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_three_paths_with_the_server_over_two_connections(
    demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # ONLINE-1000's first three requests: 768 output tokens, the quickest three of either workload.
    argv = ["bench", "throughput", "--model", "demo", "--workload", "ONLINE-1000", "--num-requests", "3",
            "--connections", "2", "--path", "offline,actors,server", "--output-dir", str(tmp_path), "--tag", "srv"]
    assert cli.main(argv) == 0
    (out,) = tmp_path.glob("throughput-demo-*-srv.json")
    record = json.loads(out.read_text())
    vocab_size = json.loads((demo_model_dir / "config.json").read_text())["vocab_size"]
    want = sum(r.output_len for r in online_1000(vocab_size, 3))
    assert record["workload"] == "ONLINE-1000[:3]"
    for name in ("offline", "actors", "server"):
        assert record[name]["output_tokens"] == want
        assert record[name]["output_tokens_per_s"] > 0
    server = record["server"]
    assert server["connections"] == 2 and server["client_processes"] == 2  # one per connection at most
    assert server["fraction_of_offline"] == pytest.approx(
        server["output_tokens_per_s"] / record["offline"]["output_tokens_per_s"])
    assert "--no-enable-prefix-caching" in server["server_command"] and "--model demo" in server["server_command"]
    assert _gone(server["pid"])  # stopped and reaped
    table = capsys.readouterr().out
    assert "server: output tok/s" in table and "over 2 connections" in table and "of offline" in table


def test_a_server_that_cannot_start_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing"
    assert cli.main(["bench", "throughput", "--model", str(missing), "--num-requests", "1", "--path", "server"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    # The server's own words, quoted from its stderr.
    assert errors == [f"mini-vllm bench throughput: error: the server path: the server exited (status 1) before "
                      f"serving: mini-vllm serve: error: {missing}: no such directory, and not a Hugging Face "
                      f"model id (owner/name)"]
    assert list(tmp_path.iterdir()) == []


def test_the_server_path_passes_the_engine_flags() -> None:
    args = cli.build_parser().parse_args(
        ["bench", "throughput", "--model", "qwen3-0.6b", "--max-num-seqs", "64", "--num-kv-blocks", "900",
         "--enforce-eager", "--gpu-memory-utilization", "0.5", "--block-size", "32"])
    argv = bench_throughput.server_argv(args, "dummy", num_requests=1000, connections=256)
    flags = " ".join(argv[argv.index("serve") + 1:])
    assert flags == ("--host 127.0.0.1 --port 0 --model qwen3-0.6b --load-format dummy --max-num-seqs 64 "
                     "--max-num-batched-tokens 8192 --max-model-len 2048 --block-size 32 --gpu-memory-utilization 0.5 "
                     "--no-enable-prefix-caching --max-pending-requests 1016 --client-key off --max-requests-per-connection 16 "
                     "--shutdown-grace 1 --num-kv-blocks 900 --enforce-eager --skinny-kernels")
    args.skinny_kernels = False
    assert bench_throughput.server_argv(args, "dummy", num_requests=1000, connections=256)[-1] == "--no-skinny-kernels"
    args.serve_args = "--no-core-process --max-num-seqs 32"
    argv = bench_throughput.server_argv(args, "dummy", num_requests=1000, connections=10)
    assert argv[argv.index("--max-requests-per-connection") + 1] == "101"  # 100 per connection, and a margin
    assert argv[-3:] == ["--no-core-process", "--max-num-seqs", "32"]  # last, so they win


def test_a_request_short_of_its_max_tokens_is_an_error() -> None:
    requests = [WorkloadRequest([1, 2], 3), WorkloadRequest([3], 2)]
    done = Tracker(0, 2, 3, tokens=3, finish_reason="length")
    short = Tracker(1, 1, 2, tokens=1, finish_reason="stop")
    _check_exact([done, Tracker(1, 1, 2, tokens=2, finish_reason="length")], requests, "run")
    with pytest.raises(ServerPathError, match=r"run: 1 of 2 requests .* \(request 1: 1 of 2 tokens, finish_reason stop\)"):
        _check_exact([done, short], requests, "run")
