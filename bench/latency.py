"""``mini-vllm bench latency``: one batch through the engine, step by step, against the weights' floor.

The latency floor of a decode step is reading every weight once (plus the live KV) at the GPU's
bandwidth. This command measures how close the engine gets at a fixed batch: TTFT of the batch's
prompts, TPOT and the time of every decode step, over a few iterations. ``--profile-steps`` puts
decode steps under ``torch.profiler`` and splits the GPU time into matmuls, attention, the other
kernels and idle gaps; ``--matmul-probe`` times each weight shape's matmul alone (in a CUDA graph,
so launch cost does not count) with each of torch's BLAS back-ends. No server, no actors: the
serving path's own cost is what ``bench serve`` adds on top.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mini_vllm.bench.allreduce import collectives_line, measure_tensor_parallel
from mini_vllm.bench.command import HelpFormatter, fail, interruptible, unwritable, write_text
from mini_vllm.bench.env import (
    gpus_missing,
    load_engine,
    measure_gpu_peaks,
    model_shapes,
    step_kinds,
    step_kinds_since,
    versions,
)
from mini_vllm.engine.config import PRESETS, EngineArgs, ModelConfig
from mini_vllm.engine.kv_cache import bytes_per_block
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.workloads import ParallelCost, WorkloadRequest, kv_heads_per_rank, matmul_params
from mini_vllm.transport.flags import positive_int

# Kernel names of cuBLAS / cuBLASLt matmuls (nvjet is Hopper's cuBLASLt family).
MATMUL_KERNEL_MARKS = ("gemm", "gemv", "nvjet", "cutlass", "xmma")
ATTENTION_KERNEL_MARKS = ("_decode_", "_prefill_")


def add_bench_latency(sub: Any) -> None:
    p = sub.add_parser("latency", help="one batch step by step: TTFT, TPOT and the decode step against the weights' floor",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="a preset (dummy weights), a model directory or demo")
    p.add_argument("--load-format", choices=["auto", "dummy"], default=None,
                   help="dummy: random weights (default: dummy for a preset, auto for a directory)")
    p.add_argument("--batch-size", type=int, default=1, help="requests in the batch, all added at once")
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens per request (random ids)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (EOS ignored)")
    p.add_argument("--num-iters", type=int, default=5, help="measured iterations (the batch run to the end)")
    p.add_argument("--warmup-iters", type=int, default=1, help="unmeasured iterations first")
    p.add_argument("--max-model-len", type=int, default=2048, help="longest prompt + output in tokens")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="fix the KV cache size (default: sized by --gpu-memory-utilization on a GPU, "
                        "the engine's CPU budget on the CPU)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="tokens one step may carry (default: the larger of --max-model-len and --batch-size); "
                        "a larger budget prefills the batch in fewer steps that are mixed with decodes")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--skinny-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="steps of at most 16 tokens through the few-row kernel for o_proj, gate_up and down_proj "
                        "(engine/triton_skinny.py; --no-skinny-kernels: cuBLAS)")
    p.add_argument("--programmatic-dependent-launch", action=argparse.BooleanOptionalAction, default=None,
                   help="in steps of at most 64 tokens our GPU kernels may start while the one before them ends "
                        "(default: on for one GPU of compute capability 9.0+)")
    p.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="N",
                   help="split the model over N GPUs (CPU processes over gloo without CUDA); the floor is then "
                        "one GPU's share of the bytes at its bandwidth, plus the all-reduces measured over the N GPUs")
    p.add_argument("--no-async-scheduling", action="store_true", help="land every step before scheduling the next")
    p.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="profile N steady decode steps (GPU; default: 0, no profile)")
    p.add_argument("--matmul-probe", action="store_true", help="time each weight shape's matmul alone (GPU)")
    p.add_argument("--output", default=None, help="write the record as JSON here (default: no file, the table only)")
    p.set_defaults(func=run_latency)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_args(args: argparse.Namespace) -> str | None:
    for name in ("batch_size", "input_len", "num_iters"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if args.output_len < 2:
        return "--output-len must be at least 2 (TPOT needs a second token)"
    budget = args.max_num_batched_tokens
    if budget is not None and budget < max(args.max_model_len, args.batch_size):
        return (f"--max-num-batched-tokens must be at least the larger of --max-model-len and --batch-size "
                f"({max(args.max_model_len, args.batch_size)}), got {budget}")
    if args.warmup_iters < 0 or args.profile_steps < 0:
        return "--warmup-iters and --profile-steps cannot be negative"
    if args.input_len + args.output_len > args.max_model_len:
        return f"--input-len + --output-len ({args.input_len + args.output_len}) exceed --max-model-len ({args.max_model_len})"
    if (args.profile_steps or args.matmul_probe) and not torch.cuda.is_available():
        return "--profile-steps and --matmul-probe need a CUDA GPU"
    missing = gpus_missing(args.tensor_parallel_size)
    if missing:
        return missing
    return unwritable(Path(args.output), "--output") if args.output else None


def run_batch(engine: LLMEngine, prompts: list[list[int]], output_len: int, tag: str) -> dict[str, Any]:
    """Add the batch, step to the end; the times (s) at which the batch's tokens landed."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    step_ends: list[float] = []  # when a step's tokens landed (steps that carried decode tokens)
    calls: list[float] = []  # each engine.step() call's wall time
    engine.step_timings = []  # which steps were decode-only (the call's host split is not used)
    while engine.has_unfinished_requests():
        began = time.perf_counter()
        deltas = engine.step()
        now = time.perf_counter()
        calls.append(now - began)
        if any(s.token_ids for d in deltas for s in d.samples):
            step_ends.append(now)
        for d in deltas:
            if any(s.token_ids for s in d.samples):
                first.setdefault(d.request_id, now)
                last[d.request_id] = now
    ttft = [first[k] - start for k in first]
    e2e = [last[k] - start for k in last]
    tpot = [(last[k] - first[k]) / (output_len - 1) for k in first]
    kinds = [t.decode_only for t in engine.step_timings]
    engine.step_timings = None
    decode, mixed = split_calls(calls, kinds, pipelined=engine.async_scheduling)
    return {"ttft_s": statistics.median(ttft), "tpot_s": statistics.median(tpot), "e2e_s": max(e2e),
            "step_gaps_s": [b - a for a, b in itertools.pairwise(step_ends)],
            "decode_only_calls_s": decode, "mixed_calls_s": mixed}


