"""mini-vllm: a small LLM inference server on trio.

The public API, importable from the top as vLLM's is::

    from mini_vllm import LLM, SamplingParams             # offline, batched
    from mini_vllm import EngineArgs, open_service        # embedded in a trio program, streaming
    from mini_vllm import connect                         # the async client of a running server

Installed, the project is this one package: ``mini_vllm.engine`` (the synchronous core, no trio),
``mini_vllm.actors`` (the trio shell), ``mini_vllm.transport`` (WebSocket server, protocol,
client), ``mini_vllm.bench`` (the benchmarks) and ``mini_vllm.cli`` (the ``mini-vllm`` command).
In the source tree those are the top-level folders ``engine/``, ``actors/``, ``transport/`` and
``bench/`` (``pyproject.toml`` maps them). Names load on first use, so ``import mini_vllm`` alone
does not pay for torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mini_vllm.actors import Service, ServiceConfig, open_service
    from mini_vllm.engine import (
        LLM,
        CompletionOutput,
        ConfigError,
        EngineArgs,
        InvalidRequest,
        LLMEngine,
        MiniVllmError,
        RequestOutput,
        SamplingParams,
    )
    from mini_vllm.transport.client import Client, ClientError, connect

try:
    __version__ = version("mini-vllm")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# name -> the module that defines it (read by __getattr__ below; never written)
_EXPORTS = {
    "LLM": "mini_vllm.engine",
    "SamplingParams": "mini_vllm.engine",
    "EngineArgs": "mini_vllm.engine",
    "LLMEngine": "mini_vllm.engine",
    "RequestOutput": "mini_vllm.engine",
    "CompletionOutput": "mini_vllm.engine",
    "MiniVllmError": "mini_vllm.engine",
    "ConfigError": "mini_vllm.engine",
    "InvalidRequest": "mini_vllm.engine",
    "open_service": "mini_vllm.actors",
    "Service": "mini_vllm.actors",
    "ServiceConfig": "mini_vllm.actors",
    "Client": "mini_vllm.transport.client",
    "ClientError": "mini_vllm.transport.client",
    "connect": "mini_vllm.transport.client",
}

__all__ = [
    "LLM",
    "Client",
    "ClientError",
    "CompletionOutput",
    "ConfigError",
    "EngineArgs",
    "InvalidRequest",
    "LLMEngine",
    "MiniVllmError",
    "RequestOutput",
    "SamplingParams",
    "Service",
    "ServiceConfig",
    "__version__",
    "connect",
    "open_service",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mini_vllm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
