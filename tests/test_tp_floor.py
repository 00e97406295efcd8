"""The physical floor over N GPUs (engine/workloads.py, ``bench latency``'s decode floor), the
collectives' cost as a function of bytes, their measurement over gloo with two processes, and
``--tensor-parallel-size`` on ``bench throughput`` and ``bench latency``."""

from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
import torch

from mini_vllm import cli
from mini_vllm.bench import latency as bench_latency
from mini_vllm.bench import throughput as bench_throughput
from mini_vllm.bench.allreduce import (
    CollectiveError,
    CollectiveMeasurement,
    CollectivePoint,
    collectives_line,
    measure_collectives,
    measure_tensor_parallel,
)
from mini_vllm.bench.env import gpus_missing
from mini_vllm.bench.latency import decode_floor_s
from mini_vllm.engine.config import PRESETS, ModelConfig
from mini_vllm.engine.workloads import (
    CollectiveCost,
    ParallelCost,
    WorkloadRequest,
    kv_heads_per_rank,
    offline_256,
    physical_floor,
)

pytestmark = pytest.mark.timeout(60)

H200_BANDWIDTH, H200_FLOPS = 4.3e12, 790e12  # docs/design.md's figures

# Untied Llama, small enough to add up by hand (as in test_bench_latency.py): matmul parameters
# 2 x 2688 + 1600 = 6976; weights (with the embedding) 17,152 bytes in bf16; KV 64 bytes a token.
SMALL = ModelConfig.from_dict(
    {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 16, "intermediate_size": 40,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
    "test",
)


def _preset(name: str) -> ModelConfig:
    return ModelConfig.from_dict(PRESETS[name], name)


def _constant(seconds: float) -> CollectiveCost:
    """The same time at every size (up to a petabyte)."""
    return CollectiveCost([(1, seconds), (10**15, seconds)])


def _parallel(size: int, all_reduce_s: float = 0.0, all_gather_s: float = 0.0) -> ParallelCost:
    return ParallelCost(size, _constant(all_reduce_s), _constant(all_gather_s))


# ---- one GPU: today's numbers ------------------------------------------------------------------------


def test_one_gpu_gives_exactly_todays_floors() -> None:
    qwen, llama = _preset("qwen3-0.6b"), _preset("llama3-8b")
    # Pinned before tensor parallelism was added (the same expressions, the same floats).
    for config, seconds, prefill, decode in (
        (qwen, 3.9706067341826867, 0.22359825266454683, 3.7470084815181397),
        (llama, 10.591130067998812, 2.8155578523336913, 7.77557221566512),
    ):
        requests = offline_256(config.vocab_size)
        for parallel in (None, _parallel(1, all_reduce_s=1.0, all_gather_s=1.0)):  # one rank exchanges nothing
            floor = physical_floor(config, requests, H200_BANDWIDTH, H200_FLOPS, parallel=parallel)
            assert (floor.seconds, floor.prefill_seconds, floor.decode_seconds) == (seconds, prefill, decode)
            assert floor.communication_seconds == 0.0
            assert floor.output_tokens_per_s == 140_797 / seconds
    assert decode_floor_s(llama, 1, 1088, H200_BANDWIDTH) == 0.003523703069767442
    assert decode_floor_s(llama, 1, 1088, H200_BANDWIDTH, _parallel(1, 1.0, 1.0)) == 0.003523703069767442


# ---- N GPUs ----------------------------------------------------------------------------------------


def test_two_gpus_by_hand() -> None:
    request = [WorkloadRequest([1, 2, 3], 3)]  # a prompt of 3, then decode steps at contexts 4 and 5
    one = physical_floor(SMALL, request, 1000.0, 1e9)
    # Bandwidth-bound steps: (17,152 + 64 x context) bytes at 1000 B/s.
    assert one.decode_seconds == pytest.approx((17_152 + 64 * 4) / 1000 + (17_152 + 64 * 5) / 1000)
    assert one.prefill_seconds == pytest.approx(2 * 6976 * 3 / 1e9)
    two = physical_floor(SMALL, request, 1000.0, 1e9, parallel=_parallel(2, all_reduce_s=1e-3, all_gather_s=2e-3))
    # Each rank: half the weights, one of the two KV heads; every forward 2 layers x 2 all-reduces + 1 gather.
    collectives = 2 * 2 * 1e-3 + 2e-3
    assert two.decode_seconds == pytest.approx((8576 + 32 * 4) / 1000 + (8576 + 32 * 5) / 1000 + 2 * collectives)
    assert two.prefill_seconds == pytest.approx(2 * 6976 * 3 / 2e9 + collectives)
    assert two.communication_seconds == pytest.approx(3 * collectives)  # the prefill and two decode steps
    assert two.seconds == pytest.approx(two.prefill_seconds + two.decode_seconds)
    assert two.output_tokens_per_s == pytest.approx(3 / two.seconds)


@pytest.mark.parametrize("preset", ["llama3-8b", "llama3-70b"])
def test_weights_kv_and_flops_split_over_n_gpus(preset: str) -> None:
    config = _preset(preset)
    requests = offline_256(config.vocab_size, 16)
    one = physical_floor(config, requests, H200_BANDWIDTH, H200_FLOPS)
    for n in (2, 4):
        # Free collectives: every step's bytes and FLOPs split evenly (8 KV heads divide by 2 and 4).
        free = physical_floor(config, requests, H200_BANDWIDTH, H200_FLOPS, parallel=_parallel(n))
        assert free.prefill_seconds == pytest.approx(one.prefill_seconds / n, rel=1e-12)
        assert free.decode_seconds == pytest.approx(one.decode_seconds / n, rel=1e-12)
        assert free.communication_seconds == 0.0
        # Priced collectives add exactly their time: one forward per step (the prefill is one).
        priced = physical_floor(config, requests, H200_BANDWIDTH, H200_FLOPS, parallel=_parallel(n, 1e-5, 3e-5))
        forwards = 1 + max(r.output_len for r in requests) - 1
        per_forward = 2 * config.num_hidden_layers * 1e-5 + 3e-5
        assert priced.communication_seconds == pytest.approx(forwards * per_forward, rel=1e-12)
        assert priced.seconds == pytest.approx(free.seconds + priced.communication_seconds, rel=1e-12)
    # Two GPUs beat one, four beat two, on the same per-GPU peaks and the H200's measured all-reduce scale.
    floors = [physical_floor(config, requests, H200_BANDWIDTH, H200_FLOPS, parallel=_parallel(n, 1e-5, 2e-5)).seconds
              for n in (2, 4)]
    assert one.seconds > floors[0] > floors[1]


def test_kv_heads_are_shared_when_there_are_more_ranks_than_heads() -> None:
    assert [kv_heads_per_rank(SMALL, n) for n in (1, 2, 4)] == [2, 1, 1]
    assert kv_heads_per_rank(_preset("llama3-70b"), 4) == 2
    request = [WorkloadRequest([1] * 10, 2)]
    # One decode step at context 11, bandwidth-bound: with 4 ranks each still holds one of the 2 heads.
    two = physical_floor(SMALL, request, 1.0, 1e18, parallel=_parallel(2)).decode_seconds
    four = physical_floor(SMALL, request, 1.0, 1e18, parallel=_parallel(4)).decode_seconds
    assert two == pytest.approx(17_152 / 2 + 32 * 11)
    assert four == pytest.approx(17_152 / 4 + 32 * 11)


def test_collectives_are_priced_at_a_steps_bytes() -> None:
    linear = CollectiveCost([(1, 1e-9), (2, 2e-9)])  # a nanosecond per byte
    parallel = ParallelCost(2, linear, CollectiveCost([(1, 1e-6), (2, 2e-6)]))
    # 3 tokens: all-reduces of 3 x 16 x 2 bytes, four of them; the gather of 3 x 100 logits x 2 bytes.
    assert parallel.step_seconds(SMALL, 3, 3) == pytest.approx(4 * 96e-9 + 600e-6)
    # A prefill of 40 tokens samples 2 rows; float32 doubles the bytes.
    assert parallel.step_seconds(SMALL, 40, 2, bytes_per_param=4) == pytest.approx(4 * 2560e-9 + 800e-6)
    assert ParallelCost(1, linear, linear).step_seconds(SMALL, 3, 3) == 0.0


def test_latency_decode_floor_over_two_gpus_by_hand() -> None:
    # bf16: 2 x 6976 weight bytes, KV 64 bytes a token x 10 tokens x 3 sequences = 1920; half of each.
    parallel = _parallel(2, all_reduce_s=1e-3, all_gather_s=5e-3)
    got = decode_floor_s(SMALL, 3, 10, 1000.0, parallel)
    assert got == pytest.approx((6976 + 960) / 1000 + 4 * 1e-3 + 5e-3)
    assert decode_floor_s(SMALL, 3, 10, 1000.0, _parallel(4)) == pytest.approx((13_952 / 4 + 960) / 1000)
    llama = _preset("llama3-70b")
    one = decode_floor_s(llama, 1, 1088, H200_BANDWIDTH)
    assert decode_floor_s(llama, 1, 1088, H200_BANDWIDTH, _parallel(4)) == pytest.approx(one / 4, rel=1e-12)


# ---- the cost of a collective as a function of bytes -------------------------------------------------


def test_collective_cost_interpolates_and_extrapolates() -> None:
    cost = CollectiveCost([(100, 1e-5), (200, 2e-5), (400, 3e-5)])
    assert cost.seconds(0) == 0.0
    assert cost.seconds(1) == 1e-5 and cost.seconds(100) == 1e-5  # latency-bound below the smallest
    assert cost.seconds(150) == pytest.approx(1.5e-5)
    assert cost.seconds(300) == pytest.approx(2.5e-5)
    assert cost.seconds(400) == 3e-5
    assert cost.seconds(1200) == pytest.approx(9e-5)  # bandwidth-bound above the largest


def test_a_small_size_costs_at_most_a_larger_ones_time() -> None:
    # Noise made 100 bytes slower than 200: it could be padded to 200, so it costs 200's time.
    cost = CollectiveCost([(100, 5e-5), (200, 2e-5), (400, 3e-5)])
    assert cost.seconds(50) == 2e-5 and cost.seconds(100) == 2e-5 and cost.seconds(150) == 2e-5
    assert cost.points == ((100, 5e-5), (200, 2e-5), (400, 3e-5))  # the measurements themselves are kept


@pytest.mark.parametrize(
    "points,message",
    [
        ([], "at least one"),
        ([(0, 1.0)], "bytes >= 1"),
        ([(10, -1.0)], "finite seconds >= 0"),
        ([(10, float("nan"))], "finite seconds >= 0"),
        ([(10, float("inf"))], "finite seconds >= 0"),
        ([(20, 1.0), (10, 2.0)], "strictly increasing bytes"),
        ([(10, 1.0), (10, 2.0)], "strictly increasing bytes"),
    ],
)
def test_collective_cost_rejects_bad_points(points: list[tuple[int, float]], message: str) -> None:
    with pytest.raises(ValueError, match=f"CollectiveCost.points must .*{message}"):
        CollectiveCost(points)


@pytest.mark.parametrize("size", [0, -2, 1.5, True])
def test_tensor_parallel_size_is_validated(size: Any) -> None:
    with pytest.raises(ValueError, match="ParallelCost.size .* must be an integer >= 1"):
        ParallelCost(size, _constant(0.0), _constant(0.0))


# ---- the measurement over gloo -----------------------------------------------------------------------


def test_all_reduce_and_gather_timed_over_gloo_with_two_processes() -> None:
    measured = measure_collectives(2, 16, 101, device="cpu", dtype=torch.float32, all_reduce_tokens=(4, 1),
                                   all_gather_rows=(2,), repeats=3, inner=2, warmup=1, timeout_s=60)
    assert (measured.world_size, measured.backend, measured.dtype) == (2, "gloo", "float32")
    # Sorted by size; the all-reduce's bytes are tokens x hidden x 4, the gather's the whole logits
    # (each rank's shard of ceil(101 / 2) = 51 columns).
    assert [(p.rows, p.bytes) for p in measured.all_reduce] == [(1, 64), (4, 256)]
    assert [(p.rows, p.bytes) for p in measured.all_gather] == [(2, 2 * 51 * 2 * 4)]
    assert all(0 < p.seconds < 10 for p in (*measured.all_reduce, *measured.all_gather))
    parallel = measured.tensor_parallel()
    assert parallel.size == 2 and parallel.all_reduce.seconds(256) == measured.all_reduce[1].seconds
    assert parallel.all_reduce.seconds(64) == min(p.seconds for p in measured.all_reduce)
    assert physical_floor(SMALL, [WorkloadRequest([1, 2], 3)], 1e9, 1e12, parallel=parallel).communication_seconds > 0
    record = measured.to_json()
    assert record["all_reduce_tokens_x_hidden"][1] == {"rows": 4, "bytes": 256,
                                                        "us": round(measured.all_reduce[1].seconds * 1e6, 3)}
    assert record["ops_per_repeat"] == 2 and record["repeats"] == 3
    assert multiprocessing.active_children() == []


def test_a_failing_rank_is_a_one_line_error_and_leaves_no_process() -> None:
    # gloo has no uint16 all-reduce: the ranks fail inside the collective.
    with pytest.raises(CollectiveError, match=r"^rank \d: RuntimeError: .*\(at \S+:\d+\)$"):
        measure_collectives(2, 4, 10, device="cpu", dtype=torch.uint16, all_reduce_tokens=(1,), all_gather_rows=(1,),
                            repeats=1, inner=1, warmup=0, timeout_s=60)
    assert multiprocessing.active_children() == []


def test_a_measurement_past_its_timeout_is_stopped() -> None:
    with pytest.raises(CollectiveError, match="did not finish within 0.05 s"):
        measure_collectives(2, 4, 10, device="cpu", timeout_s=0.05)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"world_size": 1}, "world_size must be at least 2"),
        ({"hidden_size": 0}, "hidden_size must be at least 1"),
        ({"repeats": 0}, "repeats must be at least 1"),
        ({"inner": 0}, "inner must be at least 1"),
        ({"warmup": -1}, "warmup must be at least 0"),
        ({"timeout_s": 0}, "timeout_s must be > 0"),
        ({"device": "tpu"}, "device must be cuda or cpu"),
        ({"all_reduce_tokens": ()}, "all_reduce_tokens must be a non-empty list of counts >= 1"),
        ({"all_gather_rows": (0, 4)}, "all_gather_rows must be a non-empty list of counts >= 1"),
    ],
)
def test_measurement_settings_are_checked_before_starting(overrides: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {"world_size": 2, "hidden_size": 4, "vocab_size": 10, "device": "cpu", **overrides}
    with pytest.raises(ValueError, match=message):
        measure_collectives(**kwargs)
    assert multiprocessing.active_children() == []


def test_cuda_ranks_need_that_many_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CollectiveError, match="device cuda was asked for, and this machine has no CUDA GPU"):
        measure_collectives(2, 4, 10, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CollectiveError, match="2 ranks need 2 GPUs, and this machine has 1"):
        measure_collectives(2, 4, 10, device="cuda")


