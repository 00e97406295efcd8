"""Tensor parallelism: shard arithmetic, the process group and the collectives the model calls.

Megatron-style: q/k/v and gate/up are split by output rows (whole heads per rank), o_proj and
down_proj by input columns (their partial sums are all-reduced), the vocabulary in contiguous
ranges (``ceil(vocab / size)`` rows per rank, the last range padded). With more ranks than KV
heads each KV head is replicated on ``size // kv_heads`` consecutive ranks (vLLM's rule). Rank 0
runs the engine; the other ranks are ``engine.tp_worker`` processes. One torch.distributed default
group per process: gloo on the CPU; on CUDA NCCL for device tensors and gloo for the few host ones.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import attrs
import torch
import torch.distributed as dist

from mini_vllm.engine.config import ModelConfig
from mini_vllm.engine.errors import ConfigError, EngineClosed

# Longest any rank waits in a collective or the rendezvous: a peer that is alive but stuck (a dead
# one closes its sockets, which ends the wait at once over gloo).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)

# NVLink multicast (NVLS) stays off unless the environment says otherwise: on shared multi-GPU
# hosts a program using it can put the GPUs out of service (the lent machines set these too).
MULTICAST_OFF = (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1"))


class RankFailed(EngineClosed):
    """A rank of a tensor-parallel engine died or its collectives failed: the engine is closed."""


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Refuse sizes the model cannot be split by: whole query heads and MLP rows per rank, and KV
    heads either split (``size`` divides them) or replicated (they divide ``size``)."""
    if size == 1:
        return
    for field, value in (
        ("num_attention_heads", config.num_attention_heads),
        ("intermediate_size", config.intermediate_size),
    ):
        if value % size:
            raise ConfigError(
                f"tensor_parallel_size={size} must divide the model's {field} ({value}): "
                f"choose a divisor of {value}"
            )
    kv_heads = config.num_key_value_heads
    if kv_heads % size and size % kv_heads:
        raise ConfigError(
            f"tensor_parallel_size={size} must divide the model's num_key_value_heads ({kv_heads}) to split "
            f"them, or be a multiple of it to replicate them: choose a divisor or a multiple of {kv_heads}"
        )


def local_config(config: ModelConfig, size: int) -> ModelConfig:
    """The shapes one rank's shard is built with: its heads, KV heads (one when they are
    replicated) and MLP rows (vocabulary and hidden size stay whole: the embedding and LM head
    split the vocabulary themselves)."""
    check_tensor_parallel(config, size)
    if size == 1:
        return config
    return attrs.evolve(
        config,
        num_attention_heads=config.num_attention_heads // size,
        num_key_value_heads=max(1, config.num_key_value_heads // size),
        intermediate_size=config.intermediate_size // size,
    )


def backend_for(device: torch.device) -> str:
    # Device tensors over NCCL; host tensors (the agreed block count) over gloo, in the same group.
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@attrs.frozen
class TensorParallel:
    """One rank's place in the group and the collectives its shard runs.

    ``group`` None: a shard built without peers (to inspect its weights); collectives then raise.
    """

    rank: int
    size: int
    group: Any = None  # torch.distributed.ProcessGroup

    def __attrs_post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ConfigError(f"tensor-parallel rank must be in [0, {self.size - 1}], got {self.rank}")

    @property
    def is_driver(self) -> bool:
        """Rank 0: the rank that schedules and samples."""
        return self.rank == 0

    def split(self, total: int) -> tuple[int, int]:
        """This rank's (start, length) of ``total`` rows split evenly (``check_tensor_parallel``
        made sure it divides)."""
        length = total // self.size
        return self.rank * length, length

    def kv_head_shard(self, kv_heads: int) -> tuple[int, int]:
        """This rank's (first KV head, count) of the model's ``kv_heads``: an even split, or with
        more ranks than KV heads the one head it shares with ``size // kv_heads - 1`` other ranks.

        Replicating is exact because ``check_tensor_parallel`` made ``kv_heads`` divide ``size``:
        query head h uses KV head ``h // (heads // kv_heads)``, and a group of ``heads // kv_heads``
        query heads is ``size // kv_heads`` whole ranks' contiguous ``heads // size`` heads, so every
        query head rank r holds uses KV head ``r // (size // kv_heads)``, the one it holds.
        """
        if self.size <= kv_heads:
            count = kv_heads // self.size
            return self.rank * count, count
        return self.rank // (self.size // kv_heads), 1

    def vocab_shard(self, vocab_size: int) -> tuple[int, int]:
        """This rank's (first id, rows): every rank holds ``ceil(vocab / size)`` rows, the last
        ones past the vocabulary padding (zeros, never looked up, their logits cut off)."""
        rows = -(-vocab_size // self.size)
        return self.rank * rows, rows

    def _require_group(self) -> Any:
        if self.group is None:
            raise RuntimeError("this shard was built without a process group: it cannot run collectives")
        return self.group

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (the row-parallel layers' partial outputs)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._require_group())
        return tensor

    def gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along the last dimension, in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._require_group())
        return torch.cat(parts, dim=-1)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` into every rank's (same shape and dtype), in place."""
        dist.broadcast(tensor, src=0, group=self._require_group())
        return tensor

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (a host tensor: gloo also where compute is NCCL)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._require_group())
        return int(t.item())


def open_store(port: int, rank: int, size: int) -> dist.TCPStore:
    """The rendezvous on 127.0.0.1: rank 0 listens on a free port (``port`` 0), the others join."""
    return dist.TCPStore(
        "127.0.0.1", port, size, is_master=rank == 0, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False
    )


def join_group(store: dist.TCPStore, rank: int, size: int, device: torch.device) -> TensorParallel:
    """Make this process rank ``rank`` of the default group (blocks until every rank joined)."""
    if dist.is_initialized():
        raise ConfigError(
            "a tensor-parallel engine is already open in this process (torch.distributed allows one "
            "group per process): close it first"
        )
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    if device.type == "cuda":
        for name, value in MULTICAST_OFF:  # before NCCL reads them; an explicit setting wins
            os.environ.setdefault(name, value)
    dist.init_process_group(
        backend_for(device), store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT, **kwargs
    )
    return TensorParallel(rank, size, dist.group.WORLD)


def leave_group(group: Any = None) -> None:
    """Destroy this process's group (idempotent; peers may be gone already). With ``group``: only
    if that is still the process's group (a later engine may have opened its own since)."""
    if dist.is_initialized() and (group is None or dist.group.WORLD is group):
        dist.destroy_process_group()
