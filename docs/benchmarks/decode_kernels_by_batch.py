"""GPU kernel time of one decode step at several batch sizes, and of one 8,190-token prefill step.

Run from the repository root on a GPU machine (on the H200: after
``source docs/benchmarks/device_env.sh``):

    python3 docs/benchmarks/decode_kernels_by_batch.py MODEL OUT.json [BATCHES]

One engine is loaded; for each batch size the batch of 800-token prompts is run to steady decode
and 8 steps are profiled by ``bench latency``'s own ``profile_decode`` (the split into matmul,
attention, other and idle of ``mini-vllm bench latency --profile-steps``), then 14 prompts of 585
tokens are prefilled in one step under the profiler. ``BATCHES`` (a comma list, e.g. ``256``)
profiles those batch sizes only and skips the prefill step (a short lease).
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from mini_vllm.bench.latency import profile_decode, random_prompts, split_kernel_time
from mini_vllm.bench.trace import device_kernels
from mini_vllm.engine import EngineArgs
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.sampling_params import SamplingParams


def show(label: str, p: dict[str, Any], top: int) -> None:
    print(f"{label}: span {p['span_us_per_step']} us, {p['kernels_per_step']} kernels, {p['us_per_step']}, "
          f"idle {p['idle_us_per_step']}")
    for k in p["top_kernels"][:top]:
        print(f"    {k['us_per_step']:9.1f} us  {k['calls_per_step']:5.1f} calls  {k['us_per_call']:8.2f} us/call  "
              f"{k['name'][:70]}")


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]
    decode_only = len(sys.argv) > 3
    batches = tuple(int(b) for b in sys.argv[3].split(",")) if decode_only else (1, 8, 32, 128, 256)
    engine = LLMEngine.from_engine_args(EngineArgs(model=model, load_format="dummy", max_model_len=2048))
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    report: dict[str, Any] = {}
    for batch in batches:
        report[f"decode_b{batch}"] = profile_decode(engine, random_prompts(rng, batch, 800, vocab), 64, 8)
        show(f"decode, batch {batch}", report[f"decode_b{batch}"], 9)
    if decode_only:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        return
    for i, prompt in enumerate(random_prompts(rng, 14, 585, vocab)):
        engine.add_request(f"prefill-{i}", prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
    report["prefill_8190"] = split_kernel_time(device_kernels(prof), 1)
    show("prefill, 8,190 tokens", report["prefill_8190"], 12)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
