"""mini-vllm's benchmarks: ``mini-vllm bench throughput | attention | memory | latency | host | serve | plot |
boundary``, and the reliability tools ``mini-vllm bench soak | fuzz`` (docs/reliability.md).

Each module is one subcommand: it prints a table and writes JSON. They use the server side
(``transport``, ``actors``, ``engine``) and nothing uses them; ``mini_vllm.cli`` registers them.
"""

from __future__ import annotations

from typing import Any


def add_bench(subparsers: Any) -> None:
    """The ``bench`` subcommand and its own subcommands, each setting ``func``."""
    from mini_vllm.bench.attention import add_bench_attention
    from mini_vllm.bench.boundary import add_bench_boundary
    from mini_vllm.bench.fuzz import add_bench_fuzz
    from mini_vllm.bench.host import add_bench_host
    from mini_vllm.bench.latency import add_bench_latency
    from mini_vllm.bench.memory import add_bench_kv
    from mini_vllm.bench.serve import add_bench_plot, add_bench_serve
    from mini_vllm.bench.soak import add_bench_soak
    from mini_vllm.bench.throughput import add_bench_throughput

    p = subparsers.add_parser("bench", help="benchmarks (print a table, write JSON)")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for add in (add_bench_throughput, add_bench_attention, add_bench_kv, add_bench_latency, add_bench_host,
                add_bench_serve, add_bench_plot, add_bench_boundary, add_bench_soak, add_bench_fuzz):
        add(sub)
