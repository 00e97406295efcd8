"""Errors the serving layer raises on purpose. Each carries the wire ``code`` the transport sends."""

from __future__ import annotations

from mini_vllm.engine.errors import MiniVllmError


class ServiceError(MiniVllmError):
    """A request the service cannot take or finish; ``code`` is the protocol's error code."""

    code = "internal"


class UnknownModel(ServiceError):
    code = "unknown_model"


class ModelRequired(ServiceError):
    """Several models are served and the request named none."""

    code = "missing_field"


class Overloaded(ServiceError):
    """The model's bounded queue is full: the caller should retry later."""

    code = "overloaded"


class DuplicateRequest(ServiceError):
    code = "duplicate_id"


class ShuttingDown(ServiceError):
    code = "shutting_down"
