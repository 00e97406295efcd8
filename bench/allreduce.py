"""The collectives a tensor-parallel step pays, measured on this machine for the physical floor.

A forward split over N GPUs all-reduces its [tokens, hidden] activations twice per layer (after
o_proj and after down_proj) and gathers the logits' vocabulary shards. ``measure_collectives``
starts N processes (one per GPU under NCCL, or N CPU processes under gloo), times both collectives
at the sizes a step uses, and returns the median time of each size as
``CollectiveCost`` functions of bytes for ``physical_floor`` (engine/workloads.py).

On a GPU the timed ops are queued behind a device-side sleep, so CUDA events time the GPU's work
alone and not the host's launches (in the engine they run inside CUDA graphs).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from mini_vllm.bench.command import fail
from mini_vllm.engine.config import ModelConfig
from mini_vllm.engine.parallel import MULTICAST_OFF
from mini_vllm.engine.workloads import CollectiveCost, ParallelCost
from mini_vllm.transport.flags import EXIT_ERROR

# A step's token counts, 1 .. 8192 (the default --max-num-batched-tokens): what the all-reduces carry.
ALL_REDUCE_TOKENS = tuple(2**i for i in range(14))
# Rows of logits a step samples, 1 .. 1024 (at most one per running sequence): what the gather carries.
ALL_GATHER_ROWS = tuple(2**i for i in range(11))
DEFAULT_TIMEOUT_S = 600.0
SLEEP_CYCLES = 20_000_000  # about 10 ms at 2 GHz: longer than queueing the timed ops takes the host


class CollectiveError(Exception):
    """The measurement could not run (too few GPUs, a worker failed or hung), in one line."""


@attrs.frozen
class CollectivePoint:
    """One measured size: ``rows`` (tokens, or sampled rows of logits), ``bytes`` in the whole
    tensor (summed, or gathered from every rank), the median ``seconds``."""

    rows: int
    bytes: int
    seconds: float


@attrs.frozen
class CollectiveMeasurement:
    """Both collectives at every measured size, on ``world_size`` ranks over ``backend``."""

    world_size: int
    backend: str
    dtype: str
    repeats: int
    inner: int
    all_reduce: tuple[CollectivePoint, ...]
    all_gather: tuple[CollectivePoint, ...]

    def tensor_parallel(self) -> ParallelCost:
        """The floor's view: each collective's seconds as a function of bytes."""
        return ParallelCost(
            self.world_size,
            CollectiveCost([(p.bytes, p.seconds) for p in self.all_reduce]),
            CollectiveCost([(p.bytes, p.seconds) for p in self.all_gather]),
        )

    def to_json(self) -> dict[str, Any]:
        def points(ps: tuple[CollectivePoint, ...]) -> list[dict[str, Any]]:
            return [{"rows": p.rows, "bytes": p.bytes, "us": round(p.seconds * 1e6, 3)} for p in ps]

        return {
            "world_size": self.world_size, "backend": self.backend, "dtype": self.dtype,
            "repeats": self.repeats, "ops_per_repeat": self.inner,
            # Median over repeats of the time per op, as the rank that started last saw it.
            "all_reduce_tokens_x_hidden": points(self.all_reduce),
            "all_gather_rows_x_vocab": points(self.all_gather),
        }


@attrs.frozen
class _Plan:
    """What every worker times (picklable: it crosses into the spawned processes)."""

    world_size: int
    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    hidden_size: int
    vocab_size: int
    all_reduce_tokens: tuple[int, ...]
    all_gather_rows: tuple[int, ...]
    repeats: int
    inner: int
    warmup: int
    store_path: str


def measure_collectives(
    world_size: int,
    hidden_size: int,
    vocab_size: int,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    all_reduce_tokens: Sequence[int] = ALL_REDUCE_TOKENS,
    all_gather_rows: Sequence[int] = ALL_GATHER_ROWS,
    repeats: int = 10,
    inner: int = 20,
    warmup: int = 3,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> CollectiveMeasurement:
    """Time all-reduce of [tokens, hidden_size] and all-gather of [rows, vocab_size] (each rank
    holding its vocabulary shard) across ``world_size`` processes: NCCL on GPUs 0..N-1 with
    ``device="cuda"`` (the default where CUDA is), gloo on the CPU otherwise. Each size: ``warmup``
    ops, then ``repeats`` times ``inner`` ops back to back; the time per op is the least over the
    ranks (the rank that started last, which did not wait for the others), and the result is its
    median over the repeats."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_plan_inputs(world_size, hidden_size, vocab_size, device, all_reduce_tokens, all_gather_rows,
                       repeats, inner, warmup, timeout_s)
    with tempfile.TemporaryDirectory(prefix="mini-vllm-collectives-") as tmp:
        plan = _Plan(world_size, device, dtype, hidden_size, vocab_size, tuple(sorted(set(all_reduce_tokens))),
                     tuple(sorted(set(all_gather_rows))), repeats, inner, warmup, str(Path(tmp) / "store"))
        reduce_s, gather_s = _run_workers(plan, timeout_s)
    width = torch.empty((), dtype=dtype).element_size()
    shard = -(-vocab_size // world_size)
    return CollectiveMeasurement(
        world_size, "nccl" if device == "cuda" else "gloo", str(dtype).removeprefix("torch."), repeats, inner,
        tuple(CollectivePoint(t, t * hidden_size * width, s) for t, s in zip(plan.all_reduce_tokens, reduce_s,
                                                                              strict=True)),
        tuple(CollectivePoint(r, r * shard * world_size * width, s) for r, s in zip(plan.all_gather_rows, gather_s,
                                                                                     strict=True)),
    )


def measure_tensor_parallel(
    command: str, config: ModelConfig | None, tensor_parallel_size: int
) -> tuple[dict[str, Any], ParallelCost] | int:
    """The collectives over the N GPUs, for the record and the floor; or the exit status after
    printing why not (before any model is loaded: the workers need the GPUs' memory for a moment)."""
    if config is None:
        return fail(command, "--tensor-parallel-size: the model's shapes are needed to measure its all-reduces, "
                             "and its config.json could not be read", EXIT_ERROR)
    print(f"measuring all-reduce and logits gather over {tensor_parallel_size} GPUs ...", file=sys.stderr, flush=True)
    try:
        measured = measure_collectives(tensor_parallel_size, config.hidden_size, config.vocab_size)
    except CollectiveError as exc:
        return fail(command, f"measuring the collectives over {tensor_parallel_size} GPUs: {exc}", EXIT_ERROR)
    return measured.to_json(), measured.tensor_parallel()


def collectives_line(collectives: dict[str, Any]) -> str:
    """The measured all-reduce at a decode step's and a full step's sizes, for the tables."""
    points = collectives["all_reduce_tokens_x_hidden"]
    small, large = points[0], points[-1]
    return (f"{collectives['backend']} over {collectives['world_size']} ranks: {small['us']:.1f} µs at "
            f"{small['rows']} token, {large['us']:.1f} µs at {large['rows']:,} tokens (x hidden, "
            f"{collectives['dtype']})")


def _check_plan_inputs(
    world_size: int, hidden_size: int, vocab_size: int, device: str, all_reduce_tokens: Sequence[int],
    all_gather_rows: Sequence[int], repeats: int, inner: int, warmup: int, timeout_s: float,
) -> None:
    if world_size < 2:
        raise ValueError(f"world_size must be at least 2 (one rank has nothing to exchange), got {world_size}")
    for name, value in (("hidden_size", hidden_size), ("vocab_size", vocab_size), ("repeats", repeats),
                        ("inner", inner)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be at least 0, got {warmup}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    for name, sizes in (("all_reduce_tokens", all_reduce_tokens), ("all_gather_rows", all_gather_rows)):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"{name} must be a non-empty list of counts >= 1, got {list(sizes)}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise CollectiveError("device cuda was asked for, and this machine has no CUDA GPU")
        if torch.cuda.device_count() < world_size:
            raise CollectiveError(f"{world_size} ranks need {world_size} GPUs, and this machine has "
                                  f"{torch.cuda.device_count()}")


def _run_workers(plan: _Plan, timeout_s: float) -> tuple[list[float], list[float]]:
    """Start the ranks, wait for rank 0's result (or the first failure), and leave no process behind."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per rank: no CUDA state forked
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(rank, plan, results), daemon=True,
                         name=f"mini-vllm-collectives-{rank}") for rank in range(plan.world_size)]
    try:
        for proc in procs:
            proc.start()
        return _await_result(procs, results, timeout_s)
    finally:
        for proc in (p for p in procs if p.pid is not None):  # a failed start leaves the rest unstarted
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)
            if proc.is_alive():  # ignored SIGTERM (stuck in a collective): no orphan left
                proc.kill()
                proc.join()


def _await_result(procs: list[Any], results: Any, timeout_s: float) -> tuple[list[float], list[float]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            kind, payload = results.get(timeout=0.2)
        except queue.Empty:
            dead = [(p.name, p.exitcode) for p in procs if p.exitcode not in (None, 0)]
            if dead:  # killed without a word (e.g. out of memory): the others would wait forever
                raise CollectiveError(f"{dead[0][0]} exited with status {dead[0][1]}") from None
            continue
        if kind == "error":
            raise CollectiveError(payload)
        return payload
    raise CollectiveError(f"the collectives' measurement did not finish within {timeout_s:g} s")


def _worker(rank: int, plan: _Plan, results: Any) -> None:
    """One rank: join the group, time every size, send rank 0's medians (or any rank's error) back."""
    import torch.distributed as dist

    # Forced off here, whatever the parent's environment says: NVLink multicast can take a shared
    # host's GPUs out of service (the lent machines' KINDS.md).
    os.environ.update(dict(MULTICAST_OFF))
    try:
        device = torch.device("cuda", rank) if plan.device == "cuda" else torch.device("cpu")
        if plan.device == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if plan.device == "cuda" else "gloo", init_method=f"file://{plan.store_path}",
                                rank=rank, world_size=plan.world_size)
        try:
            dist.all_reduce(torch.ones(1, device=device))  # the first collective sets the links up: untimed
            reduce_s = [_time_op(plan, device, _all_reduce_op(plan, device, t)) for t in plan.all_reduce_tokens]
            gather_s = [_time_op(plan, device, _all_gather_op(plan, device, r)) for r in plan.all_gather_rows]
        finally:
            dist.destroy_process_group()
        if rank == 0:
            results.put(("result", (reduce_s, gather_s)))
    except Exception as exc:  # the parent reports it in one line, with where it happened
        where = traceback.extract_tb(exc.__traceback__)[-1]
        results.put(("error", f"rank {rank}: {type(exc).__name__}: {exc} (at {Path(where.filename).name}:"
                              f"{where.lineno})"))


def _all_reduce_op(plan: _Plan, device: torch.device, tokens: int) -> Callable[[], object]:
    import torch.distributed as dist

    x = torch.zeros(tokens, plan.hidden_size, dtype=plan.dtype, device=device)  # zeros: sums stay finite
    return lambda: dist.all_reduce(x)


def _all_gather_op(plan: _Plan, device: torch.device, rows: int) -> Callable[[], object]:
    import torch.distributed as dist

    shard = -(-plan.vocab_size // plan.world_size)
    mine = torch.zeros(rows, shard, dtype=plan.dtype, device=device)
    whole = torch.empty(plan.world_size * rows, shard, dtype=plan.dtype, device=device)
    # all_gather_single is the newer torch's name of all_gather_into_tensor (deprecated there).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return lambda: gather(whole, mine)


def _time_op(plan: _Plan, device: torch.device, op: Callable[[], object]) -> float:
    """Median over the repeats of the op's seconds, as the last rank to start saw them."""
    import torch.distributed as dist

    for _ in range(plan.warmup):
        op()
    times = torch.empty(plan.repeats, dtype=torch.float64)
    flag = torch.zeros(1, device=device)
    for i in range(plan.repeats):
        dist.all_reduce(flag)  # every rank is here: a barrier on the timed ops' own stream
        with _timer(device) as elapsed:
            for _ in range(plan.inner):
                op()
        times[i] = elapsed() / plan.inner
    # Ranks leave the barrier at slightly different times, and the early ones wait in the first op
    # for the last: the last rank to start times the chain of ops alone, and its time is the least.
    last_started = times.to(device)
    dist.all_reduce(last_started, op=dist.ReduceOp.MIN)
    return statistics.median(last_started.cpu().tolist())


@contextlib.contextmanager
def _timer(device: torch.device) -> Iterator[Callable[[], float]]:
    """Seconds the block's ops took: on a GPU, device time between events recorded behind a sleep
    (so the host has queued them all before the first runs); on the CPU, the wall time."""
    if device.type != "cuda":
        start = time.perf_counter()
        box: list[float] = []
        yield lambda: box[0]
        box.append(time.perf_counter() - start)
        return
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(SLEEP_CYCLES)
    begin.record()
    yield lambda: begin.elapsed_time(end) / 1e3
    end.record()
    end.synchronize()
