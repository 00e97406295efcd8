"""The command line's shared flags: engine flags (vLLM's spellings: ``--max-model-len``,
``--block-size``, ...) for every subcommand that builds engines, sampling flags, exit codes (and
how to tell a Ctrl-C), and the argument types that refuse bad values while parsing (before
anything loads).

Used by ``transport.commands`` (serve, generate) and by ``bench``; imports nothing of either.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import attrs

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) groups: nurseries wrap what their tasks raise."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for inner in exc.exceptions for leaf in leaf_exceptions(inner)]


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C: a KeyboardInterrupt, or a group of them (as ``trio.run`` may raise it)."""
    return all(isinstance(e, KeyboardInterrupt) for e in leaf_exceptions(exc))


# ---- argument types: a bad value is an argparse error naming the flag --------------------------


def port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port must be in 0..65535 (0: any free port), got {text}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def origins(text: str) -> tuple[str, ...]:
    """``--allowed-origins``: comma-separated origins (scheme://host[:port]), ``null`` or ``*``;
    the server checks each one's form when it starts."""
    items = tuple(item.strip() for item in text.split(","))
    if not all(items):
        raise argparse.ArgumentTypeError(
            f"give origins separated by commas, e.g. http://localhost:3000,null; got {text!r}"
        )
    for item in items:
        if item not in ("*", "null") and "://" not in item:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not an origin: give scheme://host[:port] (e.g. http://localhost:3000), "
                "null (pages opened from file://) or * (any page)"
            )
    return items


def api_key(text: str) -> str:
    """``--api-key``: refused here when no HTTP header could carry it (the message never shows it)."""
    from mini_vllm.engine.errors import ConfigError
    from mini_vllm.transport.auth import check_key

    try:
        return check_key(text, "the key")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_client_api_key(parser: argparse.ArgumentParser) -> None:
    """``--api-key KEY`` of a command that talks to a server (``api_key_from`` reads it)."""
    parser.add_argument("--api-key", type=api_key, default=None, metavar="KEY",
                        help="the server's API key, sent as 'Authorization: Bearer KEY' "
                        "(default: the environment variable MINI_VLLM_API_KEY, if set)")


def api_key_from(args: argparse.Namespace) -> str | None:
    """The key to send: ``--api-key``, else MINI_VLLM_API_KEY, else None."""
    from mini_vllm.transport.auth import client_key

    return client_key(getattr(args, "api_key", None))


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


# ---- defaults in the help ---------------------------------------------------------------------


@attrs.frozen
class _FieldDefault:
    """A record field's default, looked up when the help is printed (so it cannot drift from the
    record, and building the parser does not import torch). argparse fills ``%(field_default)s``
    from the action's attributes; this object is one of them."""

    record: Callable[[], type]
    field: str
    meanings: dict[Any, str]  # default value -> what it means, for defaults like None or "auto"

    def __str__(self) -> str:
        value = attrs.fields_dict(self.record())[self.field].default
        if isinstance(value, bool):  # before the lookup: True == 1 would match a key 1
            return "on" if value else "off"
        if value in self.meanings:
            return self.meanings[value]
        if value is None or value == ():
            return "none"
        if self.field.endswith("_bytes"):
            return f"{value} = {value / (1 << 30):g} GiB"
        return str(value)


def _engine_args() -> type:
    from mini_vllm.engine.config import EngineArgs

    return EngineArgs


def _sampling_params() -> type:
    from mini_vllm.engine.sampling_params import SamplingParams

    return SamplingParams


def _add(group: Any, flag: str, record: Callable[[], type], field: str, help: str,
         meanings: dict[Any, str] | None = None, **kw: Any) -> None:
    action = group.add_argument(flag, default=None, help=f"{help} (default: %(field_default)s)", **kw)
    action.field_default = _FieldDefault(record, field, meanings or {})


# ---- engine flags -----------------------------------------------------------------------------


