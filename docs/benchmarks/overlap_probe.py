"""Does a large decode step get faster if its batch runs as two halves on two CUDA streams, so
that one half's memory-bound attention overlaps the other half's compute-bound matmuls?
``python3 docs/benchmarks/overlap_probe.py MODEL OUT.json [BATCH] [CONTEXT]`` on the GPU.

A probe before any engine change, with the engine's own decode attention kernel and cuBLAS on one
layer's shapes of MODEL (random weights, no norms or rotary: those are the same in every mode).
Each mode is captured as one CUDA graph of all the model's layers and replayed; device time, ms:
- ``full``: the whole batch on one stream, as the engine's decode graph runs it today;
- ``attention only`` / ``matmuls only``: the two halves of that work alone (what an ideal overlap
  could reach is about the larger of the two);
- ``P parts, one stream``: the batch cut in P parts, one after another (the cost of smaller matmuls);
- ``P parts, P streams``: the same parts forked onto P streams inside the graph, free to overlap.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mini_vllm.engine.triton_attention import decode_attention_triton

# name: layers, hidden, heads, kv heads, head dim, intermediate
SHAPES = {
    "llama3-8b": (32, 4096, 32, 8, 128, 14336),
    "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072),
}
BLOCK = 16
WEIGHT_SETS = 4  # layers cycle through these (each larger than the L2 cache either way)


def main() -> None:
    model, out_path = sys.argv[1], sys.argv[2]
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    context = int(sys.argv[4]) if len(sys.argv) > 4 else 830
    layers, hidden, heads, kv_heads, head_dim, inter = SHAPES[model]
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    qkv_n = (heads + 2 * kv_heads) * head_dim
    weights = [
        (torch.randn(qkv_n, hidden, device=dev, dtype=dt) / hidden**0.5,
         torch.randn(hidden, heads * head_dim, device=dev, dtype=dt) / hidden**0.5,
         torch.randn(2 * inter, hidden, device=dev, dtype=dt) / hidden**0.5,
         torch.randn(hidden, inter, device=dev, dtype=dt) / inter**0.5)
        for _ in range(WEIGHT_SETS)
    ]
    blocks_per_seq = -(-context // BLOCK)
    num_blocks = batch * blocks_per_seq
    caches = [(torch.randn(num_blocks, BLOCK, kv_heads, head_dim, device=dev, dtype=dt),
               torch.randn(num_blocks, BLOCK, kv_heads, head_dim, device=dev, dtype=dt)) for _ in range(layers)]
    tables = torch.randperm(num_blocks, device=dev, dtype=torch.int32).view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    x0 = torch.randn(batch, hidden, device=dev, dtype=dt)
    scale = head_dim**-0.5

    def chain(rows: slice, attention: bool = True, matmuls: bool = True) -> torch.Tensor:
        x = x0[rows]
        for layer in range(layers):
            wqkv, wo, wgu, wd = weights[layer % WEIGHT_SETS]
            kc, vc = caches[layer]
            qkv = F.linear(x, wqkv) if matmuls else x0.new_zeros(x.shape[0], qkv_n)
            q = qkv[:, : heads * head_dim].view(-1, heads, head_dim)
            if attention:
                attn = decode_attention_triton(q, kc, vc, lens[rows], tables[rows], scale, 1, num_warps=4)
            else:
                attn = q
            if matmuls:
                o = F.linear(attn.reshape(x.shape[0], -1), wo)
                gate, up = F.linear(o, wgu).chunk(2, dim=-1)
                x = F.linear(F.silu(gate) * up, wd)
            else:
                x = attn.reshape(x.shape[0], -1)[:, :hidden].contiguous()
        return x

    def parts_of(p: int) -> list[slice]:
        step = batch // p
        return [slice(i * step, (i + 1) * step) for i in range(p)]

    def serial(p: int) -> None:
        for rows in parts_of(p):
            chain(rows)

    def forked(p: int) -> None:
        main_stream = torch.cuda.current_stream()
        streams = [torch.cuda.Stream() for _ in range(p - 1)]
        for s in streams:
            s.wait_stream(main_stream)
        rows = parts_of(p)
        for s, r in zip(streams, rows[1:], strict=True):
            with torch.cuda.stream(s):
                chain(r)
        chain(rows[0])
        for s in streams:
            main_stream.wait_stream(s)

    modes = {
        "full": lambda: chain(slice(0, batch)),
        "attention only": lambda: chain(slice(0, batch), matmuls=False),
        "matmuls only": lambda: chain(slice(0, batch), attention=False),
        "2 parts, one stream": lambda: serial(2),
        "2 parts, 2 streams": lambda: forked(2),
        "4 parts, one stream": lambda: serial(4),
        "4 parts, 4 streams": lambda: forked(4),
    }
    results: dict[str, float] = {}
    capture = torch.cuda.Stream()
    for name, fn in modes.items():
        with torch.cuda.stream(capture):
            fn()  # warm up (Triton compiles, cuBLAS picks kernels)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=capture):
            fn()
        times = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        results[name] = statistics.median(times[3:])
        print(f"{model} batch {batch} context {context}: {name:22s} {results[name]:8.3f} ms", flush=True)
        del graph
    record = {"model": model, "batch": batch, "context": context, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "ms": results}
    with open(out_path, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
