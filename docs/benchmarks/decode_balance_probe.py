"""Does the decode attention kernel lose bandwidth when a batch's contexts differ in length, and
would another split count or a longest-first order win it back? On the GPU:
``python3 docs/benchmarks/decode_balance_probe.py MODEL OUT.json``.

OFFLINE-256's sequences run from about 200 to 2,048 tokens of context at once, while the split
count the runner uses (``_TritonAttention.decode_splits``) was tuned on batches of equal contexts.
For each batch size and two length mixes (every context 830; contexts drawn uniformly from 100 to
2,048), the engine's own decode kernel (4 warps, as the runner calls it) is captured in a CUDA
graph of all the model's layers, each layer with its own cache (so the L2 cache holds no previous
layer), at every split count from 1 to 32, with the batch in drawn order and sorted longest first.
It prints the time per layer and the bandwidth of the keys and values read, and marks the split
count the runner would pick.
"""

from __future__ import annotations

import json
import random
import sys
import time

import torch

from mini_vllm.engine.triton_attention import decode_attention_triton

# name: layers, heads, kv heads, head dim
SHAPES = {"llama3-8b": (32, 32, 8, 128), "qwen3-0.6b": (28, 16, 8, 128)}
BLOCK = 16
BATCHES = (8, 16, 32, 64, 96, 128, 192, 256)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def runner_splits(batch: int, kv_heads: int, num_sms: int, max_splits: int = 32) -> int:
    # _TritonAttention.decode_splits with max_model_len 2,048 (num_splits_for(2048, 64, 64) = 32)
    return max(1, min(max_splits, -(-4 * num_sms // (batch * kv_heads))))


def time_layers(
    caches: list[tuple[torch.Tensor, torch.Tensor]], q: torch.Tensor, lens: torch.Tensor, tab: torch.Tensor,
    scale: float, splits: int,
) -> float:
    """Median device time per layer of one graph of every layer's decode call, microseconds."""

    def run() -> None:
        for kc, vc in caches:
            decode_attention_triton(q, kc, vc, lens, tab, scale, splits, num_warps=4)

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
        times.append(a.elapsed_time(b) * 1000 / len(caches))
    return sorted(times)[len(times) // 2]


def main() -> None:
    model, out_path = sys.argv[1], sys.argv[2]
    layers, heads, kv_heads, head_dim = SHAPES[model]
    dev, dt = torch.device("cuda"), torch.bfloat16
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    scale = head_dim**-0.5
    report: dict[str, object] = {
        "model": model, "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "num_warps": 4, "rows": [],
    }
    rng = random.Random(0)
    for batch in BATCHES:
        for mix in ("equal-830", "uniform-100-2048"):
            lens_list = [830] * batch if mix == "equal-830" else [rng.randint(100, 2048) for _ in range(batch)]
            blocks = [-(-n // BLOCK) for n in lens_list]
            width = max(blocks)
            num_blocks = sum(blocks)
            caches = [
                (torch.randn(num_blocks, BLOCK, kv_heads, head_dim, device=dev, dtype=dt),
                 torch.randn(num_blocks, BLOCK, kv_heads, head_dim, device=dev, dtype=dt))
                for _ in range(layers)
            ]
            perm = torch.randperm(num_blocks, device=dev, dtype=torch.int32)
            table = torch.zeros(batch, width, device=dev, dtype=torch.int32)
            at = 0
            for i, n in enumerate(blocks):
                table[i, :n] = perm[at : at + n]
                at += n
            kv_bytes = sum(lens_list) * kv_heads * head_dim * 2 * 2  # keys and values, bf16
            q = torch.randn(batch, heads, head_dim, device=dev, dtype=dt)
            orders = {
                "drawn": torch.arange(batch, device=dev),
                "longest-first": torch.tensor(sorted(range(batch), key=lambda i: -lens_list[i]), device=dev),
            }
            pick = runner_splits(batch, kv_heads, num_sms)
            for order_name, order in orders.items():
                lens = torch.tensor(lens_list, device=dev, dtype=torch.int32)[order].contiguous()
                tab = table[order].contiguous()
                for splits in SPLITS:
                    us = time_layers(caches, q, lens, tab, scale, splits)
                    row = {
                        "batch": batch, "mix": mix, "order": order_name, "splits": splits,
                        "runner_pick": splits == pick, "us_per_layer": round(us, 2),
                        "tb_per_s": round(kv_bytes / (us * 1e-6) / 1e12, 3),
                    }
                    report["rows"].append(row)  # type: ignore[union-attr]
                    print(f"b{batch:4d} {mix:17s} {order_name:13s} splits {splits:2d}{'*' if row['runner_pick'] else ' '} "
                          f"{us:8.1f} us/layer {row['tb_per_s']:6.2f} TB/s", flush=True)
            del caches
            torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
