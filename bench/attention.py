"""``mini-vllm bench attention``: the decode attention kernel's variants at one shape (GPU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from mini_vllm.bench.command import HelpFormatter, fail, interruptible, unwritable, write_text
from mini_vllm.transport.flags import EXIT_ERROR


def add_bench_attention(sub: Any) -> None:
    t = sub.add_parser("attention", help="decode attention kernel: time and achieved bandwidth per variant (GPU)",
                       formatter_class=HelpFormatter)
    t.add_argument("--batch", type=int, default=256, help="sequences in the batch")
    t.add_argument("--context", type=int, default=900, help="tokens per sequence")
    t.add_argument("--heads", type=int, default=16, help="query heads")
    t.add_argument("--kv-heads", type=int, default=8, help="key/value heads (must divide --heads)")
    t.add_argument("--head-dim", type=int, default=128, help="channels per head")
    t.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    t.add_argument("--output", default=None, help="write the table as JSON here (default: no file, the table only)")
    t.set_defaults(func=run_attention)


def check_args(args: argparse.Namespace) -> str | None:
    for name in ("batch", "context", "heads", "kv_heads", "head_dim", "block_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    if args.heads % args.kv_heads:
        return f"--kv-heads ({args.kv_heads}) must divide --heads ({args.heads})"
    if not torch.cuda.is_available():
        return "bench attention times a GPU kernel and needs a CUDA GPU: run it on a machine with one"
    return unwritable(Path(args.output), "--output") if args.output else None


@interruptible("attention")
def run_attention(args: argparse.Namespace) -> int:
    """Sweep split count, key tile and warps of the decode kernel at one shape; KV bytes / time."""
    error = check_args(args)
    if error:
        return fail("attention", error)
    try:
        import triton.testing

        from mini_vllm.engine.triton_attention import decode_attention_triton
    except ImportError as exc:
        return fail("attention", f"cannot import triton ({exc}): install it (pip install triton)", EXIT_ERROR)
    dev = torch.device("cuda")
    bs, ctx, bsz = args.batch, args.context, args.block_size
    per_seq = -(-ctx // bsz)
    blocks = bs * per_seq
    shape = (blocks, bsz, args.kv_heads, args.head_dim)
    k = torch.randn(shape, dtype=torch.bfloat16, device=dev)
    v = torch.randn(shape, dtype=torch.bfloat16, device=dev)
    tables = torch.randperm(blocks, device=dev, dtype=torch.int64).to(torch.int32).view(bs, per_seq)
    lens = torch.full((bs,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(bs, args.heads, args.head_dim, dtype=torch.bfloat16, device=dev)
    kv_bytes = 2 * bs * ctx * args.kv_heads * args.head_dim * 2
    rows = []
    for splits in (1, 2, 4, 8, 16, 32, 64):
        for block_n in (16, 32, 64):
            for warps in (4, 8):
                try:
                    ms = triton.testing.do_bench(
                        lambda s=splits, n=block_n, w=warps: decode_attention_triton(
                            q, k, v, lens, tables, 0.088, s, block_n=n, num_warps=w),
                        warmup=10, rep=40, return_mode="median")
                except Exception as exc:  # a variant that does not compile is reported, not fatal
                    rows.append({"splits": splits, "block_n": block_n, "warps": warps, "error": str(exc)[:80]})
                    continue
                rows.append({"splits": splits, "block_n": block_n, "warps": warps, "ms": round(ms, 4),
                             "tb_per_s": round(kv_bytes / ms / 1e9, 3)})
    rows_ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    print(f"decode attention, batch {bs}, context {ctx}, {args.heads}/{args.kv_heads} heads, "
          f"head_dim {args.head_dim}: {kv_bytes / 1e9:.2f} GB of K/V per call")
    for r in rows_ok[:12]:
        print(f"  splits {r['splits']:>2}  block_n {r['block_n']:>2}  warps {r['warps']}  "
              f"{r['ms']:.4f} ms  {r['tb_per_s']:.2f} TB/s")
    if args.output:
        text = json.dumps({"shape": vars(args) | {"func": None}, "rows": rows}, indent=1) + "\n"
        failed = write_text("attention", Path(args.output), text)
        if failed is not None:
            return failed
    return 0