def split_calls(calls: list[float], decode_only: list[bool], *, pipelined: bool) -> tuple[list[float], list[float]]:
    """Each ``engine.step()`` call's wall time, as the time of a decode-only step or of a step that
    also carried prefill tokens. A call is as long as the device step it waits for: with one step
    ahead (``pipelined``) call k launches step k and waits for step k - 1, else it runs step k.
    A batch's TPOT covers both kinds (docs/gpu-execution.md, "What TPOT is made of")."""
    decode: list[float] = []
    mixed: list[float] = []
    shift = 1 if pipelined else 0
    for k, seconds in enumerate(calls):
        j = k - shift
        if 0 <= j < len(decode_only):
            (decode if decode_only[j] else mixed).append(seconds)
    return decode, mixed


def random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def decode_floor_s(
    config: ModelConfig, batch: int, context: int, bandwidth: float, parallel: ParallelCost | None = None
) -> float:
    """One decode step reading every weight once and each sequence's KV (bf16), at ``bandwidth``.

    With ``parallel`` (N GPUs) ``bandwidth`` is one GPU's: each reads 1/N of the weights and the KV of
    its share of the heads, all at once, and the step adds its measured collectives (two all-reduces of
    [batch, hidden] per layer, the logits' vocabulary gather)."""
    kv = bytes_per_block(config, 1, torch.bfloat16) * context * batch
    # Every matrix a token multiplies through (the LM head too, tied or not); the embedding is a
    # gather of `batch` rows, not a full read.
    if parallel is None:
        return (2 * matmul_params(config) + kv) / bandwidth
    rank_kv = kv * kv_heads_per_rank(config, parallel.size) // config.num_key_value_heads
    return ((2 * matmul_params(config) / parallel.size + rank_kv) / bandwidth
            + parallel.step_seconds(config, batch, batch))


