"""``mini-vllm bench throughput``: OFFLINE-256 through the actor pipeline, against the peer and the floor.

It measures, in one run: the GPU's copy bandwidth and bf16 matmul rate (for the physical
floor of docs/design.md), mini-vllm through the same actors a trio program embeds (and the offline ``LLMEngine``
loop), the CPU time per decode step, and optionally transformers' own continuous batching on the
same workload. It prints a table and writes one JSON file per run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mini_vllm.bench.command import HelpFormatter, fail, interruptible, unwritable, write_text
from mini_vllm.bench.env import load_engine, measure_cpu_peaks, measure_gpu_peaks, model_config, versions
from mini_vllm.engine.config import PRESETS, EngineArgs, ModelConfig
from mini_vllm.engine.llm_engine import LLMEngine, StepTiming
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.workloads import WorkloadRequest, offline_256, physical_floor


def add_bench_throughput(sub: Any) -> None:
    t = sub.add_parser("throughput", help="OFFLINE-256: output tokens/s against the peer and the physical floor",
                       formatter_class=HelpFormatter)
    t.add_argument("--model", default="qwen3-0.6b", help="a preset (dummy weights) or a model directory")
    t.add_argument("--load-format", choices=["auto", "dummy"], default=None,
                   help="dummy: random weights (default: dummy for a preset, auto for a directory)")
    t.add_argument("--path", choices=["actors", "offline", "both"], default="both",
                   help="what to time: the actors a trio program embeds, the offline LLMEngine loop, or both")
    t.add_argument("--peer", choices=["none", "transformers"], default="none",
                   help="also time transformers' own continuous batching on the same requests (GPU only)")
    t.add_argument("--peer-timeout", type=float, default=420.0, help="seconds before the peer run is cut short")
    t.add_argument("--num-requests", type=int, default=None,
                   help="the first N requests of OFFLINE-256 (default: all 256; on a machine without CUDA it "
                        "must be given, since the full run takes hours there)")
    t.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch")
    t.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens computed in one step")
    t.add_argument("--max-model-len", type=int, default=2048, help="longest prompt + output in tokens")
    t.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV")
    t.add_argument("--num-kv-blocks", type=int, default=None,
                   help="fix the KV cache size (default: sized by --gpu-memory-utilization on a GPU, "
                        "the engine's CPU budget on the CPU)")
    t.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    t.add_argument("--trace", metavar="DIR", default=None,
                   help="profile steady-state decode steps and write the trace and a timeline PNG into DIR "
                        "(GPU; default: no trace)")
    t.add_argument("--output-dir", default=".", help="where the run's JSON goes (default: the current directory)")
    t.add_argument("--tag", default="", help="a suffix for the JSON file name (default: none)")
    t.set_defaults(func=run_throughput)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the runs ------------------------------------------------------------------------------------
def _params(r: WorkloadRequest) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)


class _Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= 5 or done >= self.total:
            self.last = now
            _log(f"[{self.label}] {done:,}/{self.total:,} output tokens, {now - self.start:.1f} s")


def run_offline(engine: LLMEngine, workload: list[WorkloadRequest]) -> dict[str, Any]:
    """The engine's own pipelined loop: add everything, step until done."""
    total = sum(r.output_len for r in workload)
    progress = _Progress("offline", total)
    engine.step_timings = []
    start = time.perf_counter()
    for i, r in enumerate(workload):
        engine.add_request(f"bench-{i}", r.prompt_token_ids, _params(r))
    done = 0
    last_token = start
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for s in delta.samples:
                done += len(s.token_ids)
            last_token = time.perf_counter()
        progress.update(done)
    timings, engine.step_timings = engine.step_timings, None
    wall = last_token - start
    return {"output_tokens": done, "seconds": wall, "output_tokens_per_s": done / wall, **cpu_step_times(timings)}


