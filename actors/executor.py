"""The executor: one dedicated OS thread per model that runs the model steps.

A long-lived thread (not trio's thread cache) so that the model runner, its CUDA streams and any
thread-local device state always live on the same thread. The scheduler hands it one job at a
time and awaits the result; the event loop keeps serving its other tasks meanwhile (a wait for
the device releases the interpreter lock; a launch mostly holds it).

An engine core in a process of its own runs the jobs inline instead (``inline=True``): there the
loop has only the link to serve, and a second thread's launches and the loop's messages would
take turns on the interpreter lock, which cost a third of the throughput under load.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import outcome
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")


@attrs.frozen
class ExecutorStats:
    name: str
    alive: bool
    jobs: int
    busy_seconds: float  # wall time spent inside jobs
    last_job_seconds: float
    running: bool  # a job is in the thread right now


@attrs.frozen
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    token: trio.lowlevel.TrioToken
    report: Callable[[outcome.Outcome[Any]], None]


class ExecutorThread:
    """Runs ``fn(*args)`` jobs one at a time on its own thread; ``await run(...)`` gets the result.

    ``inline=True`` runs each job on the calling (trio) thread instead, then yields once: for an
    engine core in a process of its own, whose event loop has no clients to keep answering while
    the device works, a second thread only adds interpreter-lock contention with the launches.
    """

    def __init__(self, name: str, inline: bool = False, stop_timeout: float = 10.0) -> None:
        self.name = name
        self.inline = inline
        # A cancelled caller waits this long for its job to end, and ``aclose`` for the thread: a
        # wedged step is then abandoned (a daemon thread), so that no shutdown waits forever.
        self.stop_timeout = stop_timeout
        self._closed = False
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=f"mini-vllm-executor[{name}]", daemon=True)
        self._count = 0
        self._busy = 0.0
        self._last = 0.0
        self._running = False

    def start(self) -> None:
        if not self.inline:
            self._thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one job in the thread. A model step cannot be interrupted halfway, so cancellation
        takes effect when the job ends (as with ``trio.to_thread.run_sync``), or after
        ``stop_timeout`` if it does not (the job is then abandoned, its result lost)."""
        if self.inline:
            return await self._run_inline(fn, *args)
        if not self._thread.is_alive():
            raise RuntimeError(f"executor thread {self.name!r} is not running")
        # The wait below is shielded, so this is where a cancelled caller stops (e.g. the loop that
        # submits step after step would otherwise never see its cancellation).
        await trio.lowlevel.checkpoint_if_cancelled()
        done = trio.Event()
        box: list[outcome.Outcome[T]] = []

        def report(result: outcome.Outcome[T]) -> None:  # runs on the trio thread
            box.append(result)
            done.set()

        self._running = True
        started = time.perf_counter()
        self._jobs.put(_Job(fn, args, trio.lowlevel.current_trio_token(), report))
        try:
            try:
                await done.wait()
            except trio.Cancelled:
                with trio.move_on_after(self.stop_timeout, shield=True):
                    await done.wait()
                if not done.is_set():
                    log.error("executor %r: a job has run %.0f s past its cancellation: abandoning it",
                              self.name, self.stop_timeout)
                raise
        finally:
            self._running = False
            self._last = time.perf_counter() - started
            self._busy += self._last
            self._count += 1
        # pop: a raised error's traceback points at this frame, which must not keep the outcome alive
        return box.pop().unwrap()

    async def _run_inline(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError(f"executor {self.name!r} is closed")
        # The loop's other tasks run now, before the job holds the thread: the flusher sends the
        # tokens landed since the last job (else they would wait for this one, a step later) and
        # the link's reader takes what arrived. Twice: trio runs a batch of ready tasks in either
        # order, so after one yield this task may come first and hold the thread again before the
        # flusher has had its turn; after two, every task woken before the first has had one.
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        self._running = True
        started = time.perf_counter()
        try:
            result = fn(*args)
        finally:
            self._running = False
            self._last = time.perf_counter() - started
            self._busy += self._last
            self._count += 1
        return result

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            result = outcome.capture(job.fn, *job.args)
            try:
                job.token.run_sync_soon(job.report, result)
            except trio.RunFinishedError:  # the trio run ended while we worked: nobody to tell
                pass

    async def aclose(self) -> None:
        """Stop the thread after its current job; waits for it (at most ``stop_timeout``, then
        leaves the daemon thread behind) without blocking the event loop."""
        self._closed = True
        self._jobs.put(None)
        if self._thread.is_alive():
            await trio.to_thread.run_sync(self._thread.join, self.stop_timeout)
            if self._thread.is_alive():
                log.error("executor %r: its thread did not stop within %.0f s: leaving it behind",
                          self.name, self.stop_timeout)

    def statistics(self) -> ExecutorStats:
        return ExecutorStats(
            name=self.name,
            alive=not self._closed if self.inline else self._thread.is_alive(),
            jobs=self._count,
            busy_seconds=self._busy,
            last_job_seconds=self._last,
            running=self._running,
        )
