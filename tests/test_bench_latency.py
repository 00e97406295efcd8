"""``mini-vllm bench latency``: flag checks, the profiler's kernel split on hand-made timelines, the
decode floor and matmul shapes against hand arithmetic, and short runs of the command on the CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mini_vllm import cli
from mini_vllm.bench.latency import check_args, decode_floor_s, kernel_category, matmul_shapes, split_kernel_time
from mini_vllm.engine.config import PRESETS, ModelConfig
from mini_vllm.engine.workloads import matmul_params, weight_bytes

pytestmark = pytest.mark.timeout(60)


def _args(**overrides: Any) -> argparse.Namespace:
    """The command's defaults (as the parser sets them), with ``overrides``."""
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "latency"])
    for k, v in overrides.items():
        assert hasattr(args, k), k
        setattr(args, k, v)
    return args


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave as on a machine without a GPU, whichever machine runs the tests."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---- check_args -------------------------------------------------------------------------------------


def test_defaults_and_small_runs_pass(no_cuda: None) -> None:
    assert check_args(_args()) is None
    assert check_args(_args(input_len=32, output_len=8, num_iters=1, warmup_iters=0)) is None
    # The whole length may fill --max-model-len exactly.
    assert check_args(_args(input_len=32, output_len=8, max_model_len=40)) is None
    assert check_args(_args(max_num_batched_tokens=8192)) is None  # a larger step budget


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"batch_size": -2}, "--batch-size must be at least 1"),
        ({"input_len": 0}, "--input-len must be at least 1"),
        ({"num_iters": 0}, "--num-iters must be at least 1"),
        ({"output_len": 1}, "--output-len must be at least 2 (TPOT needs a second token)"),
        ({"output_len": 0}, "--output-len must be at least 2"),
        ({"warmup_iters": -1}, "--warmup-iters and --profile-steps cannot be negative"),
        ({"profile_steps": -1}, "--warmup-iters and --profile-steps cannot be negative"),
        ({"input_len": 32, "output_len": 9, "max_model_len": 40},
         "--input-len + --output-len (41) exceed --max-model-len (40)"),
        ({"input_len": 2000, "output_len": 128}, "--input-len + --output-len (2128) exceed --max-model-len (2048)"),
        ({"profile_steps": 3}, "--profile-steps and --matmul-probe need a CUDA GPU"),
        ({"max_num_batched_tokens": 1024},
         "--max-num-batched-tokens must be at least the larger of --max-model-len and --batch-size (2048), got 1024"),
        ({"matmul_probe": True}, "--profile-steps and --matmul-probe need a CUDA GPU"),
    ],
)
def test_check_args_rejects_bad_input(no_cuda: None, overrides: dict[str, Any], message: str) -> None:
    error = check_args(_args(**overrides))
    assert error is not None and error.startswith(message), error


def test_bad_flags_exit_2_with_the_message_and_write_nothing(
    no_cuda: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.json"
    for flags, message in (
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--output-len", "1"], "--output-len must be at least 2"),
        (["--input-len", "2000", "--output-len", "100"], "exceed --max-model-len (2048)"),
        (["--profile-steps", "2"], "need a CUDA GPU"),
        (["--matmul-probe"], "need a CUDA GPU"),
    ):
        assert cli.main(["bench", "latency", "--model", "demo", *flags, "--output", str(out)]) == 2, flags
        captured = capsys.readouterr()
        assert captured.err.startswith("mini-vllm bench latency: error: --") and message in captured.err, flags
        assert captured.out == "" and "loading" not in captured.err  # rejected before any engine is built
    assert not out.exists()


def test_bad_engine_settings_and_models_are_errors_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["bench", "latency", "--input-len", "8", "--output-len", "4", "--num-iters", "1", "--warmup-iters", "0"]
    assert cli.main([*base, "--model", "demo", "--block-size", "3"]) == 2
    assert "mini-vllm bench latency: error: block_size must be a power of two" in capsys.readouterr().err
    assert cli.main([*base, "--model", str(tmp_path / "missing")]) == 1
    assert "mini-vllm bench latency: error:" in capsys.readouterr().err


# ---- the profiler's split -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,category",
    [
        ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_tn", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "matmul"),
        ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "matmul"),
        ("void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false>", "matmul"),
        ("Kernel_GEMV_Splitk", "matmul"),  # matmul marks ignore case
        ("_decode_split_kernel", "attention"),
        ("_decode_reduce_kernel", "attention"),
        ("_prefill_kernel", "attention"),
        ("_store_kv_kernel", "other"),
        ("_rms_norm_kernel", "other"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
        ("triton_poi_fused_mul_silu_0", "other"),
    ],
)
def test_kernel_category(name: str, category: str) -> None:
    assert kernel_category(name) == category


