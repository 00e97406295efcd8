"""Tensor-parallel ranks 1..N-1: ``python -m mini_vllm.engine.tp_worker RANK SIZE PORT PARENT_PID``.

Rank 0 (the process with the ``LLMEngine``) starts one per extra rank when the engine loads
(``WorkerPool.start``) and writes to each one's stdin, pickled: a ``WorkerSetup`` first, then each
step's ``StepInputs``, once per step. A worker builds its shard with the same ``load_rank`` as
rank 0 (so every collective pairs up), then launches each step it reads. It ends at EOF on stdin
(rank 0 closed it, or died), when its parent is gone, or on any error (reported to rank 0 through
the rendezvous store, then the process exits, which ends rank 0's wait in a collective).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import IO, Any

import attrs
import torch

from mini_vllm.engine.config import EngineArgs
from mini_vllm.engine.errors import ModelLoadError
from mini_vllm.engine.loader import ModelSource
from mini_vllm.engine.model_runner import ModelRunner, StepInputs
from mini_vllm.engine.parallel import (
    COLLECTIVE_TIMEOUT,
    RankFailed,
    TensorParallel,
    join_group,
    leave_group,
    open_store,
)
from mini_vllm.engine.parent_watch import die_with_parent

_JOIN_POLL = 0.01  # seconds between looks at the store while the workers start
_STOP_GRACE = 10.0  # seconds a worker gets to free its device and exit after EOF, before it is killed
_DEATH_GRACE = 2.0  # after a failed collective: how long to wait for the rank that caused it to exit

log = logging.getLogger(__name__)


@attrs.frozen
class WorkerSetup:
    """What a worker needs to build the same engine's shard as rank 0."""

    args: EngineArgs
    source: ModelSource
    max_model_len: int
    device: str  # rank 0's device; rank r takes the r-th one after it on a GPU


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: the CPU for every rank, else the GPU ``rank`` places after rank 0's."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def _joined_key(rank: int) -> str:
    return f"mini-vllm/joined/{rank}"


def _error_key(rank: int) -> str:
    return f"mini-vllm/error/{rank}"


