"""``mini-vllm bench host``: the null runner, the step table's arithmetic on hand-made timings, flag
checks, and short runs of the command through the real engine host path (no model, no device)."""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any

import pytest

from mini_vllm import cli
from mini_vllm.bench import host
from mini_vllm.bench.host import (
    DECODE_FULL,
    DECODE_PARTIAL,
    TOKEN_POOL,
    WITH_PREFILL,
    NullRunner,
    TimedStep,
    build_engine,
    check_args,
    step_kind,
    summarize,
)
from mini_vllm.engine.model_runner import StepInputs
from mini_vllm.engine.sampler import SamplingRow
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.step_loop import StepTiming

pytestmark = pytest.mark.timeout(60)

TINY = ["--batch-size", "4", "--input-len", "20", "--output-len", "6", "--block-size", "4",
        "--max-num-batched-tokens", "16", "--num-iters", "1", "--warmup-iters", "0"]
PART_FIELDS = ("schedule_prepare_us", "launch_us", "wait_us", "process_us", "total_us", "host_us", "per_seq_us")


def _args(*flags: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["bench", "host", *flags])


def _inputs(rows: int) -> StepInputs:
    row = SamplingRow(SamplingParams(temperature=0), None, [], (), None)
    return StepInputs([1] * rows, list(range(rows)), list(range(rows)), [1] * rows, [1] * rows, [[0]] * rows,
                      list(range(rows)), [row] * rows, (), [], [], list(range(rows)))


# ---- the null runner ----------------------------------------------------------------------------------


def test_null_runner_gives_one_made_up_token_per_row_and_never_an_eos_id() -> None:
    runner = NullRunner(vocab_size=8, avoid={0, 1, 2})
    outputs = [runner.collect(runner.launch(_inputs(n))) for n in (3, 1, 0, 5)]
    assert [len(o.token_ids) for o in outputs] == [3, 1, 0, 5]
    tokens = [t for o in outputs for t in o.token_ids]
    assert all(3 <= t < 8 for t in tokens) and len(set(tokens)) > 1  # made up, not one constant
    assert all(o.logprobs is None and o.top is None for o in outputs)
    assert (runner.launches, runner.rows) == (4, 9)
    again = NullRunner(vocab_size=8, avoid={0, 1, 2})
    assert [t for n in (3, 1, 0, 5) for t in again.collect(again.launch(_inputs(n))).token_ids] == tokens


def test_null_runner_serves_more_rows_than_its_pool_and_refuses_a_tiny_vocabulary() -> None:
    runner = NullRunner(vocab_size=50)
    first = runner.collect(runner.launch(_inputs(3))).token_ids
    big = runner.collect(runner.launch(_inputs(TOKEN_POOL + 7))).token_ids
    assert len(big) == TOKEN_POOL + 7 and all(0 <= t < 50 for t in big)
    assert big[TOKEN_POOL - 3 : TOKEN_POOL] == first  # the pool wraps around
    runner.close()
    assert runner.closed
    with pytest.raises(ValueError, match="at least 2 ids besides the avoided ones, got 1"):
        NullRunner(vocab_size=1)
    with pytest.raises(ValueError, match="at least 2 ids besides the avoided ones, got 0"):
        NullRunner(vocab_size=3, avoid={0, 1, 2})


