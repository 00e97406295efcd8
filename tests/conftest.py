"""Shared fixtures: tiny random Hugging Face checkpoints built on the spot (nothing downloaded)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Triton picks interpreter or GPU when kernels are defined: on a machine without a GPU, interpret
# them (on the CPU) whichever test module imports them first.
if not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests never write to the user's cache: the demo model is built in a temp dir."""
    path = tmp_path_factory.mktemp("mini-vllm-cache")
    old = os.environ.get("MINI_VLLM_CACHE_DIR")
    os.environ["MINI_VLLM_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MINI_VLLM_CACHE_DIR", None)
    else:
        os.environ["MINI_VLLM_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def demo_model_dir(isolated_cache: Path) -> Path:
    from mini_vllm.engine.demo_model import ensure_demo_model

    return ensure_demo_model(isolated_cache)


def build_tiny_model(directory: Path, architecture: str, seed: int = 0, shards: bool = False, **overrides: Any) -> Path:
    """A tiny random checkpoint of ``architecture`` with the byte-level tokenizer, saved as safetensors."""
    import torch
    import transformers

    from mini_vllm.engine.demo_model import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    common: dict[str, Any] = {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    per_arch: dict[str, dict[str, Any]] = {
        "LlamaForCausalLM": {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
        "MistralForCausalLM": {"sliding_window": None, "head_dim": 16},
        "Qwen2ForCausalLM": {"tie_word_embeddings": True, "num_key_value_heads": 1},
        "Qwen3ForCausalLM": {"head_dim": 32, "tie_word_embeddings": False},
    }
    config_cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_cls(**{**common, **per_arch[architecture], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    with torch.no_grad():  # wider than HF's init: clear argmax margins, as a trained model has
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.1)
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100KB" if shards else "5GB")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model(architecture, seed=0, shards=False, **config_overrides) -> Path``, built once per arguments."""
    built: dict[str, Path] = {}

    def make(architecture: str = "LlamaForCausalLM", seed: int = 0, shards: bool = False, **overrides: Any) -> Path:
        key = repr((architecture, seed, shards, sorted(overrides.items())))
        if key not in built:
            built[key] = build_tiny_model(tmp_path_factory.mktemp(architecture), architecture, seed, shards, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="module")
def reference(demo_model_dir: Path) -> Any:
    """The offline engine's greedy output for the serving tests to compare with."""
    from conftest_serving import Reference

    return Reference(demo_model_dir)


@pytest.fixture
def engine(demo_model_dir: Path) -> Any:
    """A fresh demo-model engine for one serving test."""
    from conftest_serving import build_engine

    return build_engine(demo_model_dir)