def cpu_step_times(timings: list[StepTiming]) -> dict[str, Any]:
    """Host time per decode-only step with the batch full (the steady state), median in ms."""
    if not timings:
        return {}
    full = max(t.num_seqs for t in timings)
    steady = [t for t in timings if t.decode_only and t.num_seqs == full]
    if not steady:
        return {}

    def med(get: Callable[[StepTiming], float]) -> float:
        return round(1e3 * statistics.median(get(t) for t in steady), 3)

    return {
        "cpu_step_ms": {
            "running_seqs": full,
            "steps_measured": len(steady),
            "schedule_and_prepare": med(lambda t: t.schedule_s),
            "launch": med(lambda t: t.launch_s),
            "process_outputs": med(lambda t: t.process_s),
            "total_host": med(lambda t: t.schedule_s + t.launch_s + t.process_s),
            "wait_for_gpu": med(lambda t: t.wait_s),
        }
    }


def run_actors(engine: LLMEngine, workload: list[WorkloadRequest]) -> dict[str, Any]:
    """The same engine behind the actors (ingress, scheduler, executor thread), as an embedder sees it."""
    import trio

    from mini_vllm.actors import ServiceConfig, open_service

    total = sum(r.output_len for r in workload)
    progress = _Progress("actors", total)
    result: dict[str, Any] = {}

    async def main() -> None:
        config = ServiceConfig(max_pending_per_model=max(len(workload), 1))
        async with open_service([engine], config) as service:
            counts = {"done": 0, "last": 0.0}

            async def one(i: int, r: WorkloadRequest) -> None:
                async with service.generate(r.prompt_token_ids, params=_params(r), request_id=f"a{i}") as gen:
                    async for delta in gen:
                        for s in delta.samples:
                            counts["done"] += len(s.token_ids)
                        counts["last"] = time.perf_counter()
                        progress.update(counts["done"])

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i, r in enumerate(workload):
                    nursery.start_soon(one, i, r)
            wall = counts["last"] - start
            stats = service.statistics()
            result.update(
                output_tokens=counts["done"],
                seconds=wall,
                output_tokens_per_s=counts["done"] / wall,
                loop_lag_ms=(
                    {"p50": stats.loop_lag.p50_ms, "p99": stats.loop_lag.p99_ms, "max": stats.loop_lag.max_ms}
                    if stats.loop_lag is not None else None
                ),
            )

    trio.run(main)
    return result


def run_peer(model: str, workload: list[WorkloadRequest], timeout: float) -> dict[str, Any]:
    """transformers' own continuous batching, same workload, random bf16 weights of the same shapes."""
    import transformers

    raw = dict(PRESETS[model]) if model in PRESETS else json.loads((Path(model) / "config.json").read_text())
    arch = raw["architectures"][0]
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{k: v for k, v in raw.items() if k != "architectures"})
    config.eos_token_id = None
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for smoke tests
    with torch.device(device):
        peer = getattr(transformers, arch)._from_config(config, dtype=torch.bfloat16)
    peer.eval()
    gen_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=max(r.output_len for r in workload),
                                               eos_token_id=None, pad_token_id=0)
    total = sum(r.output_len for r in workload)
    progress = _Progress("peer", total)
    done_tokens = 0
    finished = 0
    with peer.continuous_batching_context_manager(generation_config=gen_config) as manager:
        start = time.perf_counter()
        for i, r in enumerate(workload):
            manager.add_request(r.prompt_token_ids, request_id=f"p{i}", max_new_tokens=r.output_len)
        last = start
        while finished < len(workload) and time.perf_counter() - start < timeout:
            result = manager.get_result(timeout=1.0)
            if result is None:
                continue
            if result.is_finished():
                finished += 1
                done_tokens += len(result.generated_tokens)
                last = time.perf_counter()
                progress.update(done_tokens)
        wall = (last if finished == len(workload) else time.perf_counter()) - start
    out: dict[str, Any] = {
        "output_tokens": done_tokens,
        "finished_requests": finished,
        "seconds": wall,
        "output_tokens_per_s": done_tokens / wall if wall > 0 else 0.0,
        "complete": finished == len(workload),
    }
    del peer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


