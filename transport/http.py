"""What an HTTP route sees: one parsed request, one responder, and OpenAI-shaped errors.

The front door (``transport/front_door.py``) parses HTTP/1.1 with h11 on the server's one port,
hands WebSocket upgrades to trio-websocket and calls a ``Route`` for everything else. Routes
(``openai_api``, ``metrics``, the server's own ``/``, ``/health``, ``/version``) know nothing of h11:
they read an ``HttpRequest`` and answer through an ``HttpResponder``, either one whole body or a
chunked stream (Server-Sent Events). A route that raises ``HttpError`` before it has started a
response gets that status with an OpenAI-shaped JSON body; the front door also uses ``error_body``
for its own refusals (malformed HTTP, 404, 405, 413, 401), so every JSON error looks alike.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import attrs

Headers = Sequence[tuple[str, str]]


@attrs.frozen
class HttpRequest:
    method: str  # upper case: "GET", "POST", ...
    path: str  # percent-decoded, without the query: "/v1/completions"
    query: str  # the raw query string after "?", or ""
    headers: tuple[tuple[str, str], ...]  # names lower case, values decoded as latin-1, in order
    body: bytes  # the whole body (the front door bounds its size before a route runs)
    client: str  # the fair-share key of the client (remote address, or a connection id), "" if none

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


class HttpResponder(Protocol):
    """One response to one request. Either ``send`` once, or ``start_stream`` then ``write``s and
    ``end_stream``. Writes raise ``trio.BrokenResourceError`` once the client is gone; the front
    door also cancels the route's task when the client closes its connection, so a route that
    iterates a ``Generation`` aborts it (and frees its KV blocks) without doing anything itself."""

    @property
    def started(self) -> bool:
        """Whether a response (whole or streamed) has begun: after that, errors go in-band."""
        ...

    async def send(self, status: int, body: bytes, content_type: str, headers: Headers = ()) -> None: ...

    async def start_stream(self, status: int, content_type: str, headers: Headers = ()) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def end_stream(self) -> None: ...


Route = Callable[[HttpRequest, HttpResponder], Awaitable[None]]
Routes = dict[tuple[str, str], Route]  # (method, path) -> route


class HttpError(Exception):
    """Raised by a route to answer ``status`` with an OpenAI-shaped error body.

    ``type`` is OpenAI's error class (``invalid_request_error``, ``authentication_error``,
    ``not_found_error``, ``rate_limit_error``, ``server_error``, ...); ``code`` is the stable
    machine-readable code, the same names as the WebSocket protocol's error codes where one fits."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
        headers: Headers = (), param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = tuple(headers)
        self.param = param


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}``: OpenAI's (and vLLM's) error shape."""
    error = {"message": message, "type": type, "param": param, "code": code}
    return json.dumps({"error": error}, ensure_ascii=False).encode()


async def send_json(responder: HttpResponder, status: int, value: object, headers: Headers = ()) -> None:
    body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    await responder.send(status, body, "application/json", headers)


async def send_error(responder: HttpResponder, error: HttpError) -> None:
    await responder.send(
        error.status, error_body(error.message, error.type, error.code, error.param), "application/json", error.headers
    )


class Admission(Protocol):
    """A per-client fair share of each model's queue (the server's ``ClientShares``): a route asks
    ``refusal`` before it starts a request, ``take``s a place, and ``give_back``s it at the end."""

    def refusal(self, client: str, model: str) -> str | None: ...

    def take(self, client: str, model: str) -> None: ...

    def give_back(self, client: str, model: str) -> None: ...


__all__ = [
    "Admission",
    "Headers",
    "HttpError",
    "HttpRequest",
    "HttpResponder",
    "Route",
    "Routes",
    "error_body",
    "send_error",
    "send_json",
]