def test_the_engine_is_built_without_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(*_: Any, **__: Any) -> None:
        raise AssertionError("bench host built a model")

    monkeypatch.setattr("mini_vllm.engine.llm_engine.build_model", no_weights)
    monkeypatch.setattr("mini_vllm.engine.llm_engine.allocate_kv_cache", no_weights)
    engine, runner = build_engine(_args(*TINY))
    assert runner is not None and engine.runner is runner and engine.async_scheduling  # one step ahead, as on a GPU
    assert engine.tokenizer is None and engine.block_manager.num_blocks == 4 * 7  # 26 tokens: 7 blocks of 4
    engine.add_request("r", list(range(20)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        tokens += [t for d in engine.step() for s in d.samples for t in s.token_ids]
    assert len(tokens) == 6 and runner.rows >= 6


# ---- the table's arithmetic ---------------------------------------------------------------------------


def _step(seqs: int, decode_only: bool, schedule: float, process: float, wall: float) -> TimedStep:
    return TimedStep(StepTiming(seqs, seqs if decode_only else 3 * seqs, decode_only, schedule, 1e-6, 2e-6, process),
                     wall)


def test_steps_are_split_by_kind_with_p50_and_mean_per_part_and_per_sequence() -> None:
    steps = [
        _step(4, True, 10e-6, 20e-6, 40e-6),
        _step(4, True, 30e-6, 20e-6, 60e-6),
        _step(4, True, 20e-6, 50e-6, 100e-6),
        _step(2, True, 5e-6, 5e-6, 12e-6),
        _step(3, False, 90e-6, 30e-6, 150e-6),
    ]
    assert [step_kind(s.timing, 4) for s in steps] == [DECODE_FULL] * 3 + [DECODE_PARTIAL, WITH_PREFILL]
    table = summarize(steps, batch_size=4)
    assert list(table) == [DECODE_FULL, DECODE_PARTIAL, WITH_PREFILL]
    full = table[DECODE_FULL]
    assert full["steps"] == 3 and full["mean_seqs"] == 4
    assert full["schedule_prepare_us"] == {"p50": 20.0, "mean": 20.0}
    assert full["process_us"] == {"p50": 20.0, "mean": 30.0}
    assert full["launch_us"] == {"p50": 1.0, "mean": 1.0} and full["wait_us"] == {"p50": 2.0, "mean": 2.0}
    assert full["total_us"] == {"p50": 60.0, "mean": pytest.approx(66.67)}
    assert full["host_us"] == {"p50": 58.0, "mean": pytest.approx(64.67)}  # the call less its wait
    assert full["per_seq_us"] == {"p50": 14.5, "mean": pytest.approx(16.17)}  # host time per sequence
    assert table[DECODE_PARTIAL]["per_seq_us"]["p50"] == 5.0
    assert table[WITH_PREFILL]["total_us"]["p50"] == 150.0 and table[WITH_PREFILL]["mean_seqs"] == 3
    assert summarize([s for s in steps if s.timing.decode_only], 4).keys() == {DECODE_FULL, DECODE_PARTIAL}


# ---- flags ------------------------------------------------------------------------------------------


def test_defaults_pass_and_every_option_states_its_default() -> None:
    assert check_args(_args()) is None
    assert check_args(_args(*TINY)) is None
    parser = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bench = next(a for a in parser.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    command = bench.choices["host"]
    formatter = command._get_formatter()
    for action in command._actions:
        if action.option_strings and action.default is not argparse.SUPPRESS:
            text = formatter._expand_help(action)  # type: ignore[attr-defined]
            assert "default" in text and "default: None" not in text, (action.option_strings, text)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--input-len", "-3"], "--input-len must be at least 1, got -3"),
        (["--output-len", "0"], "--output-len must be at least 1, got 0"),
        (["--num-iters", "0"], "--num-iters must be at least 1, got 0"),
        (["--warmup-iters", "-1"], "--warmup-iters and --profile cannot be negative, got -1 and 0"),
        (["--profile", "-2"], "--warmup-iters and --profile cannot be negative, got 1 and -2"),
        (["--block-size", "12"], "--block-size must be a power of two in [1, 256], got 12"),
        (["--block-size", "512"], "--block-size must be a power of two in [1, 256], got 512"),
        (["--block-size", "0"], "--block-size must be a power of two in [1, 256], got 0"),
        (["--max-num-batched-tokens", "100"],
         "--max-num-batched-tokens must be at least --batch-size (256): a decode step carries one token per "
         "sequence, got 100"),
        (["--input-len", "40000", "--output-len", "1000"],
         "--input-len + --output-len (41000) exceed qwen3-0.6b's max_position_embeddings (40960)"),
        (["--model", "llama3-8b", "--input-len", "8000", "--output-len", "200"],
         "--input-len + --output-len (8200) exceed llama3-8b's max_position_embeddings (8192)"),
        # 560 + 128 tokens in blocks of 16: 43 blocks.
        (["--num-kv-blocks", "42"], "--num-kv-blocks must hold one whole sequence (43 blocks of 16 tokens), got 42"),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "host.json"
    assert cli.main(["bench", "host", *flags, "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"mini-vllm bench host: error: {message}"
    assert captured.out == "" and not out.exists()


def test_unknown_models_and_unwritable_outputs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "host", "--model", "demo"])
    assert exit_.value.code == 2 and "invalid choice: 'demo'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli.main(["bench", "host", *TINY, "--output", str(tmp_path / "file" / "x.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


# ---- runs ---------------------------------------------------------------------------------------------


def test_a_tiny_run_prints_the_table_and_writes_the_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "deep" / "host.json"
    assert cli.main(["bench", "host", *TINY, "--profile", "5", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for key in ("model", "batch_size", "input_len", "output_len", "block_size", "max_num_batched_tokens",
                "enable_prefix_caching", "num_kv_blocks", "runner", "machine", "versions", "command", "date", "gc"):
        assert key in record, key
    assert record["command"].startswith("mini-vllm bench host --batch-size 4")
    assert record["machine"]["cpus"] >= 1 and "torch" in record["versions"]
    assert (record["batch_size"], record["block_size"], record["enable_prefix_caching"]) == (4, 4, True)
    assert record["generation_tokens"] == 4 * 6 and record["preemptions"] == 0
    # 80 prompt tokens at 16 a step: the first steps carry prefill chunks, the last ones only decodes.
    steps = record["steps"]
    assert WITH_PREFILL in steps and DECODE_PARTIAL in steps
    for kind in steps.values():
        assert kind["steps"] >= 1
        for part in PART_FIELDS:
            assert kind[part]["p50"] >= 0 and kind[part]["mean"] >= 0
        assert kind["total_us"]["p50"] >= kind["schedule_prepare_us"]["p50"]
    profile = record["profile"]
    assert profile["steps"] >= 6 and len(profile["top_by_own_time"]) == 5
    assert all(f["calls"] >= 1 and f["own_us_per_step"] >= 0 for f in profile["top_by_own_time"])
    assert "step kind" in printed and WITH_PREFILL in printed and "top functions by own time" in printed
    assert "garbage collector during the measured steps" in printed


def test_a_small_kv_pool_preempts_and_still_generates_everything(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    flags = ["--num-kv-blocks", "12", "--no-enable-prefix-caching", "--freeze-gc"]
    assert cli.main(["bench", "host", *TINY, *flags, "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["preemptions"] > 0 and record["generation_tokens"] == 4 * 6
    assert record["num_kv_blocks"] == 12 and record["enable_prefix_caching"] is False and record["freeze_gc"] is True
    assert record["gc_threshold"][0] == 20_000  # as the engine core process sets it
    assert gc.get_freeze_count() == 0 and gc.get_threshold()[0] != 20_000  # the process goes on with its collector as it was


def test_no_output_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert host.run_host(_args(*TINY)) == 0
    assert list(tmp_path.iterdir()) == [] and "decode, partial batch" in capsys.readouterr().out


@pytest.mark.timeout(180)
def test_the_device_runner_runs_the_engine_s_own_runner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--runner device``: dummy weights of the preset through the engine's own runner (here the
    CPU's, which launches and computes a step at once: nothing to wait for, async scheduling off)."""
    out = tmp_path / "host.json"
    assert cli.main(["bench", "host", *TINY, "--runner", "device", "--profile", "3", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["runner"].startswith("the engine's own (ModelRunner on cpu") and "null_runner_rows" not in record
    assert record["generation_tokens"] == 4 * 6 and record["async_scheduling"] is False
    full = record["steps"][DECODE_PARTIAL]
    assert full["host_us"]["p50"] <= full["total_us"]["p50"] and full["launch_us"]["p50"] > 0
    assert any("model_runner" in f["function"] or "torch" in f["function"] or "~" in f["function"]
               for f in record["profile"]["top_by_own_time"])
    assert "runner: the engine's own" in capsys.readouterr().out
