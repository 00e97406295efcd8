"""One stream's decode step taken apart, without a profiler (dummy weights, on the GPU):
``python3 docs/benchmarks/one_stream_breakdown.py MODEL OUT.json``.

It times the engine's decode step for one 1024-token request (wall and GPU wait, medians), the
batch-1 decode graph replayed alone at a 1,100-token context, the copies before a replay, both
greedy argmaxes over one row, and each projection of one layer and the LM head at one row through
F.linear and torch.mv. Device times are the GPU's alone: the launches are queued behind a wait.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from mini_vllm.bench.env import measure_gpu_peaks
from mini_vllm.engine import EngineArgs
from mini_vllm.engine.cuda_runner import gpu_time_us
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.sampler import argmax_rows
from mini_vllm.engine.sampling_params import SamplingParams


def decode_step_ms(engine: LLMEngine, output_len: int) -> tuple[float, float]:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine.add_request("one", list(range(1, 1025)), params)
    engine.step_timings = []
    walls = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    timings = engine.step_timings or []  # the turns that only land the last tokens have none
    decode = [(w, t.wait_s) for w, t in zip(walls[: len(timings)], timings, strict=True) if t.decode_only][10:]
    return 1e3 * statistics.median(w for w, _ in decode), 1e3 * statistics.median(s for _, s in decode)


def graph_replays(engine: LLMEngine, sizes: tuple[int, ...], context: int, *, distinct_blocks: bool,
                  reps: int) -> dict[str, float]:
    """Each decode graph of ``sizes`` replayed alone, every row a ``context``-token context, µs of the
    GPU alone. ``distinct_blocks``: each row its own blocks, as distinct sequences have (the same
    blocks for every row are read from the L2 cache at large batches)."""
    runner = engine.runner
    blocks = context // runner.block_size + 1
    out = {}
    with torch.inference_mode():
        for bs in sizes:
            graph, _ = runner.graphs[bs]
            runner._g_lens[:bs] = context
            n = bs * blocks if distinct_blocks else blocks
            runner._g_tables[:bs, :blocks] = torch.arange(n, device=runner._g_tables.device).view(-1, blocks)
            runner._g_slots[:bs] = -1  # reads, writes nothing
            out[str(bs)] = gpu_time_us(graph.replay, reps, runner.compute_stream)
        runner._g_slots.fill_(-1)
        runner._g_lens.zero_()
    return out


def ab_runs(field: str, engine_args: Callable[[bool], EngineArgs], measure: Callable[[LLMEngine, bool], dict[str, Any]],
            ) -> list[dict[str, Any]]:
    """An engine with ``field`` off, on, off, on (interleaved: the spread is part of the figure), each
    timed on one stream's offline step and then by ``measure``; each engine is closed before the next."""
    runs = []
    for on in (False, True, False, True):
        engine = LLMEngine.from_engine_args(engine_args(on))
        run: dict[str, Any] = {field: on}
        decode_step_ms(engine, 16)  # warm-up
        run["engine_step_ms"], run["engine_wait_ms"] = decode_step_ms(engine, 256)
        run.update(measure(engine, on))
        print(f"{field}={on}: one-stream step {run['engine_step_ms']:.3f} ms; graph replay (µs) "
              + "  ".join(f"bs{b} {t:.0f}" for b, t in run["graph_us"].items()), flush=True)
        runs.append(run)
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return runs


def main() -> None:
    model_name, out = sys.argv[1], sys.argv[2]
    device = torch.device("cuda")
    copy_bw, _ = measure_gpu_peaks(device)
    torch.cuda.empty_cache()
    engine = LLMEngine.from_engine_args(EngineArgs(model=model_name, load_format="dummy", max_model_len=2048))
    runner = engine.runner
    stream = runner.compute_stream
    report: dict[str, Any] = {"model": model_name, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "copy_TBps": copy_bw / 1e12, "greedy_argmax": str(runner.greedy_argmax)}
    decode_step_ms(engine, 16)  # warm-up
    report["engine_step_ms"], report["engine_wait_ms"] = decode_step_ms(engine, 256)
    with torch.inference_mode():
        graph, _ = runner.graphs[1]
        blocks = 1100 // runner.block_size + 1
        runner._g_lens[:1] = 1100
        runner._g_tables[0, :blocks] = torch.arange(blocks)
        runner._g_slots[:1] = -1  # reads 1,100 keys, writes nothing
        report["graph_bs1_us"] = gpu_time_us(graph.replay, 50, stream)
        zero = torch.zeros(1, dtype=torch.int64, device=device)

        def copies_before_replay() -> None:
            for target in (runner._g_ids, runner._g_pos, runner._g_slots, runner._g_lens):
                target[:1].copy_(zero)
            torch.index_select(runner._tables, 0, zero, out=runner._g_tables[:1])

        report["pre_replay_us"] = gpu_time_us(copies_before_replay, 50, stream)
        runner._g_slots.fill_(-1)
        runner._g_lens.zero_()
        logits = torch.randn(1, engine.model_config.vocab_size, device=device, dtype=torch.bfloat16)
        report["argmax_one_pass_us"] = gpu_time_us(partial(torch.argmax, logits, dim=-1), 50, stream)
        report["argmax_two_pass_us"] = gpu_time_us(partial(argmax_rows, logits), 50, stream)
        model = runner.model
        layer = model.layers[0]
        weights = {"qkv": layer.self_attn.qkv_proj.weight, "o": layer.self_attn.o_proj.weight,
                   "gate_up": layer.mlp.gate_up_proj.weight, "down": layer.mlp.down_proj.weight,
                   "lm_head": model.lm_head.weight}
        report["matmul_m1"] = {}
        for name, w in weights.items():
            x = torch.randn(1, w.shape[1], device=device, dtype=w.dtype)
            linear, mv = gpu_time_us(partial(F.linear, x, w), 50, stream), gpu_time_us(partial(torch.mv, w, x[0]), 50, stream)
            nbytes = w.numel() * w.element_size()
            report["matmul_m1"][name] = {"shape": list(w.shape), "linear_us": linear, "mv_us": mv,
                                         "linear_TBps": nbytes / linear / 1e6, "mv_TBps": nbytes / mv / 1e6}
            print(f"{name:8s} {list(w.shape)}: F.linear {linear:.1f} us ({nbytes / linear / 1e6:.2f} TB/s), "
                  f"torch.mv {mv:.1f} us")
    per_layer = sum(report["matmul_m1"][k]["linear_us"] for k in ("qkv", "o", "gate_up", "down"))
    report["matmuls_per_step_us"] = per_layer * model.config.num_hidden_layers + report["matmul_m1"]["lm_head"]["linear_us"]
    for key in ("engine_step_ms", "engine_wait_ms", "graph_bs1_us", "pre_replay_us", "argmax_one_pass_us",
                "argmax_two_pass_us", "matmuls_per_step_us"):
        print(f"{key:22s} {report[key]:.4g}")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
