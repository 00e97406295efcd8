"""Sizing and allocating the paged KV cache.

One preallocated tensor per model: ``[layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim]``.
Its size comes from a memory budget: on the CPU a configurable byte count; on the GPU what is left
under ``gpu_memory_utilization`` after the weights and a profiled activation peak.
"""

from __future__ import annotations

import torch

from mini_vllm.engine.config import ModelConfig
from mini_vllm.engine.errors import ConfigError


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * block_size * config.num_key_value_heads * config.head_dim * elem


def num_blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    n = budget_bytes // bytes_per_block(config, block_size, dtype)
    if n < 1:
        raise ConfigError(
            f"the KV cache budget ({budget_bytes} bytes) is smaller than one block "
            f"({bytes_per_block(config, block_size, dtype)} bytes)"
        )
    return int(n)


def gpu_kv_budget_bytes(device: torch.device, utilization: float, reserve_bytes: int) -> int:
    """Bytes left for the KV cache: the utilization share of the GPU, minus what is in use now
    (weights, CUDA context, other processes), minus ``reserve_bytes`` (activation peak, graphs)."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    budget = int(total * utilization) - used - reserve_bytes
    if budget <= 0:
        raise ConfigError(
            f"no memory left for the KV cache: gpu_memory_utilization={utilization} allows "
            f"{total * utilization / 2**30:.1f} GiB, {used / 2**30:.1f} GiB are in use and activations "
            f"need {reserve_bytes / 2**30:.1f} GiB"
        )
    return budget


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    shape = (config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)
