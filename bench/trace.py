"""Profile steady-state decode steps and draw the GPU timeline (is the GPU ever idle between steps?)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.workloads import WorkloadRequest


def profile_steady_decode(engine: LLMEngine, workload: list[WorkloadRequest], steps: int, *, cpu: bool) -> Any:
    """Add the workload, step until the batch decodes steadily, profile ``steps`` steps (the CUDA
    side; with ``cpu`` also the host, each step marked ``engine.step``), then abort everything.
    Returns the finished ``torch.profiler`` session."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for i, r in enumerate(workload):
        engine.add_request(f"profile-{i}", r.prompt_token_ids, SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True))
    engine.step_timings = []
    # Steady state: decode-only steps with the batch as full as it gets.
    while engine.has_unfinished_requests():
        engine.step()
        t = engine.step_timings
        if len(t) >= 3 and all(x.decode_only for x in t[-3:]):
            break
    engine.step_timings = None
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cpu else [ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("engine.step") if cpu else nullcontext():
                engine.step()
        torch.cuda.synchronize()
    for rid in list(engine.requests):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return prof


def trace_decode_steps(engine: LLMEngine, workload: list[WorkloadRequest], out_dir: Path, steps: int = 12) -> dict[str, Any]:
    """Fill the batch with the workload, run to steady decode, profile ``steps`` steps, abort all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prof = profile_steady_decode(engine, workload, steps, cpu=True)
    prof.export_chrome_trace(str(out_dir / "decode_trace.json"))
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    steps_cpu = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events() if e.name == "engine.step"
        and e.device_type == torch.autograd.DeviceType.CPU
    )
    summary = summarize(kernels, steps)
    summary["png"] = draw(kernels, steps_cpu, out_dir / "decode_timeline.png", summary)
    (out_dir / "decode_trace_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(kernels: list[tuple[float, float, str]], steps: int) -> dict[str, Any]:
    """GPU busy time (union of kernel intervals) over the span, and the idle gaps (µs)."""
    if not kernels:
        return {"error": "no GPU kernels recorded"}
    busy = 0.0
    gaps = []
    cur_start, cur_end = kernels[0][0], kernels[0][1]
    for start, end, _ in kernels[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append(start - cur_end)
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = kernels[-1][1] - kernels[0][0]
    gaps.sort()
    by_name: dict[str, float] = {}
    for start, end, name in kernels:
        by_name[name] = by_name.get(name, 0.0) + (end - start)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    return {
        "top_kernels_us_per_step": [(name[:80], round(t / steps, 1)) for name, t in top],
        "steps": steps,
        "span_us": round(span, 1),
        "gpu_busy_fraction": round(busy / span, 4),
        "kernels": len(kernels),
        "gaps": len(gaps),
        "gap_us_p50": round(gaps[len(gaps) // 2], 2) if gaps else 0.0,
        "gap_us_max": round(gaps[-1], 2) if gaps else 0.0,
        "gap_us_total": round(sum(gaps), 1),
    }


def draw(kernels: list[tuple[float, float, str]], steps_cpu: list[tuple[float, float]], path: Path,
         summary: dict[str, Any]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t0 = min([kernels[0][0], *[s for s, _ in steps_cpu]])
    fig, ax = plt.subplots(figsize=(14, 2.8))
    ax.broken_barh([((s - t0) / 1e3, (e - s) / 1e3) for s, e in steps_cpu], (10, 8), facecolors="tab:orange")
    ax.broken_barh([((s - t0) / 1e3, max((e - s) / 1e3, 0.002)) for s, e, _ in kernels], (0, 8), facecolors="tab:blue")
    ax.set_yticks([4, 14], labels=["GPU kernels", "CPU: engine.step"])
    ax.set_xlabel("ms")
    ax.set_title(
        f"{summary['steps']} steady-state decode steps: GPU busy {100 * summary['gpu_busy_fraction']:.1f}% "
        f"of {summary['span_us'] / 1e3:.1f} ms, largest gap {summary['gap_us_max']:.0f} µs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
