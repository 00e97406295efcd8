"""mini-vllm's compute core: models, paged KV cache, block manager, scheduler, sampler.

Synchronous and free of trio; ``actors`` wraps it for serving. Start at ``LLM`` (offline) or
``LLMEngine`` (step by step).
"""

from mini_vllm.engine.config import EngineArgs, ModelConfig
from mini_vllm.engine.errors import ConfigError, EngineClosed, InvalidRequest, MiniVllmError, ModelLoadError
from mini_vllm.engine.llm import LLM
from mini_vllm.engine.llm_engine import EngineStats, LLMEngine, ScheduledBatch
from mini_vllm.engine.outputs import CompletionOutput, RequestDelta, RequestOutput, SampleDelta, TokenLogprob
from mini_vllm.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "ConfigError",
    "EngineArgs",
    "EngineClosed",
    "EngineStats",
    "InvalidRequest",
    "LLMEngine",
    "MiniVllmError",
    "ModelConfig",
    "ModelLoadError",
    "RequestDelta",
    "RequestOutput",
    "SampleDelta",
    "SamplingParams",
    "ScheduledBatch",
    "TokenLogprob",
]
