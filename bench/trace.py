"""Profile steady-state decode steps and draw the GPU timeline (is the GPU ever idle between steps?)."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.workloads import WorkloadRequest

STEP_LABEL = "engine.step"  # the record_function range around each profiled step
# Not the GPU's compute: copies run on the copy engines beside the kernels, and ProfilerStep marks.
_NOT_KERNELS = ("Memcpy", "Memset", "ProfilerStep")


def device_kernels(prof: Any) -> list[tuple[float, float, str]]:
    """The kernels a profile saw on the GPU, (start µs, end µs, name), sorted: what both
    ``bench latency --profile-steps`` and ``bench throughput --trace`` count as the GPU's work.

    Not user annotations: torch puts each ``record_function`` range on the GPU's timeline too, and
    counted as work the ``engine.step`` ranges (which cover the host's whole step) made the GPU
    look 99.6 % busy in the 2026-11-28 traces while ``bench latency`` measured 5.4 ms of kernels in
    a 17.8 ms step. Not copies either (see ``_NOT_KERNELS``)."""
    return sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
        and not getattr(e, "is_user_annotation", False) and e.name != STEP_LABEL
        and not e.name.startswith(_NOT_KERNELS)
    )


def profile_steady_decode(
    engine: LLMEngine, workload: list[WorkloadRequest], steps: int, *, cpu: bool
) -> tuple[Any, list[float]]:
    """Add the workload, step until the batch decodes steadily, profile ``steps`` steps (the CUDA
    side; with ``cpu`` also the host, each step marked ``engine.step``), then abort everything.
    Returns the finished ``torch.profiler`` session and each profiled step's host time (s): the
    wall time of its ``engine.step()`` call."""
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
    host: list[float] = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP_LABEL) if cpu else nullcontext():
                started = time.perf_counter()
                engine.step()
                host.append(time.perf_counter() - started)
        torch.cuda.synchronize()
    for rid in list(engine.requests):
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return prof, host


def trace_decode_steps(engine: LLMEngine, workload: list[WorkloadRequest], out_dir: Path, steps: int = 12) -> dict[str, Any]:
    """Fill the batch with the workload, run to steady decode, profile ``steps`` steps, abort all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prof, host = profile_steady_decode(engine, workload, steps, cpu=True)
    prof.export_chrome_trace(str(out_dir / "decode_trace.json"))
    kernels = device_kernels(prof)
    steps_cpu = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events() if e.name == STEP_LABEL
        and e.device_type == torch.autograd.DeviceType.CPU
    )
    summary = summarize(kernels, steps, host)
    summary["png"] = draw(kernels, steps_cpu, out_dir / "decode_timeline.png", summary)
    (out_dir / "decode_trace_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(kernels: list[tuple[float, float, str]], steps: int, host_step_s: list[float]) -> dict[str, Any]:
    """GPU busy time (union of kernel intervals) over the span, the idle gaps (µs), and per step
    the host's time next to the GPU's busy time."""
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
        "gpu_busy_us_per_step": round(busy / steps, 1),
        "host_us_per_step": round(1e6 * sum(host_step_s) / len(host_step_s), 1) if host_step_s else None,
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
        f"of {summary['span_us'] / 1e3:.1f} ms, largest gap {summary['gap_us_max']:.0f} µs; "
        f"per step: GPU {summary['gpu_busy_us_per_step'] / 1e3:.2f} ms, host {_ms(summary['host_us_per_step'])}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _ms(us: float | None) -> str:
    return "—" if us is None else f"{us / 1e3:.2f} ms"


def trace_line(summary: dict[str, Any]) -> str:
    """One line for a benchmark's table: the GPU's busy share and, per step, GPU and host time."""
    if "error" in summary:
        return summary["error"]
    return (
        f"GPU busy {100 * summary['gpu_busy_fraction']:.1f}% over {summary['steps']} decode steps; per step "
        f"GPU {summary['gpu_busy_us_per_step'] / 1e3:.2f} ms, host {_ms(summary['host_us_per_step'])}"
    )
