"""Child processes that must not outlive their parent: the engine core, tensor-parallel workers."""

from __future__ import annotations

import os
import threading
import time

PARENT_POLL = 0.2  # seconds between looks at the parent: how long an orphan lives at most


def die_with_parent(parent: int, name: str) -> None:
    """Exit this process as soon as ``parent`` is gone, even while it is busy (loading a model,
    inside a collective). A watching thread (``name``) rather than PR_SET_PDEATHSIG: that signal
    follows the *thread* that started us (trio starts processes from a worker thread that exits
    when idle)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        os._exit(1)

    threading.Thread(target=watch, name=name, daemon=True).start()
