"""Where OFFLINE-256's prefill-carrying steps spend their GPU time.

Run from the repository root on a GPU machine (on the H200: after
``source docs/benchmarks/device_env.sh``):

    python3 docs/benchmarks/prefill_steps_probe.py MODEL OUT.json

One engine is loaded as ``mini-vllm bench throughput`` loads it (dummy weights, 8,192-token
budget, no prefix caching) and warmed up the same way. The 256 requests of OFFLINE-256 are added at
once, and every step from the first to the first decode-only one is profiled (the CUDA side):
those are the steps that ``bench throughput``'s ``against_floor`` rows call prefill-carrying. The
report gives their kernel time by category and the top kernels (``bench latency``'s own split),
each step's sequences and tokens, and its host time; then everything is aborted. Before that,
the same steps run twice without the profiler, to tell the profiler's cost from the host's own:
as the offline loop runs them, and after ``gc.freeze()`` (what the engine core process does,
``actors.core.settle_gc``), so that a collection no longer walks everything alive; the profiled
pass comes last, with the collector still frozen.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from mini_vllm.bench.latency import split_kernel_time
from mini_vllm.bench.throughput import warm_up
from mini_vllm.bench.trace import device_kernels
from mini_vllm.engine import EngineArgs
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.workloads import offline_256


def _prefill_phase(engine: LLMEngine, tag: str) -> tuple[list[Any], float]:
    """Add OFFLINE-256, step until the first decode-only step; its step timings and wall time."""
    for i, r in enumerate(offline_256(engine.model_config.vocab_size)):
        engine.add_request(f"{tag}-{i}", r.prompt_token_ids,
                           SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True))
    engine.step_timings = []
    torch.cuda.synchronize()
    started = time.perf_counter()
    while True:
        engine.step()
        t = engine.step_timings
        if t and t[-1].decode_only:
            break
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    timings = engine.step_timings
    engine.step_timings = None
    for rid in list(engine.requests):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return timings, wall


def _steps(timings: list[Any]) -> list[dict[str, Any]]:
    return [{"seqs": x.num_seqs, "tokens": x.num_tokens, "decode_only": x.decode_only,
             "host_ms": round((x.schedule_s + x.launch_s + x.process_s) * 1e3, 3), "wait_ms": round(x.wait_s * 1e3, 3),
             "schedule_ms": round(x.schedule_s * 1e3, 3), "launch_ms": round(x.launch_s * 1e3, 3),
             "process_ms": round(x.process_s * 1e3, 3)}
            for x in timings]


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model, load_format="dummy", max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192,
        enable_prefix_caching=False,
    ))
    warm_up(engine)
    report: dict[str, Any] = {"model": model}
    for label in ("unprofiled", "unprofiled_gc_frozen"):
        if label == "unprofiled_gc_frozen":
            gc.collect()
            gc.freeze()
        timings, wall = _prefill_phase(engine, label)
        report[label] = {"wall_seconds": round(wall, 4), "steps": _steps(timings)}
        hosts = [s["host_ms"] for s in report[label]["steps"]]
        print(f"{label}: {len(timings)} steps in {wall * 1e3:.1f} ms; host ms per step {hosts}", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timings, wall = _prefill_phase(engine, "profiled")
    report.update({
        "steps_profiled": len(timings),
        "prefill_carrying_steps": sum(not x.decode_only for x in timings),
        "wall_seconds_all_profiled": round(wall, 4),
        "kernels": split_kernel_time(device_kernels(prof), len(timings)),
        "steps": _steps(timings),
    })
    k = report["kernels"]
    print(f"{model}: {len(timings)} steps ({report['prefill_carrying_steps']} prefill-carrying) in {wall * 1e3:.1f} ms; "
          f"per step: span {k['span_us_per_step']} us, {k['us_per_step']}, idle {k['idle_us_per_step']}")
    for row in k["top_kernels"]:
        print(f"    {row['us_per_step']:9.1f} us  {row['calls_per_step']:6.1f} calls  {row['us_per_call']:8.2f} us/call  "
              f"{row['name'][:70]}")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