# Two decode steps, by hand (µs). Kernel 5 runs inside kernel 4 (another stream), and kernel 6 starts
# before kernel 4 ends: neither leaves an idle gap, though each starts after its predecessor's end.
KERNELS = [
    (0.0, 10.0, "sm90_xmma_gemm_bf16"),  # matmul 10
    (12.0, 15.0, "_decode_split_kernel"),  # attention 3, idle 2
    (15.0, 20.0, "_rms_norm_kernel"),  # other 5, back to back
    (25.0, 35.0, "nvjet_tst_64x8"),  # matmul 10, idle 5
    (30.0, 33.0, "elementwise_kernel"),  # other 3, inside the previous one
    (34.0, 40.0, "gemv2T_kernel"),  # matmul 6, overlaps the nvjet (ends at 35)
    (42.0, 50.0, "_prefill_kernel"),  # attention 8, idle 2
    (52.0, 56.0, "nvjet_tst_64x8"),  # matmul 4, idle 2; a second call of the same kernel
]


def test_split_kernel_time_by_category_idle_and_top_kernels() -> None:
    split = split_kernel_time(KERNELS, steps=2)
    assert split["steps"] == 2
    assert split["kernels_per_step"] == 4.0  # 8 kernels / 2 steps
    assert split["span_us_per_step"] == 28.0  # 0 to 56
    assert split["us_per_step"] == {"matmul": 15.0, "attention": 5.5, "other": 4.0}  # (30, 11, 8) / 2
    assert split["idle_us_per_step"] == 5.5  # (2 + 5 + 2 + 2) / 2: the overlaps add nothing
    top = split["top_kernels"]
    assert [k["name"] for k in top] == [
        "nvjet_tst_64x8", "sm90_xmma_gemm_bf16", "_prefill_kernel", "gemv2T_kernel", "_rms_norm_kernel",
        "_decode_split_kernel", "elementwise_kernel",  # a tie (3 µs each) keeps the timeline's order
    ]  # fmt: skip
    assert top[0] == {"name": "nvjet_tst_64x8", "category": "matmul", "us_per_step": 7.0, "calls_per_step": 1.0,
                      "us_per_call": 7.0}  # calls of 10 and 4 µs: median 7
    assert top[2] == {"name": "_prefill_kernel", "category": "attention", "us_per_step": 4.0, "calls_per_step": 0.5,
                      "us_per_call": 8.0}
    assert [k["category"] for k in top] == ["matmul", "matmul", "attention", "matmul", "other", "attention", "other"]
    # Every kernel's time is in one category and in the top list (fewer than 12 names).
    assert sum(k["us_per_step"] for k in top) == pytest.approx(sum(split["us_per_step"].values()))


