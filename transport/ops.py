"""The server's own HTTP routes: the browser page at ``/``, ``/health`` and ``/version``.

All of them are public (no API key): the page is static and holds no data (and a browser cannot
send a header when it navigates to it; the page sends the key on its WebSocket), ``/health`` is
what load balancers and orchestrators probe, ``/version`` says which build answers.

The page's files are package data: ``pyproject.toml`` installs ``examples/browser/`` as
``mini_vllm/browser/``, so one copy lives in git and the same files open from ``file://`` in a
checkout. Served over HTTP, the page connects to its own origin, which the server allows
without ``--allowed-origins``.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from importlib.resources.abc import Traversable
from pathlib import Path

import attrs

from mini_vllm.actors.service import Service
from mini_vllm.transport.http import HttpRequest, HttpResponder, Route, Routes, send_json

PUBLIC_PATHS = frozenset({"/health", "/version", "/metrics"})  # beside the page's files
PAGE_PACKAGE = "mini_vllm.browser"
_SOURCE_PAGE = Path(__file__).resolve().parent.parent / "examples" / "browser"  # a checkout's copy
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_NO_STORE = (("Cache-Control", "no-store"),)
# The page needs its own scripts and styles and WebSocket connections (to its own server, or to
# the one its ?server= names); nothing else, and no other site may frame it.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@attrs.frozen
class PageFile:
    path: str  # where it is served: "/" for index.html, "/app.js", ...
    content_type: str
    body: bytes = attrs.field(repr=False)


def page_directory() -> Traversable | None:
    """The installed page (package data), else a checkout's ``examples/browser``, else None."""
    try:
        installed = importlib.resources.files(PAGE_PACKAGE)
        if installed.joinpath("index.html").is_file():
            return installed
    except ModuleNotFoundError:  # a checkout, or an editable install made before the page was data
        pass
    return _SOURCE_PAGE if (_SOURCE_PAGE / "index.html").is_file() else None


def page_files(directory: Traversable | None = None) -> tuple[PageFile, ...]:
    """The page's files (read once, at start), or () when the page is not installed."""
    directory = directory if directory is not None else page_directory()
    if directory is None:
        return ()
    files = []
    for item in sorted(directory.iterdir(), key=lambda x: x.name):
        suffix = Path(item.name).suffix
        if not item.is_file() or suffix not in _CONTENT_TYPES:
            continue
        path = "/" if item.name == "index.html" else f"/{item.name}"
        files.append(PageFile(path, _CONTENT_TYPES[suffix], item.read_bytes()))
    return tuple(files)


def public_paths(page: tuple[PageFile, ...]) -> frozenset[str]:
    """The paths served without an API key: the page's files, /health, /version and /metrics."""
    return PUBLIC_PATHS | {f.path for f in page}


def ops_routes(service: Service, stopping: Callable[[], str | None], page: tuple[PageFile, ...] = ()) -> Routes:
    """``GET /`` (and the page's other files), ``GET /health``, ``GET /version``.
    ``stopping()`` is why the server is shutting down, or None while it serves."""
    routes: Routes = {("GET", "/health"): health_route(service, stopping), ("GET", "/version"): version_route()}
    for f in page:
        routes["GET", f.path] = _file_route(f)
    return routes


def health_route(service: Service, stopping: Callable[[], str | None]) -> Route:
    """200 ``{"status": "ok"}`` while every model can serve; else 503 with the reason."""

    async def health(request: HttpRequest, responder: HttpResponder) -> None:
        reason = health_problem(service, stopping())
        if reason is None:
            await send_json(responder, 200, {"status": "ok"}, _NO_STORE)
        else:
            await send_json(responder, 503, {"status": "unavailable", "reason": reason}, _NO_STORE)

    return health


def health_problem(service: Service, stopping: str | None) -> str | None:
    """Why the server cannot serve every model now, or None."""
    if stopping is not None:
        return f"the server is shutting down: {stopping}"
    down = [m.name for m in service.models() if not m.available]
    if not down:
        return None
    return "; ".join(f"model {name!r} cannot serve: its engine core has exited" for name in down)


def version_route() -> Route:
    from mini_vllm import __version__

    async def version(request: HttpRequest, responder: HttpResponder) -> None:
        await send_json(responder, 200, {"version": __version__})

    return version


def _file_route(page_file: PageFile) -> Route:
    headers: tuple[tuple[str, str], ...] = (("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff"))
    if page_file.content_type.startswith("text/html"):
        headers += (("Content-Security-Policy", _PAGE_POLICY), ("Referrer-Policy", "no-referrer"))

    async def serve_file(request: HttpRequest, responder: HttpResponder) -> None:
        await responder.send(200, page_file.body, page_file.content_type, headers)

    return serve_file


__all__ = [
    "PAGE_PACKAGE",
    "PUBLIC_PATHS",
    "PageFile",
    "health_problem",
    "health_route",
    "ops_routes",
    "page_directory",
    "page_files",
    "public_paths",
    "version_route",
]