class WorkerPool:
    """Rank 0's handle on the worker processes: start them, send each step, stop them."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], store: Any, tp: TensorParallel) -> None:
        self.procs = procs  # procs[i] is rank i + 1
        self.store = store
        self.tp = tp
        self._lock = threading.Lock()  # stop() may come from close() and from a finalizer
        self._stopped = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @classmethod
    def start(cls, args: EngineArgs, source: ModelSource, max_model_len: int, device: torch.device) -> WorkerPool:
        """Start ranks 1..N-1, wait until every one has joined, and join as rank 0."""
        size = args.tensor_parallel_size
        store = open_store(0, 0, size)  # port 0: the OS picks a free one, with no race
        setup = pickle.dumps(WorkerSetup(args, source, max_model_len, str(device)), protocol=pickle.HIGHEST_PROTOCOL)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank in range(1, size):
                cmd = [sys.executable, "-m", "mini_vllm.engine.tp_worker", str(rank), str(size), str(store.port),
                       str(os.getpid())]
                procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL))
            for proc in procs:
                _stdin(proc).write(setup)
                _stdin(proc).flush()
            _wait_joined(store, procs)
            tp = join_group(store, 0, size, device)
        except BaseException:
            _end_processes(procs, grace=0.0)
            raise
        return cls(procs, store, tp)

    def send(self, inputs: StepInputs) -> None:
        """This step's inputs to every worker (they never sample: no sampling rows)."""
        data = pickle.dumps(attrs.evolve(inputs, sampling_rows=[]), protocol=pickle.HIGHEST_PROTOCOL)
        for proc in self.procs:
            stream = _stdin(proc)
            stream.write(data)
            stream.flush()

    def failure(self, exc: BaseException, during: str) -> RankFailed:
        """The error to raise after a collective (or a send) failed during ``during``: it names the
        rank that died, if one did. Every worker is stopped."""
        dead = self._wait_for_a_death(_DEATH_GRACE)
        if dead is not None:
            rank, code = dead
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            detail = self._reported_error(rank)
            message = f"tensor-parallel rank {rank} (pid {self.procs[rank - 1].pid}) {how} during {during}"
            message += f" ({detail})" if detail else ""
        else:
            message = f"tensor-parallel rank 0 failed during {during} ({type(exc).__name__}: {exc})"
        self.stop(kill=True)
        return RankFailed(f"{message}; every rank is stopped and the engine is closed: build a new one")

    def stop(self, kill: bool = False) -> None:
        """End every worker (EOF on its stdin; killed after a grace period, at once with ``kill``)
        and leave the group; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        _end_processes(self.procs, grace=0.0 if kill else _STOP_GRACE)
        leave_group(self.tp.group)

    def _wait_for_a_death(self, timeout: float) -> tuple[int, int] | None:
        """The dead rank to blame, as (rank, exit code). When one dies the others fail too (their
        collectives lose a peer) and may be gone by the time we look, so prefer a rank killed by a
        signal, then one that reported no error of its own, then the lowest."""
        deadline = time.monotonic() + timeout
        while True:
            dead = [(rank, code) for rank, proc in enumerate(self.procs, start=1) if (code := proc.poll()) is not None]
            if dead:
                return min(dead, key=lambda d: (d[1] >= 0, self._reported_error(d[0]) is not None, d[0]))
            if time.monotonic() >= deadline:
                return None
            time.sleep(_JOIN_POLL)

    def _reported_error(self, rank: int) -> str | None:
        try:
            if self.store.check([_error_key(rank)]):
                return bytes(self.store.get(_error_key(rank))).decode(errors="replace")
        except RuntimeError:  # the store is unusable too: the exit code is all we know
            pass
        return None


def _stdin(proc: subprocess.Popen[bytes]) -> IO[bytes]:
    if proc.stdin is None:
        raise RuntimeError(f"tensor-parallel worker pid {proc.pid} has no stdin pipe")
    return proc.stdin


def _wait_joined(store: Any, procs: list[subprocess.Popen[bytes]]) -> None:
    """Wait for every worker to reach the rendezvous, failing at once if one exits first (its load
    error, if it reported one, in the message) rather than after the rendezvous timeout."""
    keys = [_joined_key(rank) for rank in range(1, len(procs) + 1)]
    deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
    while not store.check(keys):
        for rank, proc in enumerate(procs, start=1):
            code = proc.poll()
            if code is not None:
                detail = ""
                if store.check([_error_key(rank)]):
                    detail = f": {bytes(store.get(_error_key(rank))).decode(errors='replace')}"
                raise ModelLoadError(f"tensor-parallel rank {rank} exited with code {code} while starting{detail}")
        if time.monotonic() >= deadline:
            raise ModelLoadError(
                f"tensor-parallel workers did not start within {COLLECTIVE_TIMEOUT.total_seconds():.0f} s"
            )
        time.sleep(_JOIN_POLL)


def _end_processes(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """EOF to each, ``grace`` seconds to exit on its own, then SIGKILL; always reaped."""
    for proc in procs:
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:  # a dead worker's pipe: nothing to flush
            pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("tensor-parallel worker pid %d did not exit in %.0f s: killing it", proc.pid, grace)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ---- the worker process ---------------------------------------------------------------------------
def serve_steps(runner: ModelRunner, stream: IO[bytes]) -> None:
    """Launch every step rank 0 sends, until EOF. The sampled ids arrive by broadcast inside
    ``launch``; a worker never reads its output back."""
    while True:
        try:
            inputs = pickle.load(stream)
        except EOFError:
            return
        if not isinstance(inputs, StepInputs):
            raise TypeError(f"expected StepInputs from rank 0, got {type(inputs).__name__}")
        runner.launch(inputs)


def run_worker(rank: int, size: int, port: int, stream: IO[bytes]) -> None:
    from mini_vllm.engine.llm_engine import load_rank  # the engine module imports this one

    store = open_store(port, rank, size)
    try:
        setup = pickle.load(stream)
        if not isinstance(setup, WorkerSetup):
            raise TypeError(f"expected WorkerSetup from rank 0, got {type(setup).__name__}")
        device = rank_device(torch.device(setup.device), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # the ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        store.set(_joined_key(rank), "1")
        tp = join_group(store, rank, size, device)
        args = setup.args
        runner, _, _ = load_rank(args, setup.source, setup.max_model_len, device, args.resolved_dtype(device), tp)
        serve_steps(runner, stream)
        runner.close()
    except BaseException as exc:
        try:  # rank 0 names this in its error; best effort, the store may be gone with rank 0
            store.set(_error_key(rank), f"{type(exc).__name__}: {exc}")
        except RuntimeError:
            pass
        raise
    finally:
        leave_group()


def main(argv: Sequence[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m mini_vllm.engine.tp_worker RANK SIZE PORT PARENT_PID", file=sys.stderr)
        return 2
    rank, size, port, parent = (int(a) for a in argv)
    die_with_parent(parent, "mini-vllm-tp-parent-watch")  # rank 0 is gone, even mid-collective
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the workers stop
    try:
        run_worker(rank, size, port, sys.stdin.buffer)
    except Exception:
        traceback.print_exc()
        print(f"mini-vllm tensor-parallel rank {rank}: failed (above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as the importable module, not as __main__: the pickled WorkerSetup names its class there.
    from mini_vllm.engine import tp_worker

    code = tp_worker.main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The work is done and the group left: skip the interpreter's teardown, whose C++ destructors
    # (torch.distributed's store and gloo threads) once aborted a worker that had ended cleanly
    # ("terminate called without an active exception"), turning exit code 0 into SIGABRT.
    os._exit(code)