def test_split_kernel_time_one_step_and_edge_cases() -> None:
    one = split_kernel_time(KERNELS, steps=1)
    assert one["us_per_step"] == {"matmul": 30.0, "attention": 11.0, "other": 8.0}
    assert (one["idle_us_per_step"], one["span_us_per_step"], one["kernels_per_step"]) == (11.0, 56.0, 8.0)
    # Back to back: no idle time; a single kernel: none either.
    assert split_kernel_time([(0.0, 1.0, "a"), (1.0, 3.0, "b"), (3.0, 4.0, "c")], 1)["idle_us_per_step"] == 0.0
    single = split_kernel_time([(5.0, 9.0, "gemm")], 1)
    assert (single["idle_us_per_step"], single["span_us_per_step"], single["kernels_per_step"]) == (0.0, 4.0, 1.0)
    # Nothing captured: zeros, no crash.
    empty = split_kernel_time([], 3)
    assert empty["us_per_step"] == {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    assert (empty["idle_us_per_step"], empty["span_us_per_step"], empty["kernels_per_step"]) == (0.0, 0.0, 0.0)
    assert empty["top_kernels"] == []


def test_split_kernel_time_keeps_the_top_12_and_cuts_long_names() -> None:
    long_name = "void cutlass::Kernel2<" + "x" * 200 + ">"
    kernels = [(float(10 * i), float(10 * i + i + 1), f"kernel_{i:02d}") for i in range(15)]
    kernels.append((200.0, 300.0, long_name))
    top = split_kernel_time(kernels, 1)["top_kernels"]
    assert len(top) == 12
    assert top[0]["name"] == long_name[:90] and top[0]["category"] == "matmul" and top[0]["us_per_step"] == 100.0
    assert [k["name"] for k in top[1:]] == [f"kernel_{i:02d}" for i in range(14, 3, -1)]  # the longest first


def test_span_reaches_the_latest_kernel_end() -> None:
    # A long kernel on one stream outlasts a short one started later on another.
    split = split_kernel_time([(0.0, 100.0, "long_gemm"), (10.0, 20.0, "short")], 1)
    assert split["span_us_per_step"] == 100.0  # the code says 20.0


# ---- the decode floor and the matmul shapes -----------------------------------------------------------

# Untied Llama, small enough to add up by hand: q width 4 * 4 = 16, kv width 2 * 4 = 8.
SMALL = ModelConfig.from_dict(
    {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 16, "intermediate_size": 40,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
    "test",
)


def test_decode_floor_against_hand_arithmetic() -> None:
    assert SMALL.head_dim == 4 and not SMALL.tie_word_embeddings
    # Per layer: qkv 16 x (16 + 8 + 8) = 512, o 16 x 16 = 256, gate/up/down 3 x 16 x 40 = 1920 -> 2688.
    # Two layers 5376, lm_head 100 x 16 = 1600; the embedding (another 1600) is a gather, not read whole.
    weights = (2 * 2688 + 1600) * 2  # bf16: 13952 bytes
    # KV: K and V x 2 layers x 2 heads x 4 dims x 2 bytes = 64 bytes a token; 3 sequences of 10 tokens.
    kv = 2 * 2 * 2 * 4 * 2 * 10 * 3  # 1920 bytes
    assert decode_floor_s(SMALL, batch=3, context=10, bandwidth=1000.0) == pytest.approx((weights + kv) / 1000.0)
    assert decode_floor_s(SMALL, 3, 10, 1000.0) == pytest.approx(15.872)
    # The embedding is left out: the floor is below the checkpoint's bytes by exactly the embedding.
    no_kv = decode_floor_s(SMALL, 3, 0, 1.0)
    assert no_kv == weights and weight_bytes(SMALL) - no_kv == 100 * 16 * 2
    # The KV is in: linear in context and in batch, 64 bytes per token.
    assert decode_floor_s(SMALL, 3, 20, 1.0) - decode_floor_s(SMALL, 3, 10, 1.0) == pytest.approx(64 * 10 * 3)
    assert decode_floor_s(SMALL, 1, 10, 1.0) - no_kv == pytest.approx(64 * 10)
    # Twice the bandwidth, half the time.
    assert decode_floor_s(SMALL, 3, 10, 2000.0) == pytest.approx(15.872 / 2)


def test_decode_floor_for_an_untied_preset_reads_every_matmul_weight() -> None:
    config = ModelConfig.from_dict(PRESETS["llama3-8b"], "llama3-8b")
    assert not config.tie_word_embeddings
    kv_per_token = 2 * 32 * 8 * 128 * 2  # 128 KiB
    assert kv_per_token == 131_072
    floor = decode_floor_s(config, 8, 1024, 1.0)
    assert floor == pytest.approx(matmul_params(config) * 2 + kv_per_token * 1024 * 8)


def test_decode_floor_for_a_tied_preset_still_reads_the_lm_head() -> None:
    # qwen3-0.6b ties lm_head to the embedding: the matrix is stored once (weight_bytes) but every
    # decode step's lm_head reads it whole, so the floor must count it.
    config = ModelConfig.from_dict(PRESETS["qwen3-0.6b"], "qwen3-0.6b")
    assert config.tie_word_embeddings
    assert decode_floor_s(config, 1, 0, 1.0) == matmul_params(config) * 2


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_matmul_shapes_match_the_preset(preset: str) -> None:
    config = ModelConfig.from_dict(PRESETS[preset], preset)
    raw = PRESETS[preset]
    h, n, inter = raw["hidden_size"], raw["num_hidden_layers"], raw["intermediate_size"]
    q, kv = raw["num_attention_heads"] * raw["head_dim"], raw["num_key_value_heads"] * raw["head_dim"]
    shapes = matmul_shapes(config)
    assert shapes == {
        "qkv_proj": (q + 2 * kv, h, n),
        "o_proj": (h, q, n),
        "gate_up_proj": (2 * inter, h, n),
        "down_proj": (h, inter, n),
        "lm_head": (raw["vocab_size"], h, 1),
    }
    # Every matmul parameter, once per forward.
    assert sum(o * i * c for o, i, c in shapes.values()) == matmul_params(config)


def test_matmul_shapes_qwen3_numbers() -> None:
    shapes = matmul_shapes(ModelConfig.from_dict(PRESETS["qwen3-0.6b"], "qwen3-0.6b"))
    # 16 query heads and 8 KV heads of 128: 2048 + 2 x 1024; the query width is not the hidden size.
    assert shapes["qkv_proj"] == (4096, 1024, 28)
    assert shapes["o_proj"] == (1024, 2048, 28)
    assert shapes["gate_up_proj"] == (6144, 1024, 28)
    assert shapes["down_proj"] == (1024, 3072, 28)
    assert shapes["lm_head"] == (151_936, 1024, 1)


# ---- the command, end to end on the CPU ------------------------------------------------------------

RUN_FLAGS = ["--model", "demo", "--input-len", "32", "--output-len", "8", "--num-iters", "1", "--warmup-iters", "0"]


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[dict[str, Any], str, str]:
    out = tmp_path / "x.json"
    argv = ["bench", "latency", *RUN_FLAGS, *extra, "--output", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    record = json.loads(out.read_text())
    assert record["command"] == "mini-vllm " + " ".join(argv)
    assert f"wrote {out}" in captured.err
    return record, captured.out, captured.err


def _check_record(record: dict[str, Any], batch: int) -> None:
    assert record["model"] == "demo" and record["gpu"] == "none (CPU)"
    assert (record["batch_size"], record["input_len"], record["output_len"]) == (batch, 32, 8)
    assert record["ttft_ms"] > 0 and record["tpot_ms"] > 0
    assert record["e2e_ms"] >= record["ttft_ms"]
    step = record["step_ms"]
    assert set(step) == {"p50", "p99", "max"} and 0 < step["p50"] <= step["p99"] <= step["max"]
    assert record["cuda_graphs"] is False and record["async_scheduling"] is False
    assert record["programmatic_dependent_launch"] is False and record["dependent_launch_max_rows"] == 0  # CPU
    assert record["max_num_batched_tokens"] == max(2048, batch)  # the default budget
    # One prompt of 32 tokens in one step, then 7 decode-only steps (the last lands nothing new).
    decode, mixed = record["decode_only_step_ms"], record["mixed_step_ms"]
    assert mixed["steps"] == 1 and decode["steps"] >= 6 and decode["p50"] > 0
    assert record["versions"]["torch"] and record["date"].endswith("UTC")
    # No GPU: no bandwidth, no floor, no profile, no probe.
    for key in ("measured_bandwidth_bytes_per_s", "decode_floor_ms", "tpot_over_floor", "profile", "matmul_probe"):
        assert key not in record


def test_command_end_to_end_on_the_cpu(
    no_cuda: None, demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record, table, err = _run(tmp_path, capsys)
    _check_record(record, batch=1)
    lines = table.splitlines()
    assert lines[0].split() == ["model", "demo,", "batch", "1,", "32", "in", "/", "8", "out"]
    tpot = [line for line in lines if line.startswith("TPOT ")]
    assert len(tpot) == 1 and tpot[0].endswith(f"{record['tpot_ms']:.3f} ms")
    assert any(line.startswith("TTFT (batch's prompts)") for line in lines)
    assert any(line.startswith("decode step") and "p50" in line for line in lines)
    assert "[iteration 1] TTFT" in err and "warm-up" not in err


def test_command_respects_the_batch_size(
    no_cuda: None, demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record, table, _ = _run(tmp_path, capsys, "--batch-size", "3")
    _check_record(record, batch=3)
    assert "batch 3, 32 in / 8 out" in table and "TPOT" in table


def test_step_calls_are_split_by_the_kind_of_step_they_wait_for() -> None:
    from mini_vllm.bench.latency import split_calls

    calls = [0.016, 0.017, 0.004, 0.003, 0.001]
    kinds = [False, False, True, True]  # steps launched: two with prefill, then two decode-only
    # One step ahead: call k waits for step k - 1 (the first call waits for none; the last lands step 3).
    assert split_calls(calls, kinds, pipelined=True) == ([0.003, 0.001], [0.017, 0.004])
    # Not pipelined: call k runs step k (a call past the last step is not counted).
    assert split_calls(calls, kinds, pipelined=False) == ([0.004, 0.003], [0.016, 0.017])


def test_a_larger_step_budget_reaches_the_engine(
    no_cuda: None, demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record, _, _ = _run(tmp_path, capsys, "--batch-size", "4", "--max-num-batched-tokens", "4096")
    assert record["max_num_batched_tokens"] == 4096
    # Four prompts of 32 tokens fit one step: one step with prefill, the rest decode-only.
    assert record["mixed_step_ms"]["steps"] == 1 and record["decode_only_step_ms"]["steps"] >= 6



def test_tensor_parallel_ranks_run_on_the_cpu_and_one_is_recorded(
    no_cuda: None, demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without CUDA the ranks are CPU processes over gloo: any size passes the flag checks.
    assert check_args(_args(tensor_parallel_size=4)) is None
    record, table, _ = _run(tmp_path, capsys)
    assert record["tensor_parallel_size"] == 1 and "tensor parallel" not in table and "collectives" not in record
