"""A nursery for background tasks that live exactly as long as a ``with`` body.

Trio (strict exception groups) wraps an exception raised in a nursery's body in an
``ExceptionGroup``; for a context manager that runs helpers around the caller's code that would
turn every ``InvalidRequest`` the caller raises into a group. Here the body's exception comes out
as itself, and the helpers are cancelled when the body ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


@contextlib.asynccontextmanager
async def open_task_group() -> AsyncIterator[trio.Nursery]:
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            yield nursery
        except BaseException as exc:  # re-raised below, after the helpers have stopped
            body_error = exc
        nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
