"""Engine arguments (vLLM's names) and the model's architecture, both validated up front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

from mini_vllm.engine.errors import ConfigError, ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}")


def valid_block_size(value: int) -> bool:
    """A power of two from 1 to 256: the KV block sizes the engine takes (the flags' checks use it too)."""
    return 1 <= value <= 256 and not value & (value - 1)


@attrs.frozen
class EngineArgs:
    """Everything that shapes one engine. Names follow vLLM so habits carry over.

    ``model=None`` means the built-in demo model. ``dtype="auto"`` is bfloat16 on a GPU and
    float32 on the CPU (the CPU has no fast bf16 matmul and exactness tests want fp32).
    """

    model: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 1 << 30
    num_kv_blocks: int | None = None
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    seed: int = 0
    device: str = "auto"
    enforce_eager: bool = False
    # False: prompts are computed whole, in prefill-only steps that pause the decodes (vLLM's
    # original policy); max_num_batched_tokens must then hold the longest prompt.
    enable_chunked_prefill: bool = True
    # The CPU schedules step N+1 while the device runs step N. None: on GPUs, where a launch is
    # asynchronous; off on the CPU, where a launch is the whole step and it would only add a step of delay.
    async_scheduling: bool | None = None
    preemption_mode: Literal["recompute"] = "recompute"  # swapping to host memory is not built yet
    model_name: str | None = None  # the name clients use to pick this model
    # No tokenizer in this engine (vLLM's name): prompts come as ids and text is made elsewhere.
    # The engine core sets it: its frontend tokenizes and detokenizes.
    skip_tokenizer_init: bool = False
    # Ranks the model is split over (vLLM's --tensor-parallel-size): one process and device each.
    tensor_parallel_size: int = 1
    # GPU steps of at most triton_skinny.MAX_ROWS tokens take its few-row kernel for o_proj,
    # gate_up (with the SiLU-multiply) and down_proj instead of cuBLAS's split-K and the separate
    # SiLU kernel: about 4 % off a llama3-8b decode graph at 1-16 rows (docs/gpu-execution.md).
    skinny_kernels: bool = True
    # GPU kernels of ours launched with programmatic dependent launch (sm_90+): each may start
    # while the one before it ends and waits for it in its first instruction, which takes the gap
    # between two kernels out of the graph (triton_norm.dependent_launch), at steps of at most
    # cuda_runner.DEPENDENT_LAUNCH_MAX_ROWS tokens (it costs a little at 256). None: on where it
    # was measured (one GPU of compute capability 9.0+ a model), True: wherever asked or an error.
    programmatic_dependent_launch: bool | None = None

    def __attrs_post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        _positive_int("max_model_len", self.max_model_len, allow_none=True)
        _positive_int("block_size", self.block_size)
        if not valid_block_size(self.block_size):
            raise ConfigError(f"block_size must be a power of two <= 256, got {self.block_size}")
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("tensor_parallel_size", self.tensor_parallel_size)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        _positive_int("cpu_kv_cache_bytes", self.cpu_kv_cache_bytes)
        if not isinstance(self.gpu_memory_utilization, int | float) or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ConfigError(f"load_format must be auto, safetensors or dummy, got {self.load_format!r}")
        if self.preemption_mode == "swap":
            raise ConfigError("preemption_mode must be recompute: swap (KV blocks to host memory) is not implemented yet")
        if self.preemption_mode != "recompute":
            raise ConfigError(f"preemption_mode must be recompute, got {self.preemption_mode!r}")
        for flag in ("enable_prefix_caching", "enforce_eager", "enable_chunked_prefill", "skip_tokenizer_init",
                     "skinny_kernels"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        for flag in ("async_scheduling", "programmatic_dependent_launch"):
            if getattr(self, flag) is not None and not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true, false or None (auto), got {getattr(self, flag)!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} but no CUDA GPU is available")
        return torch.device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


@attrs.frozen
class ModelConfig:
    """The architecture, read from a Hugging Face ``config.json`` (or a preset)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # RMSNorm on q and k per head (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch is None:
            raise ModelLoadError(f"{source}: config.json names no architecture ('architectures' is missing)")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            kv_heads = int(raw.get("num_key_value_heads") or heads)
            head_dim = int(raw.get("head_dim") or hidden // heads)
            # transformers >= 5 writes rope_parameters; older checkpoints rope_theta/rope_scaling.
            rope = dict(raw.get("rope_parameters") or {})
            theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
            scaling = raw.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
            rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
            if rope_type in ("default", None):
                scaling = None
            elif rope_type != "llama3":
                raise ModelLoadError(f"{source}: rope scaling {rope_type!r} is not supported (supported: none, llama3)")
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            if arch == "MistralForCausalLM" and raw.get("sliding_window") not in (None, 0):
                window = int(raw["sliding_window"])
                max_pos = int(raw.get("max_position_embeddings", 4096))
                if window < max_pos:
                    # Exactness first: we attend to the whole context, so cap the length at the window.
                    raw = {**raw, "max_position_embeddings": window}
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", arch == "Qwen2ForCausalLM")),
                qk_norm=arch == "Qwen3ForCausalLM",
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as exc:
            raise ModelLoadError(f"{source}: config.json lacks required field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: config.json has a malformed field: {exc}") from None

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        if not path.is_file():
            raise ModelLoadError(f"{path.parent}: config.json is missing")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, str(path.parent))

    def __attrs_post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


# Architecture-exact presets for benchmarks with dummy weights (shapes: docs/design.md, "Reference workloads").
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "eos_token_id": 151645,
    },
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "eos_token_id": 128001,
    },
    # No single H200 holds it in bf16 (141 GB of weights): for tensor parallelism over 2-4 GPUs.
    "llama3-70b": {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 28672,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "eos_token_id": 128001,
    },
}
