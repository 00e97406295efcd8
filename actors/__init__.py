"""The trio shell around the engine: ingress, a scheduler and an executor thread per model, the
block manager's KV split, and the embedding API (``open_service``)."""

from mini_vllm.actors.block_manager import BlockManagerStats, KvShare, plan_kv_budget
from mini_vllm.actors.errors import (
    DuplicateRequest,
    ModelRequired,
    Overloaded,
    ServiceError,
    ShuttingDown,
    UnknownModel,
)
from mini_vllm.actors.ingress import ModelInfo
from mini_vllm.actors.loop_lag import LagUnderLoad, LoopLagMonitor, LoopLagStats, measure_loop_lag_under_load
from mini_vllm.actors.request_stream import ErrorInfo, GenerationDelta, SampleOutput, Usage
from mini_vllm.actors.service import Generation, LoadProgress, Service, ServiceConfig, ServiceStats, open_service

__all__ = [
    "BlockManagerStats",
    "DuplicateRequest",
    "ErrorInfo",
    "Generation",
    "GenerationDelta",
    "KvShare",
    "LagUnderLoad",
    "LoadProgress",
    "LoopLagMonitor",
    "LoopLagStats",
    "ModelInfo",
    "ModelRequired",
    "Overloaded",
    "SampleOutput",
    "Service",
    "ServiceConfig",
    "ServiceError",
    "ServiceStats",
    "ShuttingDown",
    "UnknownModel",
    "Usage",
    "measure_loop_lag_under_load",
    "open_service",
    "plan_kv_budget",
]
