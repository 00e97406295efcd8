"""What a second LLM's KV budget is while a first one lives (tests/test_gpu_lifecycle.py's premise):
both loads of the tiny test model at the default share, with the inputs of each budget printed.

    python3 docs/benchmarks/lifecycle_budget_probe.py

Run from the repository root on a GPU machine (on the H200: after
``source docs/benchmarks/device_env.sh``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, "tests")
from conftest import build_tiny_model
from test_gpu_lifecycle import ENGINE  # the engine arguments of the test whose premise this probes

import mini_vllm.engine.llm_engine as llm_engine
from mini_vllm.engine import LLM, ConfigError
from mini_vllm.engine.kv_cache import gpu_kv_budget_bytes

GiB = 1 << 30


def traced_budget(device: torch.device, utilization: float, reserve: int) -> int:
    free, total = torch.cuda.mem_get_info(device)
    print(f"budget call: free {free / GiB:.2f} total {total / GiB:.2f} used {(total - free) / GiB:.2f} "
          f"reserve {reserve / GiB:.2f} allocated {torch.cuda.memory_allocated() / GiB:.2f}", flush=True)
    budget = gpu_kv_budget_bytes(device, utilization, reserve)
    print(f"  budget {budget / GiB:.2f} GiB", flush=True)
    return budget


def main() -> None:
    llm_engine.gpu_kv_budget_bytes = traced_budget  # type: ignore[assignment]
    path = str(build_tiny_model(Path(tempfile.mkdtemp()), "LlamaForCausalLM", 0, False))
    print("device", torch.cuda.get_device_properties(0), flush=True)
    first = LLM(path, **ENGINE)
    print(f"first built: allocated {torch.cuda.memory_allocated() / GiB:.2f} GiB", flush=True)
    try:
        second = LLM(path, **ENGINE)
        print(f"the second fit: allocated {torch.cuda.memory_allocated() / GiB:.2f} GiB", flush=True)
        del second
    except ConfigError as exc:
        print("the second was refused:", exc)
    del first


if __name__ == "__main__":
    main()