# ---- the command -----------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, before anything loads (a bad path must not end a long run)."""
    if args.num_requests is not None and not 1 <= args.num_requests <= 256:
        return f"--num-requests must be in 1..256 (OFFLINE-256 has 256 requests), got {args.num_requests}"
    # Lengths do not depend on the vocabulary: any size gives the same prompts' lengths.
    longest = max(len(r.prompt_token_ids) for r in offline_256(1, args.num_requests or 256))
    longest = max(longest, WARM_UP_PROMPT_LEN)
    if args.max_model_len <= longest:
        return (f"--max-model-len {args.max_model_len} cannot hold these prompts (up to {longest} tokens): "
                f"give at least {longest + 1}")
    if not args.peer_timeout > 0:
        return f"--peer-timeout must be > 0 seconds, got {args.peer_timeout}"
    if args.trace and not torch.cuda.is_available():
        return "--trace profiles GPU kernels and needs a CUDA GPU: drop it on this machine"
    if "/" in args.tag or "\\" in args.tag:
        return f"--tag is part of a file name and cannot hold a path separator, got {args.tag!r}"
    return unwritable(Path(args.output_dir), "--output-dir", folder=True) or (
        unwritable(Path(args.trace), "--trace", folder=True) if args.trace else None)


def cpu_refusal(model: str) -> str:
    """Why the full run is refused without CUDA, with roughly how long it would take on this CPU."""
    config = model_config(model)
    if config is None:  # not a preset or a readable directory: the load will say why, once N is given
        estimate = "hours"
    else:
        bandwidth, flops = measure_cpu_peaks()
        floor = physical_floor(config, offline_256(config.vocab_size), bandwidth, flops, bytes_per_param=4)
        estimate = (f"at least {_duration(floor.seconds)} (its floor at this CPU's measured {flops / 1e9:.0f} "
                    f"GFLOP/s and {bandwidth / 1e9:.0f} GB/s; several times that in practice)")
    return (f"no CUDA GPU, and the full OFFLINE-256 run of {model} would take {estimate}: pass --num-requests N "
            f"to run only its first N requests on the CPU (e.g. --num-requests 2)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@interruptible("throughput")
def run_throughput(args: argparse.Namespace) -> int:
    error = check_args(args)
    if error:
        return fail("throughput", error)
    cuda = torch.cuda.is_available()
    if not cuda and args.num_requests is None:
        return fail("throughput", cpu_refusal(args.model))
    num_requests = 256 if args.num_requests is None else args.num_requests
    preset = args.model in PRESETS
    load_format = args.load_format or ("dummy" if preset else "auto")
    device = torch.device("cuda" if cuda else "cpu")
    record: dict[str, Any] = {
        "workload": "OFFLINE-256" if num_requests == 256 else f"OFFLINE-256[:{num_requests}]",
        "model": args.model,
        "gpu": torch.cuda.get_device_name(device) if cuda else "none (CPU)",
        "versions": versions(),
        "command": "mini-vllm " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if cuda:
        _log("measuring copy bandwidth and bf16 matmul rate ...")
        bandwidth, flops = measure_gpu_peaks(device)
        torch.cuda.empty_cache()  # the 6 GiB of probe tensors are gone: give them back
        record["measured_bandwidth_bytes_per_s"] = bandwidth
        record["measured_bf16_flops"] = flops

    _log(f"loading {args.model} ({load_format}) ...")
    t0 = time.perf_counter()
    engine = load_engine("bench throughput", lambda: EngineArgs(
        model=args.model, load_format=load_format, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
        enforce_eager=args.enforce_eager, enable_prefix_caching=False,
    ))
    if isinstance(engine, int):
        return engine
    record["engine"] = engine_summary(engine, time.perf_counter() - t0)
    _log(f"loaded in {record['engine']['load_seconds']:.1f} s: {record['engine']['kv_blocks']} KV blocks")

    config: ModelConfig = engine.model_config
    workload = offline_256(config.vocab_size)[:num_requests]
    warm_up(engine)
    if cuda:
        floor = physical_floor(config, workload, bandwidth, flops)
        record["floor_seconds"] = floor.seconds
        record["floor_output_tokens_per_s"] = floor.output_tokens_per_s
    if args.path in ("offline", "both"):
        record["offline"] = run_offline(engine, workload)
    if args.path in ("actors", "both"):
        record["actors"] = run_actors(engine, workload)
    main_path = record.get("actors") or record["offline"]
    record["output_tokens_per_s"] = main_path["output_tokens_per_s"]
    if cuda and "floor_output_tokens_per_s" in record:
        record["floor_fraction"] = record["output_tokens_per_s"] / record["floor_output_tokens_per_s"]
    if args.trace:
        from mini_vllm.bench.trace import trace_decode_steps

        record["trace"] = trace_decode_steps(engine, workload, Path(args.trace))
    if args.peer == "transformers":
        if not cuda:
            record["peer_error"] = "the peer runs on a GPU only"
        else:
            del engine
            torch.cuda.empty_cache()
            try:
                record["peer"] = run_peer(args.model, workload, args.peer_timeout)
                record["peer_output_tokens_per_s"] = record["peer"]["output_tokens_per_s"]
                record["ratio_to_peer"] = record["output_tokens_per_s"] / record["peer_output_tokens_per_s"]
            except Exception as exc:  # report the peer's failure in the record, keep our numbers
                record["peer_error"] = f"{type(exc).__name__}: {exc}"
    print_table(record)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M")
    name = f"throughput-{args.model.replace('/', '_')}-{stamp}{('-' + args.tag) if args.tag else ''}.json"
    path = Path(args.output_dir) / name
    failed = write_text("throughput", path, json.dumps(record, indent=2) + "\n")
    if failed is not None:
        return failed
    _log(f"wrote {path}")
    return 0


def engine_summary(engine: LLMEngine, load_seconds: float) -> dict[str, Any]:
    runner = engine.runner
    graphs = getattr(runner, "graph_stats", None)
    blocks = engine.block_manager.num_blocks
    return {
        "load_seconds": round(load_seconds, 2),
        "kv_blocks": blocks,
        "kv_tokens": blocks * engine.args.block_size,
        "kv_bytes": runner.kv_cache.numel() * runner.kv_cache.element_size(),
        "max_num_seqs": engine.args.max_num_seqs,
        "max_num_batched_tokens": engine.args.max_num_batched_tokens,
        "cuda_graphs": (
            {"batch_sizes": list(graphs.batch_sizes), "capture_seconds": round(graphs.capture_seconds, 2),
             "pool_bytes": graphs.pool_bytes}
            if graphs is not None and graphs.batch_sizes else None
        ),
    }


WARM_UP_PROMPT_LEN = 200 + 37 * 3  # warm_up's longest prompt


def warm_up(engine: LLMEngine) -> None:
    """Compile every kernel shape once (Triton JIT) so no run pays for it."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"warmup-{i}", [1 + i] * (200 + 37 * i), params)
    while engine.has_unfinished_requests():
        engine.step()


def print_table(record: dict[str, Any]) -> None:
    rows = [("workload", record["workload"]), ("model", record["model"]), ("gpu", record["gpu"])]
    for path in ("actors", "offline"):
        if path in record:
            r = record[path]
            rows.append((f"{path}: output tok/s", f"{r['output_tokens_per_s']:,.0f} ({r['output_tokens']:,} in {r['seconds']:.2f} s)"))
    if "cpu_step_ms" in record.get("offline", {}):
        c = record["offline"]["cpu_step_ms"]
        rows.append((f"CPU ms per decode step @{c['running_seqs']} seqs",
                     f"{c['total_host']} (schedule {c['schedule_and_prepare']}, launch {c['launch']}, "
                     f"process {c['process_outputs']}; GPU wait {c['wait_for_gpu']})"))
    if "floor_output_tokens_per_s" in record:
        rows.append(("floor tok/s", f"{record['floor_output_tokens_per_s']:,.0f} ({record['floor_seconds']:.2f} s)"))
        rows.append(("fraction of floor", f"{record.get('floor_fraction', 0):.3f}"))
    if "peer_output_tokens_per_s" in record:
        rows.append(("peer (transformers CB) tok/s", f"{record['peer_output_tokens_per_s']:,.0f}"))
        rows.append(("ratio to peer", f"{record['ratio_to_peer']:.1f}x"))
    if "peer_error" in record:
        rows.append(("peer", record["peer_error"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