# ---- the GPU's view ------------------------------------------------------------------------------
def kernel_category(name: str) -> str:
    low = name.lower()
    if any(m in low for m in MATMUL_KERNEL_MARKS):
        return "matmul"
    if any(m in name for m in ATTENTION_KERNEL_MARKS):
        return "attention"
    return "other"


def split_kernel_time(kernels: list[tuple[float, float, str]], steps: int) -> dict[str, Any]:
    """Per step (µs): kernel time by category, kernels launched, and the idle time between them."""
    by_cat = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    by_name: dict[str, list[float]] = {}
    for start, end, name in kernels:
        by_cat[kernel_category(name)] += end - start
        by_name.setdefault(name, []).append(end - start)
    idle = 0.0
    reach = kernels[0][1] if kernels else 0.0
    for start, end, _ in kernels[1:]:
        idle += max(0.0, start - reach)
        reach = max(reach, end)
    span = max(end for _, end, _ in kernels) - kernels[0][0] if kernels else 0.0
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {
        "steps": steps,
        "span_us_per_step": round(span / steps, 1),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "us_per_step": {k: round(v / steps, 1) for k, v in by_cat.items()},
        "idle_us_per_step": round(idle / steps, 1),
        "top_kernels": [
            {"name": n[:90], "category": kernel_category(n), "us_per_step": round(sum(t) / steps, 1),
             "calls_per_step": round(len(t) / steps, 1), "us_per_call": round(statistics.median(t), 2)}
            for n, t in top
        ],
    }


def profile_decode(engine: LLMEngine, prompts: list[list[int]], output_len: int, steps: int) -> dict[str, Any]:
    from mini_vllm.bench.trace import device_kernels, profile_steady_decode, summarize

    workload = [WorkloadRequest(p, output_len) for p in prompts]
    prof, host = profile_steady_decode(engine, workload, steps, cpu=False)
    kernels = device_kernels(prof)
    # The same busy fraction and host-versus-GPU figures as ``bench throughput --trace`` (one function).
    shared = summarize(kernels, steps, host)
    keep = ("gpu_busy_fraction", "gpu_busy_us_per_step", "host_us_per_step")
    return {**split_kernel_time(kernels, steps), **{k: shared[k] for k in keep if k in shared}}


def matmul_shapes(config: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """(out, in, per-forward count) of every linear layer."""
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    n = config.num_hidden_layers
    return {
        "qkv_proj": (q + 2 * kv, h, n),
        "o_proj": (h, q, n),
        "gate_up_proj": (2 * config.intermediate_size, h, n),
        "down_proj": (h, config.intermediate_size, n),
        "lm_head": (config.vocab_size, h, 1),
    }


def matmul_probe(config: ModelConfig, batch: int, device: torch.device) -> dict[str, Any]:
    """Each weight shape's ``F.linear`` at M = batch, replayed 20 times in a CUDA graph, per BLAS back-end."""
    backends = ["cublas", "cublaslt"]
    previous = torch.backends.cuda.preferred_blas_library()
    out: dict[str, Any] = {}
    try:
        for backend in backends:
            torch.backends.cuda.preferred_blas_library(backend)
            rows: dict[str, Any] = {}
            total_us = 0.0
            for name, (n_out, n_in, count) in matmul_shapes(config).items():
                w = torch.randn(n_out, n_in, dtype=torch.bfloat16, device=device) * 0.02
                x = torch.randn(batch, n_in, dtype=torch.bfloat16, device=device)
                reps = 20
                for _ in range(3):
                    torch.nn.functional.linear(x, w)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(reps):
                        torch.nn.functional.linear(x, w)
                times = []
                for _ in range(10):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end) * 1e3 / reps)
                us = statistics.median(times)
                rows[name] = {"shape": [n_out, n_in], "count": count, "us": round(us, 2),
                              "tb_per_s": round(n_out * n_in * 2 / us / 1e6, 3)}
                total_us += us * count
                del w, x, graph
            out[backend] = {"per_shape": rows, "total_us_per_forward": round(total_us, 1)}
    finally:
        torch.backends.cuda.preferred_blas_library(previous)
        torch.cuda.empty_cache()
    return out


