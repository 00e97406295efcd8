"""The engine core's process: ``python -m mini_vllm.actors.core_process FD PARENT_PID``, started by
``core.spawn_core`` with one end of a socket pair as file descriptor FD."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

import trio

from mini_vllm.actors.core import CoreStart, run_core
from mini_vllm.actors.link import SocketLink

_PARENT_POLL = 0.2  # seconds between looks at our parent: how long an orphaned core lives at most


def _die_with_parent(parent: int) -> None:
    """Exit as soon as the frontend is gone, even while a model loads (when no task reads the
    socket). A watching thread rather than PR_SET_PDEATHSIG: that signal follows the *thread* that
    started us, and trio starts processes from a worker thread that exits when idle."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL)
        os._exit(1)

    threading.Thread(target=watch, name="mini-vllm-core-parent-watch", daemon=True).start()


async def _core_main(fd: int) -> None:
    link = SocketLink(trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd))))
    start = await link.receive()
    if not isinstance(start, CoreStart):
        raise SystemExit(f"mini-vllm engine core: expected CoreStart, got {type(start).__name__}")
    await run_core(link, start)


def main(argv: Sequence[str]) -> int:
    fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when the core stops
    logging.basicConfig(level=logging.WARNING, format="mini-vllm core: %(levelname)s %(message)s")
    trio.run(_core_main, fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
