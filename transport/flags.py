"""The command line's shared flags: engine flags (vLLM's spellings: ``--max-model-len``,
``--block-size``, ...) for every subcommand that builds engines, sampling flags, and exit codes.

Used by ``transport.commands`` (serve, generate) and by ``bench``; imports nothing of either.
"""

from __future__ import annotations

import argparse
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C



def add_engine_flags(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """The EngineArgs fields as flags; unset flags keep EngineArgs' defaults.

    ``seed=False`` leaves ``--seed`` to the caller (``generate`` uses it for sampling).
    """
    g = parser.add_argument_group("engine (vLLM spellings; defaults are EngineArgs')")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--cpu-kv-cache-bytes", type=int, default=None, help="KV budget on the CPU")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="fix the KV cache size (per model)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default=None)
    if seed:
        g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="split long prompts over steps beside the decodes (default on)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU schedules step N+1 while the GPU runs step N (default: on GPUs only)")


_ENGINE_FLAGS = (
    "dtype",
    "max_model_len",
    "block_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "gpu_memory_utilization",
    "cpu_kv_cache_bytes",
    "num_kv_blocks",
    "enable_prefix_caching",
    "load_format",
    "seed",
    "device",
    "enforce_eager",
    "enable_chunked_prefill",
    "async_scheduling",
)


def parse_model_spec(spec: str | None) -> tuple[str | None, str | None]:
    """``NAME=PATH`` -> (name, path); ``PATH`` or a preset -> (None, spec); None / "demo" -> the demo model."""
    if spec is None:
        return None, None
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, (None if path in ("", "demo") else path)
    return None, (None if spec == "demo" else spec)


def engine_args_from(args: argparse.Namespace, spec: str | None) -> Any:  # -> engine.EngineArgs
    from mini_vllm.engine import EngineArgs

    name, model = parse_model_spec(spec)
    given = {f: getattr(args, f) for f in _ENGINE_FLAGS if getattr(args, f, None) is not None}
    return EngineArgs(model=model, model_name=name, **given)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (SamplingParams' names)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--min-tokens", type=int, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--seed", dest="sampling_seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None)


_SAMPLING_FLAGS = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "min_tokens": "min_tokens",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "sampling_seed": "seed",
    "stop": "stop",
    "ignore_eos": "ignore_eos",
}


def sampling_from(args: argparse.Namespace) -> dict[str, Any]:
    return {field: getattr(args, flag) for flag, field in _SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