# ---- the command -----------------------------------------------------------------------------------
@interruptible("latency")
def run_latency(args: argparse.Namespace) -> int:
    error = check_args(args)
    if error:
        return fail("latency", error)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    load_format = args.load_format or ("dummy" if args.model in PRESETS else "auto")
    record: dict[str, Any] = {
        "model": args.model,
        "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
        "gpu": torch.cuda.get_device_name(device) if cuda else "none (CPU)",
        "tensor_parallel_size": args.tensor_parallel_size,
        "versions": versions(),
        "command": "mini-vllm " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    bandwidth = None
    parallel: ParallelCost | None = None
    if cuda:
        bandwidth = measure_gpu_peaks(device)[0]  # GPU 0's: with N GPUs, each one's
        torch.cuda.empty_cache()  # give the probe's tensors back before the model loads
        if args.tensor_parallel_size > 1:
            shapes = model_shapes(args.model)
            measured = measure_tensor_parallel("latency", shapes, args.tensor_parallel_size)
            if isinstance(measured, int):
                return measured
            record["collectives"], parallel = measured
    _log(f"loading {args.model} ({load_format}) ...")
    engine = load_engine("bench latency", lambda: EngineArgs(
        model=None if args.model == "demo" else args.model, load_format=load_format, max_model_len=args.max_model_len,
        max_num_seqs=args.batch_size,
        max_num_batched_tokens=args.max_num_batched_tokens or max(args.max_model_len, args.batch_size),
        gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
        block_size=args.block_size, enforce_eager=args.enforce_eager, enable_prefix_caching=False,
        async_scheduling=False if args.no_async_scheduling else None, tensor_parallel_size=args.tensor_parallel_size,
        skinny_kernels=args.skinny_kernels, programmatic_dependent_launch=args.programmatic_dependent_launch,
    ))
    if isinstance(engine, int):
        return engine
    config = engine.model_config
    record["async_scheduling"] = engine.async_scheduling
    record["max_num_batched_tokens"] = engine.args.max_num_batched_tokens
    record["cuda_graphs"] = cuda and not args.enforce_eager
    record["skinny_kernels"] = bool(getattr(engine.runner, "skinny", False))
    record["programmatic_dependent_launch"] = bool(getattr(engine.runner, "dependent_launch", False))
    record["dependent_launch_max_rows"] = int(getattr(engine.runner, "dependent_launch_max_rows", 0))
    rng = random.Random(3)  # fresh prompts every iteration: nothing to reuse even with a prefix cache
    kinds_before = step_kinds(engine)
    iters = []
    for i in range(args.warmup_iters + args.num_iters):
        result = run_batch(engine, random_prompts(rng, args.batch_size, args.input_len, config.vocab_size),
                           args.output_len, f"it{i}")
        label = "warm-up" if i < args.warmup_iters else f"iteration {i - args.warmup_iters + 1}"
        _log(f"[{label}] TTFT {1e3 * result['ttft_s']:.2f} ms, TPOT {1e3 * result['tpot_s']:.3f} ms")
        if i >= args.warmup_iters:
            iters.append(result)
    gaps = sorted(g for r in iters for g in r["step_gaps_s"])
    record["ttft_ms"] = round(1e3 * statistics.median(r["ttft_s"] for r in iters), 3)
    record["tpot_ms"] = round(1e3 * statistics.median(r["tpot_s"] for r in iters), 4)
    record["e2e_ms"] = round(1e3 * statistics.median(r["e2e_s"] for r in iters), 2)
    record["step_ms"] = {"p50": round(1e3 * gaps[len(gaps) // 2], 4), "p99": round(1e3 * gaps[int(0.99 * (len(gaps) - 1))], 4),
                         "max": round(1e3 * gaps[-1], 4)} if gaps else None
    kinds = step_kinds_since(engine, kinds_before)
    if kinds is not None:  # on a GPU: how the steps ran (decode graph, mixed graph, eager), warm-up included
        record["step_kinds"] = kinds
    for kind in ("decode_only", "mixed"):
        times = [c for r in iters for c in r[f"{kind}_calls_s"]]
        record[f"{kind}_step_ms"] = {"steps": len(times), "p50": round(1e3 * statistics.median(times), 4)} if times else None
    if bandwidth is not None:
        mean_context = args.input_len + args.output_len // 2
        floor = decode_floor_s(config, args.batch_size, mean_context, bandwidth, parallel)
        record["measured_bandwidth_bytes_per_s"] = bandwidth
        record["decode_floor_ms"] = round(1e3 * floor, 4)
        record["tpot_over_floor"] = round(record["tpot_ms"] / record["decode_floor_ms"], 4)
    if args.profile_steps:
        prompts = random_prompts(rng, args.batch_size, args.input_len, config.vocab_size)
        record["profile"] = profile_decode(engine, prompts, args.output_len, args.profile_steps)
    if args.matmul_probe:
        del engine
        torch.cuda.empty_cache()
        record["matmul_probe"] = matmul_probe(config, args.batch_size, device)
    print_table(record)
    if args.output:
        failed = write_text("latency", Path(args.output), json.dumps(record, indent=2) + "\n")
        if failed is not None:
            return failed
        _log(f"wrote {args.output}")
    return 0


def print_table(record: dict[str, Any]) -> None:
    ranks = record.get("tensor_parallel_size", 1)
    rows = [
        ("model", f"{record['model']}, batch {record['batch_size']}, {record['input_len']} in / {record['output_len']} out"),
        ("gpu", f"{record['gpu']} x {ranks} (tensor parallel)" if ranks > 1 else record["gpu"]),
        ("TTFT (batch's prompts)", f"{record['ttft_ms']:.2f} ms"),
        ("TPOT", f"{record['tpot_ms']:.3f} ms"),
    ]
    if record["step_ms"]:
        s = record["step_ms"]
        rows.append(("decode step", f"p50 {s['p50']:.3f} ms, p99 {s['p99']:.3f} ms, max {s['max']:.3f} ms"))
    if record.get("decode_only_step_ms") or record.get("mixed_step_ms"):
        d, m = record.get("decode_only_step_ms"), record.get("mixed_step_ms")
        shown = [f"decode-only p50 {d['p50']:.3f} ms ({d['steps']} steps)" if d else "no decode-only step",
                 f"with prefill p50 {m['p50']:.3f} ms ({m['steps']} steps)" if m else "none with prefill"]
        rows.append(("steps by kind", ", ".join(shown)))
    if "collectives" in record:
        rows.append(("all-reduce (measured)", collectives_line(record["collectives"])))
    if "decode_floor_ms" in record:
        label = ("floor (weights + KV / N + all-reduces)" if ranks > 1 else "floor (weights + KV / bandwidth)")
        per_gpu = " per GPU" if ranks > 1 else ""
        rows.append((label,
                     f"{record['decode_floor_ms']:.3f} ms at {record['measured_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s"
                     f"{per_gpu}; TPOT is {record['tpot_over_floor']:.2f}x"))
    if "profile" in record:
        p = record["profile"]
        u = p["us_per_step"]
        rows.append(("GPU per decode step (profiled)",
                     f"span {p['span_us_per_step']:.0f} µs: matmul {u['matmul']:.0f}, attention {u['attention']:.0f}, "
                     f"other {u['other']:.0f}, idle {p['idle_us_per_step']:.0f}; {p['kernels_per_step']:.0f} kernels"))
        if "gpu_busy_fraction" in p:
            rows.append(("host vs GPU per profiled step",
                         f"host {p['host_us_per_step'] / 1e3:.2f} ms, GPU busy {p['gpu_busy_us_per_step'] / 1e3:.2f} ms "
                         f"({100 * p['gpu_busy_fraction']:.1f}% of the span)"))
        for k in p["top_kernels"][:8]:
            rows.append((f"  {k['category']}", f"{k['us_per_step']:8.1f} µs/step  {k['calls_per_step']:5.0f} calls  "
                                               f"{k['us_per_call']:7.2f} µs/call  {k['name'][:60]}"))
    if "matmul_probe" in record:
        for backend, r in record["matmul_probe"].items():
            shapes = ", ".join(f"{n} {v['tb_per_s']:.2f}" for n, v in r["per_shape"].items())
            rows.append((f"matmuls alone ({backend})", f"{r['total_us_per_forward']:.0f} µs/forward; TB/s: {shapes}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
