"""Which split count and partition rule should the runner give each decode batch size? On the GPU:
``python3 docs/benchmarks/decode_partition_probe.py MODEL OUT.json [OLD_KERNEL.py]``.

Runs against the tree of f693d1c (2026-12-02), whose kernel took ``target_programs``; that kernel
lost to the per-sequence one at every split count above one (decode-partition-*-f693d1c.json) and
was reverted. Its old-kernel rows chose the runner's split rule (eight programs per SM).

That decode kernel cut contexts with one partition length for the whole batch, set on the device
(``decode_attention_triton``'s ``target_programs``: at least the longest context / splits, and
at least the mean unless the batch is too small to give that many programs). For each batch size
and three length mixes (every context 830; drawn uniformly from 100 to 2,048; OFFLINE-256's
mid-run shape, prompt 100-1,024 plus up to 1,024 generated), the kernel is captured in a CUDA
graph of all the model's layers, each with its own cache (the L2 cache holds no previous layer),
at each split count and target. With a third argument, a copy of the previous kernel file (each
context cut into ``splits`` by its own length) is timed beside it on the same machine.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
from collections.abc import Callable

import torch

from mini_vllm.engine.triton_attention import decode_attention_triton

# name: layers, heads, kv heads, head dim
SHAPES = {"llama3-8b": (32, 32, 8, 128), "qwen3-0.6b": (28, 16, 8, 128)}
BLOCK = 16
BATCHES = (8, 16, 32, 64, 96, 128, 192, 256)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)
OLD_SPLITS = (1, 2, 3, 4, 6, 8, 12)
TARGETS_PER_SM = (0, 1, 2, 4, 8)  # 0: the grid's own count (cut by the longest context alone)


def lengths(mix: str, batch: int, rng: random.Random) -> list[int]:
    if mix == "equal-830":
        return [830] * batch
    if mix == "uniform-100-2048":
        return [rng.randint(100, 2048) for _ in range(batch)]
    return [rng.randint(100, 1024) + rng.randint(0, 1024) for _ in range(batch)]  # offline-256-like


def layer_calls(
    fn: Callable[..., torch.Tensor], caches: list[tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor,
    lens: torch.Tensor, tab: torch.Tensor, scale: float, splits: int, kwargs: dict[str, object],
) -> Callable[[], None]:
    def run() -> None:
        for kc, vc in caches:
            fn(q, kc, vc, lens, tab, scale, splits, num_warps=4, **kwargs)

    return run


def time_layers(run: Callable[[], None], layers: int) -> float:
    """Median device time per layer of one graph of every layer's decode call, microseconds."""
    run()  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / layers)
    return sorted(times)[len(times) // 2]


def main() -> None:
    model, out_path = sys.argv[1], sys.argv[2]
    old = None
    if len(sys.argv) > 3:
        spec = importlib.util.spec_from_file_location("old_triton_attention", sys.argv[3])
        old = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(old)  # type: ignore[union-attr]
    layers, heads, kv_heads, head_dim = SHAPES[model]
    dev, dt = torch.device("cuda"), torch.bfloat16
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    scale = head_dim**-0.5
    report: dict[str, object] = {
        "model": model, "device": torch.cuda.get_device_name(dev), "num_sms": num_sms,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "num_warps": 4, "command": " ".join(["python3", *sys.argv]), "rows": [],
    }
    rng = random.Random(0)
    for batch in BATCHES:
        for mix in ("equal-830", "uniform-100-2048", "offline-256-like"):
            lens_list = lengths(mix, batch, rng)
            blocks = [-(-n // BLOCK) for n in lens_list]
            num_blocks = sum(blocks)
            caches = [
                (torch.randn(num_blocks, BLOCK, kv_heads, head_dim, device=dev, dtype=dt),
                 torch.randn(num_blocks, BLOCK, kv_heads, head_dim, device=dev, dtype=dt))
                for _ in range(layers)
            ]
            perm = torch.randperm(num_blocks, device=dev, dtype=torch.int32)
            tab = torch.zeros(batch, max(blocks), device=dev, dtype=torch.int32)
            at = 0
            for i, n in enumerate(blocks):
                tab[i, :n] = perm[at : at + n]
                at += n
            lens = torch.tensor(lens_list, device=dev, dtype=torch.int32)
            kv_bytes = sum(lens_list) * kv_heads * head_dim * 2 * 2  # keys and values, bf16
            q = torch.randn(batch, heads, head_dim, device=dev, dtype=dt)
            variants: list[tuple[str, int, int, Callable[..., torch.Tensor], dict[str, object]]] = []
            for splits in SPLITS:
                for per_sm in TARGETS_PER_SM if splits > 1 else (0,):
                    target = {"target_programs": per_sm * num_sms or None}
                    variants.append(("batch", splits, per_sm, decode_attention_triton, target))
            if old is not None:
                for splits in OLD_SPLITS:
                    variants.append(("per-sequence (old)", splits, 0, old.decode_attention_triton, {}))
            for rule, splits, per_sm, fn, kwargs in variants:
                us = time_layers(layer_calls(fn, caches, q, lens, tab, scale, splits, kwargs), layers)
                row = {
                    "batch": batch, "mix": mix, "rule": rule, "splits": splits, "target_per_sm": per_sm,
                    "us_per_layer": round(us, 2), "tb_per_s": round(kv_bytes / (us * 1e-6) / 1e12, 3),
                }
                report["rows"].append(row)  # type: ignore[union-attr]
                print(f"b{batch:4d} {mix:17s} {rule:18s} splits {splits:2d} target/SM {per_sm}"
                      f" {us:8.1f} us/layer {row['tb_per_s']:6.2f} TB/s", flush=True)
            caches.clear()
            torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
