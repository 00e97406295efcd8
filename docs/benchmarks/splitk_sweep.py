"""The split-K projection (engine/triton_splitk.py) against cuBLAS on the decode shapes of both
models, 17 to 256 rows, over a grid of tiles and splits.

Run from the repository root on a GPU machine (on the H200: after
``source docs/benchmarks/device_env.sh``):

    python3 docs/benchmarks/splitk_sweep.py OUT.json

GPU time alone (``gpu_time_us``: calls queued behind a wait, as in a step). Each call reads the
next of several copies of the weight, more bytes in all than the L2 holds, since in a step the
weights come from HBM (attention has swept the L2 in between). Every result is checked against
an fp32 product and against a second run (bit for bit: the reduction's order is fixed).
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
import torch.nn.functional as F

from mini_vllm.engine.cuda_runner import gpu_time_us
from mini_vllm.engine.triton_splitk import SplitKLinear, SplitTiles, split_tiles

SHAPES = {  # name: (N, K) of the weight
    "qwen3-0.6b qkv": (4096, 1024), "qwen3-0.6b o": (1024, 2048), "qwen3-0.6b gate_up": (6144, 1024),
    "qwen3-0.6b down": (1024, 3072),
    "llama3-8b qkv": (6144, 4096), "llama3-8b o": (4096, 4096), "llama3-8b down": (4096, 14336),
}
ROWS = (24, 32, 64, 128, 256)
GRID = [SplitTiles(bm, bn, bk, s) for bm, bn, bk, s in itertools.product((32, 64), (64, 128), (64, 128), (1, 2, 4, 8))]
L2_BYTES = 60 << 20


def main() -> None:
    out_path = sys.argv[1]
    dev = torch.device("cuda")
    linear = SplitKLinear(max(ROWS))
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    import triton

    result["triton"] = triton.__version__
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-4 * L2_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            want = F.linear(x.float(), weights[0].float())
            turn = itertools.cycle(range(copies))
            row: dict = {"copies": copies}
            row["cublas_us"] = gpu_time_us(lambda x=x, w=weights, turn=turn: F.linear(x, w[next(turn)]), reps=60)
            timed = {}
            for t in [*GRID, split_tiles(m, n, k)]:
                if t.block_m > 32 and m <= 32:
                    continue
                label = f"{t.block_m}/{t.block_n}/{t.block_k}/{t.splits}"
                a, b = linear(x, weights[0], t), linear(x, weights[0], t)
                if not torch.equal(a, b):
                    raise SystemExit(f"{name} m={m} {label}: two runs differ")
                err = (a.float() - want).abs().max().item()
                if err > 0.05 * want.abs().max().item():
                    raise SystemExit(f"{name} m={m} {label}: error {err}")
                timed[label] = gpu_time_us(lambda t=t, x=x, w=weights, turn=turn: linear(x, w[next(turn)], t), reps=60)
            d = split_tiles(m, n, k)
            row["default"] = f"{d.block_m}/{d.block_n}/{d.block_k}/{d.splits}"
            row["default_us"] = timed[row["default"]]
            row["splitk_us"] = timed
            best = min(timed, key=timed.__getitem__)
            row["best"], row["best_us"] = best, timed[best]
            result["shapes"][f"{name} m={m}"] = row
            print(f"{name:20s} m={m:3d} cublas {row['cublas_us']:6.2f}  default {row['default']:12s} "
                  f"{row['default_us']:6.2f}  best {best:12s} {timed[best]:6.2f}", flush=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
