"""``mini-vllm bench throughput`` on the CPU: clear errors for bad settings, a short OFFLINE-256 run
through both paths, and the host-time summary of decode steps."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from mini_vllm import cli
from mini_vllm.bench.throughput import cpu_step_times
from mini_vllm.engine.llm_engine import StepTiming
from mini_vllm.engine.workloads import offline_256

pytestmark = pytest.mark.timeout(120)


def test_bad_settings_and_models_are_errors_not_tracebacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["bench", "throughput", "--num-requests", "1", "--output-dir", str(tmp_path)]
    assert cli.main([*base, "--model", "qwen3-0.6b", "--max-num-seqs", "0"]) == 2
    err = capsys.readouterr().err
    assert "mini-vllm bench throughput: error: max_num_seqs must be" in err and "Traceback" not in err
    assert cli.main([*base, "--model", str(tmp_path / "missing")]) == 1
    assert "mini-vllm bench throughput: error:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_one_offline_256_request_through_both_paths(
    tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tiny_model("LlamaForCausalLM", max_position_embeddings=2048)
    argv = ["bench", "throughput", "--model", str(path), "--num-requests", "1", "--output-dir", str(tmp_path),
            "--tag", "cpu"]
    assert cli.main(argv) == 0
    (out,) = tmp_path.glob("throughput-*-cpu.json")
    record = json.loads(out.read_text())
    want = offline_256(300)[0].output_len  # the tiny model's vocabulary is 300
    assert record["workload"] == "OFFLINE-256[:1]"
    assert record["command"] == "mini-vllm " + " ".join(argv)
    for name in ("offline", "actors"):
        assert record[name]["output_tokens"] == want
        assert record[name]["output_tokens_per_s"] > 0
    assert record["output_tokens_per_s"] == record["actors"]["output_tokens_per_s"]
    assert record["offline"]["cpu_step_ms"]["running_seqs"] == 1
    assert "floor_output_tokens_per_s" not in record  # no GPU, no measured floor
    table = capsys.readouterr().out
    assert "actors: output tok/s" in table and "offline: output tok/s" in table


def _timing(num_seqs: int, decode_only: bool, ms: float) -> StepTiming:
    return StepTiming(num_seqs, num_seqs, decode_only, ms / 1e3, 2 * ms / 1e3, 3 * ms / 1e3, 4 * ms / 1e3)


def test_cpu_step_times_are_medians_of_full_decode_steps() -> None:
    timings = [
        _timing(4, False, 100.0),  # a prefill step of a full batch: not counted
        _timing(2, True, 50.0),  # decode, but the batch is not full: not counted
        _timing(4, True, 1.0),
        _timing(4, True, 3.0),
        _timing(4, True, 2.0),
    ]
    got = cpu_step_times(timings)["cpu_step_ms"]
    assert got == {
        "running_seqs": 4, "steps_measured": 3, "schedule_and_prepare": 2.0, "launch": 4.0,
        "process_outputs": 8.0, "total_host": 14.0, "wait_for_gpu": 6.0,
    }
    assert cpu_step_times([]) == {}
    assert cpu_step_times([_timing(3, False, 1.0)]) == {}
