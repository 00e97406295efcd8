"""``mini-vllm bench throughput`` on the CPU: clear errors for bad settings, a short OFFLINE-256 run
through both paths, ONLINE-1000 chosen by name, the --path list, the host-time summary of decode
steps, the full run refused without CUDA (with an estimate), and the JSON in the current directory
by default. The server path has its own file, test_bench_throughput_server.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mini_vllm import cli
from mini_vllm.bench import throughput as bench_throughput
from mini_vllm.bench.env import measure_cpu_peaks
from mini_vllm.bench.throughput import cpu_step_times, parse_paths
from mini_vllm.engine import workloads
from mini_vllm.engine.config import PRESETS, ModelConfig
from mini_vllm.engine.step_loop import StepTiming
from mini_vllm.engine.workloads import offline_256, online_1000, physical_floor

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


def test_online_1000_is_chosen_by_name(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    path = tiny_model("LlamaForCausalLM", max_position_embeddings=2048)
    argv = ["bench", "throughput", "--model", str(path), "--workload", "ONLINE-1000", "--num-requests", "2",
            "--path", "offline", "--output-dir", str(tmp_path), "--block-size", "32"]
    assert cli.main(argv) == 0
    (out,) = tmp_path.glob("throughput-*.json")
    record = json.loads(out.read_text())
    assert record["workload"] == "ONLINE-1000[:2]" and "actors" not in record and "server" not in record
    assert record["engine"]["block_size"] == 32 and record["engine"]["kv_tokens"] == 32 * record["engine"]["kv_blocks"]
    assert record["offline"]["output_tokens"] == sum(r.output_len for r in online_1000(300, 2))
    assert record["output_tokens_per_s"] == record["offline"]["output_tokens_per_s"]


def test_paths_are_a_comma_separated_list_in_run_order() -> None:
    assert parse_paths("both") == ("offline", "actors")  # today's default
    assert parse_paths("server") == ("server",)
    assert parse_paths("server, actors,offline") == ("offline", "actors", "server")
    assert parse_paths("both,server,offline") == ("offline", "actors", "server")


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


def test_time_by_step_gives_a_pipelined_turn_to_the_step_it_waited_for() -> None:
    # _timing(n, kind, ms) lasts 10 ms x ms in all (1 + 2 + 3 + 4).
    timings = [_timing(200, False, 1.0), _timing(200, True, 10.0), _timing(40, True, 2.0), _timing(33, True, 3.0)]
    piped = bench_throughput.time_by_step(timings, pipelined=True)
    # Turn 1 (100 ms) waited for the prefill step; turns 2 and 3 for decode steps of 200 and 40.
    # wait is 3 ms x ms of each turn's 10 ms x ms.
    assert piped == {
        "prefill-carrying": {"steps": 2, "seconds": pytest.approx(0.110), "wait_seconds": pytest.approx(0.033)},
        "decode 193-224": {"steps": 1, "seconds": pytest.approx(0.020), "wait_seconds": pytest.approx(0.006)},
        "decode 33-64": {"steps": 1, "seconds": pytest.approx(0.030), "wait_seconds": pytest.approx(0.009)},
    }
    inline = bench_throughput.time_by_step(timings, pipelined=False)
    assert inline == {
        "prefill-carrying": {"steps": 1, "seconds": pytest.approx(0.010), "wait_seconds": pytest.approx(0.003)},
        "decode 193-224": {"steps": 1, "seconds": pytest.approx(0.100), "wait_seconds": pytest.approx(0.030)},
        "decode 33-64": {"steps": 2, "seconds": pytest.approx(0.050), "wait_seconds": pytest.approx(0.015)},
    }


def test_against_floor_sets_each_kind_of_step_beside_the_floors() -> None:
    config = ModelConfig.from_dict(PRESETS["qwen3-0.6b"], "qwen3-0.6b")
    requests = offline_256(config.vocab_size)
    floor = physical_floor(config, requests, 4.2e12, 7.9e14)
    steps = floor.decode_steps
    assert sum(s.seconds for s in steps) == pytest.approx(floor.decode_seconds, rel=1e-12)
    assert sum(1 for s in steps if s.live > 224) > 0 and min(s.live for s in steps) >= 1
    measured = {"prefill-carrying": {"steps": 19, "seconds": 0.6}, "decode 225-256": {"steps": 180, "seconds": 1.2},
                "decode 1-32": {"steps": 100, "seconds": 0.2}}
    rows = bench_throughput.against_floor(measured, floor)
    keys = [r["steps"] for r in rows]
    assert keys[0] == "prefill-carrying" and keys[1] == "decode 1-32" and keys[-1] == "decode 225-256"
    assert len(keys) == 9  # prefill + every bin of 32 the floor's live counts cover
    first = rows[0]
    assert first["floor_steps"] == 1 and first["floor_seconds"] == pytest.approx(floor.prefill_seconds, abs=1e-4)
    assert first["over_floor_seconds"] == pytest.approx(0.6 - floor.prefill_seconds, abs=1e-4)
    assert sum(r["floor_seconds"] for r in rows) == pytest.approx(floor.seconds, abs=1e-3)
    unmeasured = next(r for r in rows if r["steps"] == "decode 97-128")
    assert unmeasured["measured_steps"] == 0 and unmeasured["over_floor_seconds"] < 0


def test_serial_floor_prices_each_projection_at_its_own_bound() -> None:
    """One request, one decode step, numbers small enough to work by hand: at a low peak the
    projections are compute-bound while the KV read is bandwidth-bound, so the serial floor (one
    kernel after another) is their sum where the floor takes the larger of bytes and FLOPs."""
    config = ModelConfig.from_dict(PRESETS["qwen3-0.6b"], "qwen3-0.6b")
    shapes = workloads.projection_shapes(config)
    assert sum(k * n * count for k, n, count in shapes) == workloads.matmul_params(config)
    # By hand: 28 x (1024 x 4096 + 2048 x 1024 + 1024 x 6144 + 3072 x 1024) + 1024 x 151,936.
    assert workloads.matmul_params(config) == 595_984_384
    request = [workloads.WorkloadRequest([1] * 100, 2)]
    bandwidth, flops = 1e12, 1e9  # every projection compute-bound
    floor = physical_floor(config, request, bandwidth, flops)
    (step,) = floor.decode_steps
    params = workloads.matmul_params(config)
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * 101
    weights = workloads.weight_bytes(config)
    assert step.seconds == pytest.approx(max((weights + kv) / bandwidth, 2 * params / flops))
    assert step.serial_seconds == pytest.approx(2 * params / flops + (weights - 2 * params + kv) / bandwidth)
    assert floor.serial_seconds == pytest.approx(floor.prefill_seconds + step.serial_seconds)
    # Bandwidth-bound everywhere (a single row at a high peak): the two agree.
    fast = physical_floor(config, request, 1e12, 1e18).decode_steps[0]
    assert fast.serial_seconds == pytest.approx(fast.seconds)


def test_serial_floor_is_never_below_the_floor() -> None:
    for name in ("qwen3-0.6b", "llama3-8b"):
        config = ModelConfig.from_dict(PRESETS[name], name)
        floor = physical_floor(config, offline_256(config.vocab_size), 4.2e12, 7.7e14)
        assert all(s.serial_seconds >= s.seconds * (1 - 1e-12) for s in floor.decode_steps)
        # At 256 rows llama3-8b's projections are compute-bound on these peaks: there the two part.
        big = max(floor.decode_steps, key=lambda s: s.live)
        assert (big.serial_seconds > 1.05 * big.seconds) == (name == "llama3-8b")
        rows = bench_throughput.against_floor({}, floor)
        assert sum(r["serial_floor_seconds"] for r in rows) == pytest.approx(floor.serial_seconds, abs=1e-3)


# ---- on a machine without CUDA -----------------------------------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave as on a machine without a GPU, whichever machine runs the tests."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _cpu_floor(config: ModelConfig) -> float:
    return physical_floor(config, offline_256(config.vocab_size), 50e9, 200e9, bytes_per_param=4).seconds


def test_the_full_run_is_refused_on_the_cpu_with_an_estimate(
    no_cuda: None, tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_throughput, "measure_cpu_peaks", lambda: (50e9, 200e9))  # 50 GB/s, 200 GFLOP/s
    assert cli.main(["bench", "throughput"]) == 2
    [line] = capsys.readouterr().err.splitlines()  # one line, before anything loads
    assert line.startswith("mini-vllm bench throughput: error: no CUDA GPU, and the full OFFLINE-256 run of qwen3-0.6b")
    qwen = _cpu_floor(ModelConfig.from_dict(PRESETS["qwen3-0.6b"], "qwen3-0.6b"))
    assert 20 * 60 < qwen < 90 * 60 and f"would take at least {qwen / 60:.0f} min" in line
    assert "pass --num-requests N" in line and "200 GFLOP/s and 50 GB/s" in line
    assert cli.main(["bench", "throughput", "--model", "llama3-8b", "--path", "offline"]) == 2
    llama = _cpu_floor(ModelConfig.from_dict(PRESETS["llama3-8b"], "llama3-8b"))
    assert f"would take at least {llama / 3600:.1f} h" in capsys.readouterr().err
    # A model directory: its config.json gives the shapes. A model that cannot be read: no estimate.
    path = tiny_model("LlamaForCausalLM", max_position_embeddings=2048)
    assert cli.main(["bench", "throughput", "--model", str(path)]) == 2
    assert f"the full OFFLINE-256 run of {path} would take at least " in capsys.readouterr().err
    assert cli.main(["bench", "throughput", "--model", str(tmp_path / "missing")]) == 2
    assert "would take hours: pass --num-requests N" in capsys.readouterr().err
    # The estimate is the chosen workload's.
    assert cli.main(["bench", "throughput", "--workload", "ONLINE-1000", "--path", "server"]) == 2
    online = physical_floor(ModelConfig.from_dict(PRESETS["qwen3-0.6b"], "qwen3-0.6b"),
                            online_1000(PRESETS["qwen3-0.6b"]["vocab_size"]), 50e9, 200e9, bytes_per_param=4).seconds
    assert f"the full ONLINE-1000 run of qwen3-0.6b would take at least {online / 60:.0f} min" in (
        capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_cpu_peaks_are_measured() -> None:
    bandwidth, flops = measure_cpu_peaks()
    assert bandwidth > 1e8 and flops > 1e8


def test_bad_flags_are_one_line_errors_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    cases = [
        (["--num-requests", "0"], "--num-requests must be in 1..256"),
        (["--num-requests", "257"], "--num-requests must be in 1..256"),
        (["--num-requests", "1", "--max-model-len", "900"], "--max-model-len 900 cannot hold these prompts (up to 964"),
        (["--num-requests", "1", "--peer-timeout", "0"], "--peer-timeout must be > 0"),
        (["--num-requests", "1", "--block-size", "24"], "--block-size must be a power of two <= 256, got 24"),
        (["--num-requests", "1", "--block-size", "0"], "--block-size must be a power of two <= 256, got 0"),
        (["--num-requests", "1", "--block-size", "512"], "--block-size must be a power of two <= 256, got 512"),
        (["--num-requests", "1", "--trace", "t"], "--trace profiles GPU kernels and needs a CUDA GPU"),
        (["--num-requests", "1", "--tag", "a/b"], "--tag is part of a file name"),
        (["--num-requests", "1", "--output-dir", "a-file"], "--output-dir a-file is a file: give a folder"),
        (["--num-requests", "1", "--output-dir", "a-file/sub"], "a-file is a file, not a folder"),
        (["--num-requests", "x"], "argument --num-requests: invalid int value: 'x'"),
        (["--num-requests", "1", "--max-model-len", "1000"],
         "--max-model-len 1000 cannot hold these requests' prompt + output (up to 1458 tokens)"),
        (["--workload", "ONLINE-1000", "--num-requests", "1001"], "--num-requests must be in 1..1000"),
        (["--workload", "ONLINE-2000"], "argument --workload: invalid choice: 'ONLINE-2000'"),
        (["--path", "offline,bogus"], "argument --path: 'bogus' is not a path: give a comma-separated list of "
                                      "offline, actors, server"),
        (["--path", "offline,"], "argument --path: '' is not a path"),
        (["--connections", "0"], "argument --connections: must be an integer >= 1"),
        (["--client-processes", "0"], "argument --client-processes: must be an integer >= 1"),
        (["--num-requests", "1", "--serve-args", "'x"], "--serve-args \"'x\": No closing quotation"),
        (["--tensor-parallel-size", "0"], "argument --tensor-parallel-size: must be an integer >= 1, got 0"),
    ]
    for flags, message in cases:
        try:
            code = cli.main(["bench", "throughput", *flags])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        assert code == 2, flags
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("mini-vllm bench throughput: error: ") and message in line, (flags, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_the_json_goes_to_the_current_directory_by_default(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_model("LlamaForCausalLM", max_position_embeddings=2048)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "throughput", "--model", str(path), "--num-requests", "1", "--path", "offline"]) == 0
    (out,) = tmp_path.iterdir()  # no docs/ tree
    assert out.name.startswith(f"throughput-{str(path).replace('/', '_')}-") and out.suffix == ".json"
    assert json.loads(out.read_text())["offline"]["output_tokens"] == offline_256(300)[0].output_len


@pytest.mark.parametrize("flag", ["--freeze-gc", "--no-freeze-gc"])
def test_the_in_process_runs_freeze_the_collector_as_the_core_does_and_give_it_back(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], flag: str,
) -> None:
    import gc

    from mini_vllm.actors.core import CORE_GC_THRESHOLD

    path = tiny_model("LlamaForCausalLM", max_position_embeddings=2048)
    seen: list[tuple[int, tuple[int, ...]]] = []
    run = bench_throughput.IN_PROCESS_RUNS["offline"]

    def watched(engine: object, requests: list) -> dict:
        seen.append((gc.get_freeze_count(), gc.get_threshold()))
        return run(engine, requests)

    monkeypatch.setitem(bench_throughput.IN_PROCESS_RUNS, "offline", watched)
    before = gc.get_threshold()
    argv = ["bench", "throughput", "--model", str(path), "--num-requests", "1", "--path", "offline",
            "--output-dir", str(tmp_path), flag]
    assert cli.main(argv) == 0
    frozen = flag == "--freeze-gc"
    ((count, threshold),) = seen
    assert (count > 0, threshold) == ((True, CORE_GC_THRESHOLD) if frozen else (False, before))
    assert (gc.get_freeze_count(), gc.get_threshold()) == (0, before)  # given back for the rest of the process
    (out,) = tmp_path.glob("throughput-*.json")
    assert json.loads(out.read_text())["freeze_gc"] is frozen
    assert ("frozen after start-up" if frozen else "Python's defaults") in capsys.readouterr().out
