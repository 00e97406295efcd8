"""GPU time of greedy's argmax ways (one pass, two passes, the chunked Triton kernel) at the
vocabularies of qwen3-0.6b and llama3-8b: ``python3 docs/benchmarks/argmax_ways_probe.py OUT.json``.
As the runner times them at start (``CudaModelRunner.measure_greedy_argmax``): bf16 random logits,
the GPU's time alone, launches queued behind a wait. Each way's indices are checked against
``torch.argmax``."""

from __future__ import annotations

import json
import sys
import time
from functools import partial

import torch

from mini_vllm.engine.cuda_runner import gpu_time_us
from mini_vllm.engine.sampler import argmax_rows, one_pass_argmax
from mini_vllm.engine.triton_argmax import argmax_chunks_triton

WAYS = {"one pass": one_pass_argmax, "two passes": argmax_rows, "chunks": argmax_chunks_triton}


def main() -> None:
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "us": {}}
    for vocab in (151936, 128256):
        logits = torch.randn(256, vocab, device="cuda").bfloat16()
        for rows in (1, 8, 32, 64, 128, 256):
            x = logits[:rows]
            want = x.argmax(dim=-1)
            row = {}
            for name, way in WAYS.items():
                if not torch.equal(way(x), want):
                    raise SystemExit(f"{name} differs from torch.argmax at {rows} x {vocab}")
                row[name] = round(gpu_time_us(partial(way, x), 10, wait_cycles=2_000_000), 2)
            report["us"][f"{rows} x {vocab}"] = row  # type: ignore[index]
            print(f"{rows:4d} x {vocab}: " + "  ".join(f"{k} {v:6.2f} µs" for k, v in row.items()), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
