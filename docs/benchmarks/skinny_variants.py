"""Which part of the skinny kernel's norm fusion is slow? On the GPU:
``python3 docs/benchmarks/skinny_variants.py MODEL OUT.json``.

skinny_ab.py found the fused norm variants (qkv, gate_up) three to five times slower than the
separate kernels on llama3-8b at one row, while the plain ones (o, down) beat cuBLAS. Here each
fusion is switched on alone on qkv's and gate_up's shapes at 1 and 16 rows, with a few tiles and
warp counts, beside cuBLAS and the RMSNorm kernel alone; ``no store`` is the kernel with its
in-loop store of the residual sum cut out (a copy of the module's source, for this probe only).
Device times of the GPU alone (gpu_time_us), µs.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mini_vllm.engine import triton_skinny
from mini_vllm.engine.cuda_runner import gpu_time_us
from mini_vllm.engine.triton_norm import rms_norm_triton

SHAPES = {"llama3-8b": (4096, 6144, 14336), "qwen3-0.6b": (1024, 4096, 3072)}  # hidden, qkv out, intermediate
TILES = [None, (32, 128, 3), (32, 256, 3), (64, 128, 3), (64, 256, 3), (16, 256, 3)]


def without_store() -> Any:
    """The module with the in-loop ``if pid == 0: tl.store(res_out ...)`` removed."""
    src = Path(triton_skinny.__file__).read_text()
    lines = src.splitlines()
    i = next(n for n, line in enumerate(lines) if "if pid == 0:" in line)
    del lines[i : i + 2]
    path = Path("/tmp/triton_skinny_nostore.py")
    path.write_text("\n".join(lines) + "\n")
    spec = importlib.util.spec_from_file_location("triton_skinny_nostore", path)
    if spec is None or spec.loader is None:
        raise RuntimeError("cannot load the patched module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    model, out_path = sys.argv[1], sys.argv[2]
    hidden, qkv_n, inter = SHAPES[model]
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    wq = torch.randn(qkv_n, hidden, device=dev, dtype=dt) / hidden**0.5
    wgu = torch.randn(2 * inter, hidden, device=dev, dtype=dt) / hidden**0.5
    nw = torch.ones(hidden, device=dev, dtype=dt)
    nostore = without_store()
    results: dict[str, float] = {}

    def time_it(name: str, fn: Any) -> None:
        try:
            results[name] = gpu_time_us(fn, 50)
        except Exception as e:  # a tile that does not fit (OutOfResources) is a result too
            print(f"{model} {name:55s} failed: {type(e).__name__}: {str(e)[:80]}", flush=True)
            return
        print(f"{model} {name:55s} {results[name]:8.1f} µs", flush=True)

    for m in (1, 16):
        x = torch.randn(m, hidden, device=dev, dtype=dt)
        res = torch.randn(m, hidden, device=dev, dtype=dt)
        time_it(f"m={m} rmsnorm+residual alone", partial(rms_norm_triton, x, nw, 1e-6, res))
        time_it(f"m={m} qkv cuBLAS", partial(F.linear, x, wq))
        time_it(f"m={m} gate_up cuBLAS", partial(F.linear, x, wgu))
        for tiles in TILES:
            for warps in (4, 8):
                tag = f"tiles {tiles or 'default'} warps {warps}"
                for mod, label in ((triton_skinny, ""), (nostore, " no store")):
                    lin = partial(mod.skinny_linear_triton, tiles=tiles, num_warps=warps)
                    if not label:
                        time_it(f"m={m} qkv plain {tag}", partial(lin, x, wq))
                        time_it(f"m={m} qkv norm {tag}", partial(lin, x, wq, norm_weight=nw, eps=1e-6))
                        time_it(f"m={m} gate_up silu {tag}", partial(lin, x, wgu, silu_intermediate=inter))
                    time_it(f"m={m} qkv residual+norm{label} {tag}",
                            partial(lin, x, wq, residual=res, norm_weight=nw, eps=1e-6))
                    time_it(f"m={m} gate_up residual+norm+silu{label} {tag}",
                            partial(lin, x, wgu, residual=res, norm_weight=nw, eps=1e-6, silu_intermediate=inter))
    record = {"model": model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "us": results}
    with open(out_path, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
