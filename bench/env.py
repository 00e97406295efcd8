"""What the benchmarks share: where a run happened (versions, the commit, the GPU or CPU), the
GPU's measured peaks, and loading the engine under test with errors reported as messages."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and the engine only when a benchmark needs them (bench memory does not)
    import torch

    from mini_vllm.engine.config import EngineArgs, ModelConfig
    from mini_vllm.engine.llm_engine import LLMEngine


def git_revision() -> str:
    """The checkout's short commit, or "unknown" (no git, or not a checkout)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except OSError:
        return "unknown"
    return commit.stdout.strip() or "unknown"


def cpu_name() -> str:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        return cpu


def versions() -> dict[str, str]:
    import torch  # here, so that the CPU-only benchmarks can use the helpers above without it

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "triton", "trio"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    # The GPU machine gets a copy of the tree without git: the caller may pass the commit along.
    out["mini-vllm"] = os.environ.get("MINI_VLLM_COMMIT", "") or git_revision()
    return out


def device_description() -> dict[str, Any]:
    """The accelerator if there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
    return {"gpu": None, "cpu": cpu_name(), "cpus": os.cpu_count()}


def measure_gpu_peaks(device: torch.device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), medians of 10."""
    import torch

    x = torch.randn(1 << 30, dtype=torch.bfloat16, device=device)  # 2 GiB
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)

    def timed(fn: Callable[[], object]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    bandwidth = 2 * x.numel() * x.element_size() / timed(lambda: y.copy_(x))
    flops = 2 * 8192**3 / timed(lambda: a @ b)
    return bandwidth, flops


def measure_cpu_peaks() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, fp32 matmul FLOP/s): a quick probe, about
    half a second, for an estimate (the CPU runs in float32)."""
    import time

    import torch

    def rate(fn: Callable[[], object], work: float) -> float:
        fn()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 0.2:
            fn()
            n += 1
        return work * n / (time.perf_counter() - start)

    x = torch.empty(1 << 25)  # 128 MiB: past the caches
    y = torch.empty_like(x)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return rate(lambda: y.copy_(x), 2 * x.numel() * x.element_size()), rate(lambda: a @ b, 2 * 1024**3)


def gpus_missing(tensor_parallel_size: int) -> str | None:
    """Why ``--tensor-parallel-size`` cannot be met here, or None. Without CUDA the ranks are CPU
    processes over gloo, any number of them."""
    import torch

    if tensor_parallel_size > 1 and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count < tensor_parallel_size:
            return (f"--tensor-parallel-size {tensor_parallel_size} needs {tensor_parallel_size} GPUs, and this "
                    f"machine has {count}: give 1..{count}")
    return None


def model_config(model: str) -> ModelConfig | None:
    """A preset's or a local directory's config, without loading anything; None if neither."""
    from mini_vllm.engine.config import PRESETS, ModelConfig
    from mini_vllm.engine.errors import MiniVllmError

    try:
        if model in PRESETS:
            return ModelConfig.from_dict(PRESETS[model], model)
        path = Path(model).expanduser() / "config.json"
        return ModelConfig.from_file(path) if path.is_file() else None
    except MiniVllmError:
        return None


def model_shapes(model: str) -> ModelConfig | None:
    """``model_config``, plus the demo model (built on first use, as loading it would)."""
    if model != "demo":
        return model_config(model)
    from mini_vllm.engine.config import ModelConfig
    from mini_vllm.engine.demo_model import ensure_demo_model
    from mini_vllm.engine.loader import default_cache_dir

    return ModelConfig.from_file(ensure_demo_model(default_cache_dir()) / "config.json")


def load_engine(command: str, make_args: Callable[[], EngineArgs]) -> LLMEngine | int:
    """The engine, or the exit status after printing why not: 2 for a bad setting, 1 for a model
    that could not be loaded (never a traceback)."""
    from mini_vllm.engine.errors import ConfigError, MiniVllmError
    from mini_vllm.engine.llm_engine import LLMEngine

    try:
        return LLMEngine.from_engine_args(make_args())
    except ConfigError as exc:
        print(f"mini-vllm {command}: error: {exc}", file=sys.stderr)
        return 2
    except MiniVllmError as exc:
        print(f"mini-vllm {command}: error: {exc}", file=sys.stderr)
        return 1


def step_kinds(engine: LLMEngine) -> dict[str, int] | None:
    """How many steps the engine's runner has run by kind (decode graph, mixed graph, eager), as a
    copy; None for a runner that does not count them (the CPU's)."""
    kinds = getattr(engine.runner, "step_kinds", None)
    return dict(kinds) if kinds is not None else None


def step_kinds_since(engine: LLMEngine, before: dict[str, int] | None) -> dict[str, int] | None:
    """The steps by kind since ``before`` (a ``step_kinds`` taken earlier): the check that the
    steps that matter were graphed. None where the runner does not count them."""
    now = step_kinds(engine)
    if now is None or before is None:
        return None
    return {k: now[k] - before.get(k, 0) for k in now}
