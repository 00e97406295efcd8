"""The errors the engine raises on purpose. Each names the problem in words a user can act on."""

from __future__ import annotations


class MiniVllmError(Exception):
    """Base of every error mini-vllm raises deliberately."""


class ConfigError(MiniVllmError, ValueError):
    """A bad engine argument or sampling parameter (names the field and the allowed range)."""


class InvalidRequest(MiniVllmError, ValueError):
    """A request the engine cannot serve: empty prompt, too long for the model, bad token ids."""


class ModelLoadError(MiniVllmError):
    """A model that cannot be loaded: missing file, corrupt weights, unsupported architecture."""


class EngineClosed(MiniVllmError, RuntimeError):
    """The engine (or the ``LLM`` over it) was closed: its weights and KV cache are gone."""