def test_measure_tensor_parallel_without_the_models_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    assert measure_tensor_parallel("throughput", None, 2) == 1
    assert capsys.readouterr().err == (
        "mini-vllm bench throughput: error: --tensor-parallel-size: the model's shapes are needed to measure its "
        "all-reduces, and its config.json could not be read\n")


# ---- the flag ----------------------------------------------------------------------------------------


def _parse(command: str, *flags: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["bench", command, *flags])


@pytest.mark.parametrize("command", ["throughput", "latency"])
def test_the_flag_parses_and_defaults_to_one(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _parse(command).tensor_parallel_size == 1
    assert _parse(command, "--tensor-parallel-size", "4").tensor_parallel_size == 4
    for bad, message in (("0", "must be an integer >= 1, got 0"), ("-1", "must be an integer >= 1, got -1"),
                         ("two", "not an integer: 'two'")):
        with pytest.raises(SystemExit) as exit_:
            _parse(command, "--tensor-parallel-size", bad)
        assert exit_.value.code == 2
        assert f"error: argument --tensor-parallel-size: {message}" in capsys.readouterr().err


def test_missing_gpus_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpus_missing(1) is None and gpus_missing(2) is None
    assert gpus_missing(4) == "--tensor-parallel-size 4 needs 4 GPUs, and this machine has 2: give 1..2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpus_missing(4) is None  # CPU ranks over gloo


@pytest.mark.parametrize("command", ["throughput", "latency"])
def test_too_few_gpus_is_a_one_line_error_before_loading(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["bench", command, "--model", "demo", "--tensor-parallel-size", "2"]) == 2
    assert capsys.readouterr().err == (
        f"mini-vllm bench {command}: error: --tensor-parallel-size 2 needs 2 GPUs, and this machine has 1: "
        f"give 1..1\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("module,command", [(bench_throughput, "throughput"), (bench_latency, "latency")])
def test_the_size_reaches_the_engine(
    module: Any, command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    seen = []

    def load_engine(name: str, make_args: Any) -> int:
        seen.append((name, make_args().tensor_parallel_size))
        return 2  # as for a refused setting: the command stops here

    monkeypatch.setattr(module, "load_engine", load_engine)
    extra = ["--num-requests", "1"] if command == "throughput" else ["--input-len", "8", "--output-len", "4"]
    assert cli.main(["bench", command, "--model", "demo", *extra, "--tensor-parallel-size", "2"]) == 2
    assert cli.main(["bench", command, "--model", "demo", *extra]) == 2
    assert seen == [(f"bench {command}", 2), (f"bench {command}", 1)]


def test_the_server_path_passes_the_size_to_serve() -> None:
    args = _parse("throughput", "--tensor-parallel-size", "2")
    argv = bench_throughput.server_argv(args, "dummy", num_requests=8, connections=8)
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert "--tensor-parallel-size" not in bench_throughput.server_argv(_parse("throughput"), "dummy", 8, 8)


# ---- the tables ------------------------------------------------------------------------------------


def _collectives() -> dict[str, Any]:
    measured = CollectiveMeasurement(
        2, "nccl", "bfloat16", 10, 20,
        (CollectivePoint(1, 16_384, 9.5e-6), CollectivePoint(8192, 134_217_728, 4.2e-4)),
        (CollectivePoint(1, 256_512, 1.1e-5),),
    )
    return measured.to_json()


def test_collectives_line() -> None:
    assert collectives_line(_collectives()) == (
        "nccl over 2 ranks: 9.5 µs at 1 token, 420.0 µs at 8,192 tokens (x hidden, bfloat16)")


def test_the_throughput_table_says_per_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    record: dict[str, Any] = {
        "workload": "OFFLINE-256", "model": "llama3-70b", "gpu": "NVIDIA H200", "tensor_parallel_size": 2,
        "measured_bandwidth_bytes_per_s": 4.3e12, "measured_bf16_flops": 7.9e14, "collectives": _collectives(),
        "offline": {"output_tokens_per_s": 1000.0, "output_tokens": 140_797, "seconds": 140.8},
        "floor_output_tokens_per_s": 3000.0, "floor_seconds": 46.9, "floor_communication_seconds": 3.25,
        "floor_fraction": 1 / 3, "output_tokens_per_s": 1000.0,
    }
    bench_throughput.print_table(record)
    table = capsys.readouterr().out.splitlines()
    assert any(line.split("  ")[-1] == "NVIDIA H200 x 2 (tensor parallel)" for line in table)
    assert any(line.startswith("measured peaks, per GPU") and line.endswith("4.30 TB/s copy, 790 TFLOP/s bf16 matmul")
               for line in table)
    assert any(line.startswith("all-reduce (measured)") and "nccl over 2 ranks" in line for line in table)
    assert any(line.startswith("floor tok/s (2 GPUs)") and line.endswith("3,000 (46.90 s; 3.25 s of it in collectives)")
               for line in table)
    # One GPU: no "per GPU", no collectives.
    for key in ("collectives", "floor_communication_seconds"):
        del record[key]
    record["tensor_parallel_size"] = 1
    bench_throughput.print_table(record)
    table = capsys.readouterr().out
    assert "per GPU" not in table and "tensor parallel" not in table and "floor tok/s  " in table


def test_the_latency_table_says_per_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    record: dict[str, Any] = {
        "model": "llama3-70b", "batch_size": 1, "input_len": 1024, "output_len": 128, "gpu": "NVIDIA H200",
        "tensor_parallel_size": 4, "ttft_ms": 50.0, "tpot_ms": 12.0, "step_ms": None, "collectives": _collectives(),
        "measured_bandwidth_bytes_per_s": 4.3e12, "decode_floor_ms": 8.0, "tpot_over_floor": 1.5,
    }
    bench_latency.print_table(record)
    table = capsys.readouterr().out.splitlines()
    assert any(line.endswith("NVIDIA H200 x 4 (tensor parallel)") for line in table)
    assert any(line.startswith("floor (weights + KV / N + all-reduces)")
               and line.endswith("8.000 ms at 4.30 TB/s per GPU; TPOT is 1.50x") for line in table)
    assert any(line.startswith("all-reduce (measured)") for line in table)
