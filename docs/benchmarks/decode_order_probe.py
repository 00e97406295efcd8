"""Does starting the longest contexts first shorten a decode step's attention? On the GPU:
``python3 docs/benchmarks/decode_order_probe.py MODEL OUT.json``.

The runner passes ``decode_attention_triton`` an ``order`` (its rows sorted by context, longest
first), and the kernel numbers its programs so that every kv head of the longest row starts
first. For batch sizes 64-256, three length mixes (all 830; uniform 100-2,048; OFFLINE-256's
mid-run shape, prompt 100-1,024 plus up to 1,024 generated) and the runner's own split count, the
kernel is captured in a CUDA graph of all the model's layers, each with its own cache, with and
without the order; the time per layer and the K/V bandwidth are printed.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable

import torch

from mini_vllm.engine.cuda_runner import _TritonAttention
from mini_vllm.engine.triton_attention import decode_attention_triton

SHAPES = {"llama3-8b": (32, 32, 8, 128), "qwen3-0.6b": (28, 16, 8, 128)}  # layers, heads, kv heads, head dim
BLOCK = 16
BATCHES = (32, 64, 96, 128, 192, 256)


def lengths(mix: str, batch: int, rng: random.Random) -> list[int]:
    if mix == "equal-830":
        return [830] * batch
    if mix == "uniform-100-2048":
        return [rng.randint(100, 2048) for _ in range(batch)]
    return [rng.randint(100, 1024) + rng.randint(0, 1024) for _ in range(batch)]


def layer_calls(
    q: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]], lens: torch.Tensor, tab: torch.Tensor,
    splits: int, order: torch.Tensor | None,
) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        out = torch.empty_like(q)
        for kc, vc in caches:
            decode_attention_triton(q, kc, vc, lens, tab, q.shape[-1] ** -0.5, splits, out, num_warps=4, order=order)
        return out

    return run


def main() -> None:
    model, out_path = sys.argv[1], sys.argv[2]
    layers, heads, kv_heads, head_dim = SHAPES[model]
    dev, dt = torch.device("cuda"), torch.bfloat16
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    policy = _TritonAttention(4096, kv_heads, num_sms, pdl_max_rows=0)
    report: dict[str, object] = {
        "model": model, "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(["python3", *sys.argv]),
        "rows": [],
    }
    rng = random.Random(0)
    for batch in BATCHES:
        for mix in ("equal-830", "uniform-100-2048", "offline-256-like"):
            lens_list = lengths(mix, batch, rng)
            blocks = [-(-n // BLOCK) for n in lens_list]
            caches = [
                (torch.randn(sum(blocks), BLOCK, kv_heads, head_dim, device=dev, dtype=dt),
                 torch.randn(sum(blocks), BLOCK, kv_heads, head_dim, device=dev, dtype=dt))
                for _ in range(layers)
            ]
            perm = torch.randperm(sum(blocks), device=dev, dtype=torch.int32)
            tab = torch.zeros(batch, max(blocks), device=dev, dtype=torch.int32)
            at = 0
            for i, n in enumerate(blocks):
                tab[i, :n] = perm[at : at + n]
                at += n
            lens = torch.tensor(lens_list, device=dev, dtype=torch.int32)
            order = torch.argsort(lens, descending=True, stable=True).to(torch.int32)
            q = torch.randn(batch, heads, head_dim, device=dev, dtype=dt)
            splits = policy.decode_splits(batch)
            kv_bytes = sum(lens_list) * kv_heads * head_dim * 2 * 2
            outs = {}
            for name, o in (("row order", None), ("longest first", order), ("row order again", None)):
                run = layer_calls(q, caches, lens, tab, splits, o)
                outs[name] = run()
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run()
                g.replay()
                torch.cuda.synchronize()
                times = []
                for _ in range(9):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    g.replay()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) * 1000 / layers)
                us = sorted(times)[len(times) // 2]
                row = {"batch": batch, "mix": mix, "splits": splits, "variant": name, "us_per_layer": round(us, 2),
                       "tb_per_s": round(kv_bytes / (us * 1e-6) / 1e12, 3)}
                report["rows"].append(row)  # type: ignore[union-attr]
                print(f"b{batch:4d} {mix:17s} splits {splits:2d} {name:15s} {us:8.1f} us/layer {row['tb_per_s']:6.2f} TB/s",
                      flush=True)
            if not torch.equal(outs["row order"], outs["longest first"]):
                raise SystemExit(f"b{batch} {mix}: the order changed the output")
            caches.clear()
            torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
