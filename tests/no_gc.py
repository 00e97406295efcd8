"""``with no_gc():`` runs a block with the cyclic garbage collector off, so that what it frees is
freed by reference counting alone (the lifecycle tests, CPU and GPU)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    gc.collect()  # earlier tests' garbage is not this test's business
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
