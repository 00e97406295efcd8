"""The engine core's process: ``python -m mini_vllm.actors.core_process FD PARENT_PID``, started by
``core.spawn_core`` with one end of a socket pair as file descriptor FD."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Sequence

import trio

from mini_vllm.actors.core import CoreStart, run_core
from mini_vllm.actors.link import SocketLink
from mini_vllm.engine.parent_watch import die_with_parent


async def _core_main(fd: int) -> None:
    link = SocketLink(trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd))))
    start = await link.receive()
    if not isinstance(start, CoreStart):
        raise SystemExit(f"mini-vllm engine core: expected CoreStart, got {type(start).__name__}")
    await run_core(link, start, own_process=True)


def main(argv: Sequence[str]) -> int:
    fd, parent = int(argv[0]), int(argv[1])
    die_with_parent(parent, "mini-vllm-core-parent-watch")  # the frontend is gone: so are we
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when the core stops
    logging.basicConfig(level=logging.WARNING, format="mini-vllm core: %(levelname)s %(message)s")
    trio.run(_core_main, fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
