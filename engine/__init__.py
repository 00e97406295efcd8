"""mini-vllm's compute core: models, paged KV cache, block manager, scheduler, sampler.

Synchronous and free of trio; ``actors`` wraps it for serving. Start at ``LLM`` (offline) or
``LLMEngine`` (step by step).
"""

from engine.config import EngineArgs, ModelConfig
from engine.errors import ConfigError, InvalidRequest, MiniVllmError, ModelLoadError
from engine.llm import LLM
from engine.llm_engine import EngineStats, LLMEngine, ScheduledBatch
from engine.outputs import CompletionOutput, RequestDelta, RequestOutput, SampleDelta, TokenLogprob
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "ConfigError",
    "EngineArgs",
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