def add_engine_flags(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """The EngineArgs fields as flags; unset flags keep EngineArgs' defaults (shown in the help).

    ``seed=False`` leaves ``--seed`` to the caller (``generate`` uses it for sampling).
    """
    g = parser.add_argument_group("engine (vLLM spellings; defaults are EngineArgs')")

    def add(flag: str, help: str, meanings: dict[Any, str] | None = None, **kw: Any) -> None:
        _add(g, flag, _engine_args, flag[2:].replace("-", "_"), help, meanings, **kw)

    add("--dtype", "weights and activations", {"auto": "auto: bfloat16 on a GPU, float32 on the CPU"},
        choices=["auto", "float32", "float16", "bfloat16"])
    add("--max-model-len", "longest prompt + output in tokens",
        {None: "the model's max_position_embeddings, capped to what the KV cache holds"}, type=positive_int)
    add("--block-size", "tokens per KV block (a power of two <= 256)", type=positive_int)
    add("--max-num-seqs", "sequences in one batch", type=positive_int)
    add("--max-num-batched-tokens", "tokens computed in one step", type=positive_int)
    add("--gpu-memory-utilization", "fraction of GPU memory for weights, activations and KV", type=float)
    add("--cpu-kv-cache-bytes", "KV budget on the CPU", type=positive_int)
    add("--num-kv-blocks", "fix the KV cache size (per model)",
        {None: "sized by --gpu-memory-utilization on a GPU, --cpu-kv-cache-bytes on the CPU"}, type=positive_int)
    add("--enable-prefix-caching", "share the KV blocks of common prompt prefixes",
        action=argparse.BooleanOptionalAction)
    add("--load-format", "dummy: random weights of the model's shapes",
        {"auto": "auto: safetensors, or dummy for a preset"}, choices=["auto", "safetensors", "dummy"])
    if seed:
        add("--seed", "the engine's random seed (weights of dummy models, sampling)", type=int)
    add("--device", "auto, cpu, cuda or cuda:N", {"auto": "auto: cuda if available, else cpu"})
    add("--enforce-eager", "no CUDA graphs", action="store_true")
    add("--tensor-parallel-size", "split each model over this many GPUs (one process each)", type=positive_int)
    add("--enable-chunked-prefill", "split long prompts over steps beside the decodes",
        action=argparse.BooleanOptionalAction)
    add("--async-scheduling", "the CPU schedules step N+1 while the GPU runs step N",
        {None: "on GPUs only"}, action=argparse.BooleanOptionalAction)
    add("--skinny-kernels", "GPU steps of at most 16 tokens through the few-row kernel for o_proj, gate_up "
        "and down_proj (engine/triton_skinny.py; on by default, --no-skinny-kernels for cuBLAS)",
        action=argparse.BooleanOptionalAction)
    add("--programmatic-dependent-launch", "in steps of at most 64 tokens our GPU kernels may start while the one "
        "before them ends", {None: "on for one GPU of compute capability 9.0+ a model"},
        action=argparse.BooleanOptionalAction)


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
    "tensor_parallel_size",
    "skinny_kernels",
    "programmatic_dependent_launch",
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
    from mini_vllm.engine.config import PRESETS

    name, model = parse_model_spec(spec)
    given = {f: getattr(args, f) for f in _ENGINE_FLAGS if getattr(args, f, None) is not None}
    if model in PRESETS and "load_format" not in given:
        given["load_format"] = "dummy"  # a preset is shapes only: random weights are the only kind it has
    return EngineArgs(model=model, model_name=name, **given)


# ---- sampling flags ---------------------------------------------------------------------------


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (SamplingParams' names)")

    def add(flag: str, help: str, meanings: dict[Any, str] | None = None, **kw: Any) -> None:
        _add(g, flag, _sampling_params, flag[2:].replace("-", "_"), help, meanings, **kw)

    # The command's own default: SamplingParams' 16 tokens is short for a look at a model.
    g.add_argument("--max-tokens", type=positive_int, default=64, help="tokens to generate (default: %(default)s)")
    add("--temperature", "0: greedy", type=float)
    add("--top-p", "nucleus sampling's probability mass", type=float)
    add("--top-k", "sample from the k likeliest tokens", {-1: "-1, the whole vocabulary"}, type=int)
    add("--min-p", "drop tokens below this fraction of the likeliest's probability", type=float)
    add("--min-tokens", "tokens to generate before EOS or a stop string may end the output", type=int)
    add("--repetition-penalty", "> 1 discourages tokens already in the prompt or output", type=float)
    add("--presence-penalty", "in [-2, 2]", type=float)
    add("--frequency-penalty", "in [-2, 2]", type=float)
    _add(g, "--seed", _sampling_params, "seed", "per-request sampling seed",
         {None: "none, the engine's random stream"}, dest="sampling_seed", metavar="SEED", type=int)
    add("--stop", "a stop string (repeatable)", action="append")
    add("--ignore-eos", "keep generating past the end-of-sequence token", action="store_true")


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
