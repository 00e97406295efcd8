"""What every benchmark record says about where it ran: versions, the commit, the GPU or CPU."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


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
