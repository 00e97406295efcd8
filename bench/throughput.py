"""``mini-vllm bench throughput``: OFFLINE-256 (or ONLINE-1000, all at once) through each way in,
against the peer and the floor.

It measures, in one run: the GPU's copy bandwidth and bf16 matmul rate (for the physical
floor of docs/design.md), and mini-vllm on the same requests along the chosen ``--path`` list:
``offline`` (the ``LLMEngine`` loop), ``actors`` (the actors a trio program embeds) and ``server``
(a ``mini-vllm serve`` subprocess, timed at a client over WebSockets); the CPU time per decode
step; and optionally transformers' own continuous batching on the same workload. It prints a
table (each path with its fraction of ``offline``) and writes one JSON file per run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import attrs
import torch
import trio

from mini_vllm.actors.core import settle_gc
from mini_vllm.bench.allreduce import collectives_line, measure_tensor_parallel
from mini_vllm.bench.command import HelpFormatter, fail, interruptible, unwritable, write_text
from mini_vllm.bench.env import (
    gpus_missing,
    load_engine,
    measure_cpu_peaks,
    measure_gpu_peaks,
    model_shapes,
    step_kinds,
    step_kinds_since,
    versions,
)
from mini_vllm.engine.config import PRESETS, EngineArgs, valid_block_size
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.step_loop import StepTiming
from mini_vllm.engine.workloads import (
    Floor,
    ParallelCost,
    WorkloadRequest,
    offline_256,
    online_1000,
    physical_floor,
)
from mini_vllm.transport.flags import EXIT_ERROR, leaf_exceptions, positive_int


@attrs.frozen
class Workload:
    """A reference workload of docs/design.md by name: how many requests it has, and how to draw them."""

    name: str
    size: int
    make: Callable[[int, int], list[WorkloadRequest]]  # (vocab_size, num_requests) -> the first requests


WORKLOADS = {w.name: w for w in (Workload("OFFLINE-256", 256, offline_256), Workload("ONLINE-1000", 1000, online_1000))}
# In the order they run: the in-process paths share one engine, which is closed before the server's
# own process loads the model, so only one engine holds the GPU's memory at a time.
PATHS = ("offline", "actors", "server")


def parse_paths(text: str) -> tuple[str, ...]:
    """``--path``: a comma-separated list of PATHS (``both`` is offline,actors), in run order."""
    chosen: set[str] = set()
    for item in (part.strip() for part in text.split(",")):
        if item == "both":
            chosen |= {"offline", "actors"}
        elif item in PATHS:
            chosen.add(item)
        else:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a path: give a comma-separated list of {', '.join(PATHS)} (both: offline,actors)")
    return tuple(p for p in PATHS if p in chosen)


def add_bench_throughput(sub: Any) -> None:
    t = sub.add_parser("throughput", help="OFFLINE-256: output tokens/s against the peer and the physical floor",
                       formatter_class=HelpFormatter)
    t.add_argument("--model", default="qwen3-0.6b",
                   help="a preset (dummy weights), a model directory, or demo (the built-in demo model)")
    t.add_argument("--load-format", choices=["auto", "dummy"], default=None,
                   help="dummy: random weights (default: dummy for a preset, auto for a directory)")
    t.add_argument("--workload", choices=list(WORKLOADS), default="OFFLINE-256",
                   help="the requests (docs/design.md), all submitted at once")
    t.add_argument("--path", type=parse_paths, default="both",
                   help="what to time, comma-separated: offline (the LLMEngine loop), actors (what a trio program "
                        "embeds), server (a mini-vllm serve subprocess, timed at a WebSocket client); both: "
                        "offline,actors")
    t.add_argument("--connections", type=positive_int, default=256,
                   help="the server path's WebSocket connections; with fewer than the requests, requests go "
                        "round-robin over them, each connection running its requests at once")
    t.add_argument("--serve-args", default="",
                   help="more flags for the server path's mini-vllm serve, one shell-quoted string, e.g. "
                        "'--no-core-process' (default: none)")
    t.add_argument("--client-processes", type=positive_int, default=4,
                   help="processes the server path's client runs in (at most one per connection): one event "
                        "loop reads about 10,000 token frames/s, less than the server may send")
    t.add_argument("--peer", choices=["none", "transformers"], default="none",
                   help="also time transformers' own continuous batching on the same requests (GPU only)")
    t.add_argument("--peer-timeout", type=float, default=420.0, help="seconds before the peer run is cut short")
    t.add_argument("--num-requests", type=int, default=None,
                   help="the first N requests of the workload (default: all of them; on a machine without CUDA it "
                        "must be given, since the full run takes hours there)")
    t.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch")
    t.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens computed in one step")
    t.add_argument("--max-model-len", type=int, default=2048, help="longest prompt + output in tokens")
    t.add_argument("--block-size", type=int, default=16, help="tokens per KV block (a power of two <= 256)")
    t.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV")
    t.add_argument("--num-kv-blocks", type=int, default=None,
                   help="fix the KV cache size (default: sized by --gpu-memory-utilization on a GPU, "
                        "the engine's CPU budget on the CPU)")
    t.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    t.add_argument("--skinny-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="steps of at most 16 tokens through the few-row kernel for o_proj, gate_up and down_proj "
                        "(engine/triton_skinny.py; --no-skinny-kernels: cuBLAS)")
    t.add_argument("--programmatic-dependent-launch", action=argparse.BooleanOptionalAction, default=None,
                   help="in steps of at most 64 tokens our GPU kernels may start while the one before them ends "
                        "(default: on for one GPU of compute capability 9.0+)")
    t.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="N",
                   help="split the model over N GPUs (CPU processes over gloo without CUDA); the floor is then "
                        "N GPUs', each at the measured per-GPU peaks, plus the collectives measured over them")
    t.add_argument("--freeze-gc", action=argparse.BooleanOptionalAction, default=True,
                   help="in-process runs: once the engine is built and warm, gc.freeze() and a young generation "
                        "collected after 20,000 net allocations, as the engine core process of the server runs "
                        "(actors/core.py, settle_gc); --no-freeze-gc: the collector as Python sets it, whose full "
                        "collections walk the whole start-up heap, tens of ms each, in the middle of steps")
    t.add_argument("--trace", metavar="DIR", default=None,
                   help="profile steady-state decode steps and write the trace and a timeline PNG into DIR "
                        "(GPU; default: no trace)")
    t.add_argument("--output-dir", default=".", help="where the run's JSON goes (default: the current directory)")
    t.add_argument("--tag", default="", help="a suffix for the JSON file name (default: none)")
    t.set_defaults(func=run_throughput)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the runs ------------------------------------------------------------------------------------
def _params(r: WorkloadRequest) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)


class _Progress:
    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= 5 or done >= self.total:
            self.last = now
            _log(f"[{self.label}] {done:,}/{self.total:,} output tokens, {now - self.start:.1f} s")


def run_offline(engine: LLMEngine, workload: list[WorkloadRequest]) -> dict[str, Any]:
    """The engine's own pipelined loop: add everything, step until done."""
    total = sum(r.output_len for r in workload)
    progress = _Progress("offline", total)
    engine.step_timings = []
    before = step_kinds(engine)
    start = time.perf_counter()
    for i, r in enumerate(workload):
        engine.add_request(f"bench-{i}", r.prompt_token_ids, _params(r))
    done = 0
    last_token = start
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for s in delta.samples:
                done += len(s.token_ids)
            last_token = time.perf_counter()
        progress.update(done)
    timings, engine.step_timings = engine.step_timings, None
    wall = last_token - start
    return {"output_tokens": done, "seconds": wall, "output_tokens_per_s": done / wall, "steps": len(timings),
            **_kinds_field(step_kinds_since(engine, before)), **cpu_step_times(timings),
            "time_by_step": time_by_step(timings, pipelined=engine.async_scheduling)}


BATCH_BIN = 32  # decode steps are grouped by running sequences in bins this wide: 1-32, 33-64, ...


def _decode_bin(num_seqs: int) -> str:
    top = -(-num_seqs // BATCH_BIN) * BATCH_BIN
    return f"decode {top - BATCH_BIN + 1}-{top}"


def time_by_step(timings: list[StepTiming], *, pipelined: bool) -> dict[str, dict[str, float]]:
    """Wall time of the loop by the kind of step it was spent on: the steps that carry prefill
    tokens, and decode-only steps by running sequences. A turn of the pipelined loop launches one
    step and waits for the one before it, so its time goes to that earlier step (on a busy GPU,
    the turn lasts as long as that step's device work). ``wait_seconds``: the part of it the host
    sat blocked on the device; a bin where that is near zero is bound by the host, not the GPU."""
    bins: dict[str, dict[str, float]] = {}
    for i, t in enumerate(timings):
        owner = timings[i - 1] if pipelined and i > 0 else t
        key = _decode_bin(owner.num_seqs) if owner.decode_only else "prefill-carrying"
        row = bins.setdefault(key, {"steps": 0, "seconds": 0.0, "wait_seconds": 0.0})
        row["steps"] += 1
        row["seconds"] += t.schedule_s + t.launch_s + t.wait_s + t.process_s
        row["wait_seconds"] += t.wait_s
    return bins


def against_floor(measured: dict[str, dict[str, float]], floor: Floor) -> list[dict[str, Any]]:
    """Each kind of step's measured time next to the floor's for the same work: the floor's prefill
    (every prompt at the matmul peak) for the prefill-carrying steps, its decode steps with as many
    live requests for each decode bin. Where the time above the floor goes."""
    wanted: dict[str, dict[str, float]] = {
        "prefill-carrying": {"steps": 1, "seconds": floor.prefill_seconds, "serial": floor.prefill_seconds}}
    for step in floor.decode_steps:
        row = wanted.setdefault(_decode_bin(step.live), {"steps": 0, "seconds": 0.0, "serial": 0.0})
        row["steps"] += 1
        row["seconds"] += step.seconds
        row["serial"] += step.serial_seconds

    def order(key: str) -> int:
        return -1 if key == "prefill-carrying" else int(key.split()[1].split("-")[0])

    rows = []
    for key in sorted(set(measured) | set(wanted), key=order):
        got = measured.get(key, {"steps": 0, "seconds": 0.0, "wait_seconds": 0.0})
        want = wanted.get(key, {"steps": 0, "seconds": 0.0, "serial": 0.0})
        rows.append({
            "steps": key, "measured_steps": int(got["steps"]), "measured_seconds": round(got["seconds"], 4),
            "measured_wait_seconds": round(got.get("wait_seconds", 0.0), 4),  # absent before 2026-12-06
            "floor_steps": int(want["steps"]), "floor_seconds": round(want["seconds"], 4),
            "over_floor_seconds": round(got["seconds"] - want["seconds"], 4),
            "serial_floor_seconds": round(want["serial"], 4),
        })
    return rows


def _kinds_field(kinds: dict[str, int] | None) -> dict[str, Any]:
    return {"step_kinds": kinds} if kinds is not None else {}  # on a GPU only


def cpu_step_times(timings: list[StepTiming]) -> dict[str, Any]:
    """Host time per decode-only step with the batch full (the steady state), median in ms."""
    if not timings:
        return {}
    full = max(t.num_seqs for t in timings)
    steady = [t for t in timings if t.decode_only and t.num_seqs == full]
    if not steady:
        return {}

    def med(get: Callable[[StepTiming], float]) -> float:
        return round(1e3 * statistics.median(get(t) for t in steady), 3)

    return {
        "cpu_step_ms": {
            "running_seqs": full,
            "steps_measured": len(steady),
            "schedule_and_prepare": med(lambda t: t.schedule_s),
            "launch": med(lambda t: t.launch_s),
            "process_outputs": med(lambda t: t.process_s),
            "total_host": med(lambda t: t.schedule_s + t.launch_s + t.process_s),
            "wait_for_gpu": med(lambda t: t.wait_s),
        }
    }


def run_actors(engine: LLMEngine, workload: list[WorkloadRequest]) -> dict[str, Any]:
    """The same engine behind the actors (ingress, scheduler, executor thread), as an embedder sees it."""
    import trio

    from mini_vllm.actors import ServiceConfig, open_service

    total = sum(r.output_len for r in workload)
    progress = _Progress("actors", total)
    result: dict[str, Any] = {}

    async def main() -> None:
        config = ServiceConfig(max_pending_per_model=max(len(workload), 1))
        async with open_service([engine], config) as service:
            counts = {"done": 0, "last": 0.0}

            async def one(i: int, r: WorkloadRequest) -> None:
                async with service.generate(r.prompt_token_ids, params=_params(r), request_id=f"a{i}") as gen:
                    async for delta in gen:
                        for s in delta.samples:
                            counts["done"] += len(s.token_ids)
                        counts["last"] = time.perf_counter()
                        progress.update(counts["done"])

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i, r in enumerate(workload):
                    nursery.start_soon(one, i, r)
            wall = counts["last"] - start
            stats = service.statistics()
            result.update(
                output_tokens=counts["done"],
                seconds=wall,
                output_tokens_per_s=counts["done"] / wall,
                loop_lag_ms=(
                    {"p50": stats.loop_lag.p50_ms, "p99": stats.loop_lag.p99_ms, "max": stats.loop_lag.max_ms}
                    if stats.loop_lag is not None else None
                ),
            )

    trio.run(main)
    return result


def run_peer(model: str, workload: list[WorkloadRequest], timeout: float) -> dict[str, Any]:
    """transformers' own continuous batching, same workload, random bf16 weights of the same shapes."""
    import transformers

    raw = dict(PRESETS[model]) if model in PRESETS else json.loads((Path(model) / "config.json").read_text())
    arch = raw["architectures"][0]
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{k: v for k, v in raw.items() if k != "architectures"})
    config.eos_token_id = None
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for smoke tests
    with torch.device(device):
        peer = getattr(transformers, arch)._from_config(config, dtype=torch.bfloat16)
    peer.eval()
    gen_config = transformers.GenerationConfig(do_sample=False, max_new_tokens=max(r.output_len for r in workload),
                                               eos_token_id=None, pad_token_id=0)
    total = sum(r.output_len for r in workload)
    progress = _Progress("peer", total)
    done_tokens = 0
    finished = 0
    with peer.continuous_batching_context_manager(generation_config=gen_config) as manager:
        start = time.perf_counter()
        for i, r in enumerate(workload):
            manager.add_request(r.prompt_token_ids, request_id=f"p{i}", max_new_tokens=r.output_len)
        last = start
        while finished < len(workload) and time.perf_counter() - start < timeout:
            result = manager.get_result(timeout=1.0)
            if result is None:
                continue
            if result.is_finished():
                finished += 1
                done_tokens += len(result.generated_tokens)
                last = time.perf_counter()
                progress.update(done_tokens)
        wall = (last if finished == len(workload) else time.perf_counter()) - start
    out: dict[str, Any] = {
        "output_tokens": done_tokens,
        "finished_requests": finished,
        "seconds": wall,
        "output_tokens_per_s": done_tokens / wall if wall > 0 else 0.0,
        "complete": finished == len(workload),
    }
    del peer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


# ---- the server path -------------------------------------------------------------------------------
SERVER_WARMUP_REQUESTS = 16  # as bench serve: a fresh server's first requests compile kernels and allocate
SERVER_START_TIMEOUT_S = 900.0  # loading llama3-8b and capturing its CUDA graphs takes a minute or two
SERVER_STOP_GRACE_S = 15.0  # after SIGINT, time to flush, free the GPU and exit before SIGKILL
CLIENT_BARRIER_TIMEOUT_S = 300.0  # for every client process to start and open its connections
_SERVING_LINE = re.compile(r"^mini-vllm: serving .+ on (?P<url>wss?://\S+)\s*$")  # transport/commands.py prints it


class ServerPathError(Exception):
    """A failure of the server path, reported as one line (in the server's own words where it has them)."""


def server_argv(args: argparse.Namespace, load_format: str, num_requests: int, connections: int) -> list[str]:
    """``mini-vllm serve`` on a free port of 127.0.0.1, with the engine flags the in-process paths use."""
    argv = [
        sys.executable, "-m", "mini_vllm", "serve", "--host", "127.0.0.1", "--port", "0", "--model", args.model,
        "--load-format", load_format, "--max-num-seqs", str(args.max_num_seqs),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--max-model-len", str(args.max_model_len),
        "--block-size", str(args.block_size), "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--no-enable-prefix-caching",
        # Admit every request at once, whatever its connection: queueing is what is timed, not refusals
        # (split over the client processes, a connection may carry one more than its even share).
        "--max-pending-requests", str(num_requests + SERVER_WARMUP_REQUESTS), "--client-key", "off",
        "--max-requests-per-connection", str(max(-(-num_requests // connections) + 1, SERVER_WARMUP_REQUESTS)),
        "--shutdown-grace", "1",  # nothing is in flight when the bench stops it
    ]
    if args.num_kv_blocks is not None:
        argv += ["--num-kv-blocks", str(args.num_kv_blocks)]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    argv.append("--skinny-kernels" if args.skinny_kernels else "--no-skinny-kernels")
    if args.programmatic_dependent_launch is not None:
        argv.append("--programmatic-dependent-launch" if args.programmatic_dependent_launch
                    else "--no-programmatic-dependent-launch")
    if args.tensor_parallel_size != 1:
        argv += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    return argv + shlex.split(args.serve_args)  # last: serve's argparse lets a later flag win


def run_server(
    argv: list[str], workload: Workload, num_requests: int, connections: int, client_processes: int
) -> dict[str, Any]:
    """Start ``argv`` (a ``mini-vllm serve``), time the workload at a WebSocket client, and stop the
    server whatever happens: SIGINT, then SIGKILL after a grace period."""
    from trio_websocket import HandshakeError

    from mini_vllm.engine.errors import MiniVllmError

    # A file, not a pipe: nobody has to drain it while the server loads, and it is there to quote afterwards.
    with tempfile.TemporaryFile() as stderr:
        try:
            return trio.run(_serve_and_time, argv, stderr, workload, num_requests, connections, client_processes)
        except Exception as exc:  # nurseries wrap what their tasks raise in groups
            leaves = leaf_exceptions(exc)
            if not all(isinstance(e, ServerPathError | MiniVllmError | OSError | HandshakeError) for e in leaves):
                raise
            raise ServerPathError("; ".join(
                str(e) if isinstance(e, ServerPathError | MiniVllmError) else f"{type(e).__name__}: {e}"
                for e in leaves)) from None


async def _serve_and_time(
    argv: list[str], stderr: IO[bytes], workload: Workload, num_requests: int, connections: int,
    client_processes: int,
) -> dict[str, Any]:
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
    interrupted = False
    try:
        # trio would hold a Ctrl-C back until the main task's next checkpoint, after the whole run:
        # take the signal here and cancel at once.
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def on_interrupt() -> None:
                    nonlocal interrupted
                    async for _ in signals:
                        interrupted = True
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_interrupt)
                url: str | None = None
                with trio.move_on_after(SERVER_START_TIMEOUT_S):
                    url = await nursery.start(_server_url, proc, stderr)
                if url is None:
                    raise ServerPathError(f"the server printed no URL within {SERVER_START_TIMEOUT_S:.0f} s "
                                          f"(its stderr ends: {_last_line(stderr)})")
                _log(f"[server] pid {proc.pid} serving on {url}")
                result = await _time_requests(url, workload, num_requests, connections, client_processes, proc.pid)
                nursery.cancel_scope.cancel()  # the tasks draining its stdout and waiting for a signal
        if interrupted:
            raise KeyboardInterrupt
    finally:
        with trio.CancelScope(shield=True):  # also on an error or Ctrl-C
            await _stop(proc)
    return {**result, "pid": proc.pid, "url": url, "server_command": shlex.join(["python", *argv[1:]])}


async def _server_url(
    proc: trio.Process, stderr: IO[bytes], *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Read the server's stdout up to the line saying where it serves, then keep draining it (a
    full pipe would stall the server); an exit before that line is the start-up's failure."""
    assert proc.stdout is not None
    pending, found = b"", False
    async for chunk in proc.stdout:
        if found:
            continue
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            match = _SERVING_LINE.match(line.decode(errors="replace"))
            if match:
                found = True
                task_status.started(match["url"])
                break
    if not found:
        code = await proc.wait()
        raise ServerPathError(f"the server exited (status {code}) before serving: {_last_line(stderr)}")


def _last_line(stderr: IO[bytes]) -> str:
    stderr.seek(0)
    lines = [line.strip() for line in stderr.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "nothing on its stderr"


async def _stop(proc: trio.Process) -> None:
    """SIGINT (serve's graceful stop); SIGKILL if it has not exited within the grace period."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
        with trio.move_on_after(SERVER_STOP_GRACE_S):
            await proc.wait()
    if proc.returncode is None:
        _log(f"[server] pid {proc.pid} did not stop within {SERVER_STOP_GRACE_S:.0f} s of SIGINT: killing it")
        proc.kill()
    await proc.wait()  # reaps it
    if proc.stdout is not None:
        await proc.stdout.aclose()


def server_cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU seconds of the server process ("frontend") and each child ("core PID"),
    from /proc; empty where there is no /proc."""
    def cpu(p: int) -> float:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    try:
        out = {"frontend": cpu(pid)}
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out[f"core {child}"] = cpu(int(child))
    except (OSError, ValueError, IndexError):
        return {}
    return out


async def _time_requests(
    url: str, workload: Workload, num_requests: int, connections: int, client_processes: int, server_pid: int
) -> dict[str, Any]:
    """Warm the server up on fresh random ids, then send every request at once from the client
    processes and time from the first send to the last token."""
    from trio_websocket import open_websocket_url

    from mini_vllm.bench.serve import ServeRequest, _lag_and_engine, _models, replay, warmup_requests

    info = (await _models(url))[0]
    vocab_size = int(info["vocab_size"])
    requests = [ServeRequest(None, tuple(r.prompt_token_ids), r.output_len)
                for r in workload.make(vocab_size, num_requests)]
    # The workload's prompt lengths but fresh ids: a measured prompt must not be served warm.
    warm = warmup_requests(requests[:SERVER_WARMUP_REQUESTS], vocab_size)
    _log(f"[server] warm-up: {len(warm)} short requests ...")
    run = await replay(url, warm, model=info["name"], request_rate=math.inf, burstiness=1.0, max_concurrency=None,
                       connections=min(connections, len(warm)), label="warmup", progress_interval=None)
    _check_exact(run.trackers, warm, "warm-up")
    processes = min(client_processes, connections)
    _log(f"[server] {num_requests} requests over {connections} connections from {processes} client processes ...")
    async with open_websocket_url(url, disconnect_timeout=2) as ws:  # the server's statistics around the run
        before = await _stats(ws, reset=True)
        cpu_before = server_cpu_seconds(server_pid)
        seen, cpu = await _run_clients(url, info["name"], requests, connections, processes)
        cpu_after = server_cpu_seconds(server_pid)
        after = await _stats(ws, reset=False)
    seen.sort(key=lambda s: s.index)
    _check_exact(seen, requests, "the timed run")
    start = min(s.sent for s in seen)
    wall = max(s.last_token for s in seen) - start
    tokens = sum(s.tokens for s in seen)
    return {
        "output_tokens": tokens, "seconds": wall, "output_tokens_per_s": tokens / wall, "connections": connections,
        "client_processes": processes, "token_frames": sum(s.frames for s in seen),
        # Near client_processes * seconds, the client itself may be what limits the figure.
        "client_cpu_seconds": round(cpu, 3),
        "server_stats": _lag_and_engine(before, after, info["name"]),
        # CPU seconds of the frontend process and of its engine core(s) over the run: one near the
        # run's seconds is a process that is saturated (Linux only; empty elsewhere).
        "server_cpu_seconds": {k: round(cpu_after[k] - cpu_before[k], 3) for k in cpu_after if k in cpu_before},
    }


async def _stats(ws: Any, reset: bool) -> dict[str, Any] | None:
    """The server's ``stats`` frame, or None if it does not answer one."""
    from mini_vllm.transport import protocol

    await ws.send_message(protocol.stats_request("bench-stats", reset_loop_lag=reset))
    with trio.move_on_after(10):
        reply = json.loads(await ws.get_message())
        return reply if reply.get("type") == "stats" else None
    return None


@attrs.frozen
class _Seen:
    """What a client process saw of one request, its times on this machine's monotonic clock
    (``time.perf_counter``), which every process shares."""

    index: int
    tokens: int
    frames: int
    finish_reason: str | None
    error: str | None
    sent: float
    last_token: float


async def _run_clients(
    url: str, model: str, requests: list[Any], connections: int, processes: int
) -> tuple[list[_Seen], float]:
    """One event loop reads about one token frame per 0.1 ms, less than the server may send: spread
    the client over ``processes`` processes, request i in process i % processes, each with its share
    of the connections (so one request per connection when there are as many), all sending together.
    Returns every request's outcome and the client processes' CPU seconds."""
    import functools
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA or trio state forked
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_client_main, daemon=True, args=(
            url, model, p, [(i, r) for i, r in enumerate(requests) if i % processes == p],
            connections // processes + (p < connections % processes), barrier, results))
        for p in range(processes)
    ]
    try:
        for proc in procs:
            proc.start()
        seen: list[_Seen] = []
        cpu, reported = 0.0, 0
        while reported < processes:
            try:
                item = await trio.to_thread.run_sync(functools.partial(results.get, timeout=1.0),
                                                     abandon_on_cancel=True)
            except queue.Empty:
                dead = [q.exitcode for q in procs if q.exitcode not in (None, 0)]
                if dead:
                    raise ServerPathError(f"a client process exited with status {dead[0]}") from None
                continue
            if isinstance(item, str):
                raise ServerPathError(f"a client process failed: {item}")
            seen += item[0]
            cpu += item[1]
            reported += 1
        return seen, cpu
    finally:
        for proc in procs:
            if proc.pid is not None:
                if proc.is_alive():
                    proc.terminate()
                proc.join()


def _client_main(url: str, model: str, number: int, share: list[tuple[int, Any]], connections: int,
                 barrier: Any, results: Any) -> None:
    """A client process: its share of the requests over its connections; the outcome, or why not, to the parent."""
    try:
        results.put(trio.run(_client, url, model, number, share, connections, barrier))
    except BaseException as exc:  # the parent fails the run with it, in one line
        results.put(f"{type(exc).__name__}: {exc}")


async def _client(
    url: str, model: str, number: int, share: list[tuple[int, Any]], connections: int, barrier: Any
) -> tuple[list[_Seen], float]:
    from mini_vllm.bench.serve import replay

    async def ready() -> None:  # every client process has its connections open: send
        await trio.to_thread.run_sync(barrier.wait, CLIENT_BARRIER_TIMEOUT_S)

    cpu = time.process_time()
    run = await replay(url, [r for _, r in share], model=model, request_rate=math.inf, burstiness=1.0,
                       max_concurrency=None, connections=connections, label=f"server{number}",
                       progress_interval=None, round_robin=True, ready=ready, stats=False)
    cpu = time.process_time() - cpu
    shift = time.perf_counter() - trio.current_time()  # trio's clock adds a random offset to perf_counter
    return [
        _Seen(i, t.tokens, len(t.token_times), t.finish_reason, t.error, t.sent + shift,
              (t.token_times[-1] if t.token_times else math.nan) + shift)
        for (i, _), t in zip(share, run.trackers, strict=True)
    ], cpu


def _check_exact(trackers: list[Any], requests: list[Any], what: str) -> None:
    """Every request must end by length with exactly its max_tokens (EOS is ignored)."""
    wrong = [(t, r) for t, r in zip(trackers, requests, strict=True)
             if t.error is not None or t.finish_reason != "length" or t.tokens != r.output_len]
    if wrong:
        t, r = wrong[0]
        raise ServerPathError(
            f"{what}: {len(wrong)} of {len(requests)} requests did not get exactly their max_tokens over WebSocket "
            f"(request {t.index}: {t.tokens} of {r.output_len} tokens, {t.error or f'finish_reason {t.finish_reason}'})")


# ---- the command -----------------------------------------------------------------------------------
def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, before anything loads (a bad path must not end a long run)."""
    workload = WORKLOADS[args.workload]
    if args.num_requests is not None and not 1 <= args.num_requests <= workload.size:
        return (f"--num-requests must be in 1..{workload.size} ({workload.name} has {workload.size} requests), "
                f"got {args.num_requests}")
    # Lengths do not depend on the vocabulary: any size gives the same prompts' lengths.
    requests = workload.make(1, args.num_requests or workload.size)
    longest = max(max(len(r.prompt_token_ids) for r in requests), WARM_UP_PROMPT_LEN)
    if args.max_model_len <= longest:
        return (f"--max-model-len {args.max_model_len} cannot hold these prompts (up to {longest} tokens): "
                f"give at least {longest + 1}")
    total = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    if args.max_model_len < total:  # the engine would stop them short of their output lengths
        return (f"--max-model-len {args.max_model_len} cannot hold these requests' prompt + output (up to {total} "
                f"tokens): give at least {total}")
    if not valid_block_size(args.block_size):
        # Checked here too: the server path would find out only once its server starts.
        return f"--block-size must be a power of two <= 256, got {args.block_size}"
    if not args.peer_timeout > 0:
        return f"--peer-timeout must be > 0 seconds, got {args.peer_timeout}"
    if args.trace and not torch.cuda.is_available():
        return "--trace profiles GPU kernels and needs a CUDA GPU: drop it on this machine"
    missing = gpus_missing(args.tensor_parallel_size)
    if missing:
        return missing
    try:
        shlex.split(args.serve_args)
    except ValueError as exc:
        return f"--serve-args {args.serve_args!r}: {exc}"
    if "/" in args.tag or "\\" in args.tag:
        return f"--tag is part of a file name and cannot hold a path separator, got {args.tag!r}"
    return unwritable(Path(args.output_dir), "--output-dir", folder=True) or (
        unwritable(Path(args.trace), "--trace", folder=True) if args.trace else None)


def cpu_refusal(model: str, workload: Workload) -> str:
    """Why the full run is refused without CUDA, with roughly how long it would take on this CPU."""
    config = model_shapes(model)
    if config is None:  # not a preset or a readable directory: the load will say why, once N is given
        estimate = "hours"
    else:
        bandwidth, flops = measure_cpu_peaks()
        floor = physical_floor(config, workload.make(config.vocab_size, workload.size), bandwidth, flops,
                               bytes_per_param=4)
        estimate = (f"at least {_duration(floor.seconds)} (its floor at this CPU's measured {flops / 1e9:.0f} "
                    f"GFLOP/s and {bandwidth / 1e9:.0f} GB/s; several times that in practice)")
    return (f"no CUDA GPU, and the full {workload.name} run of {model} would take {estimate}: pass --num-requests N "
            f"to run only its first N requests on the CPU (e.g. --num-requests 2)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


IN_PROCESS_RUNS: dict[str, Callable[[LLMEngine, list[WorkloadRequest]], dict[str, Any]]] = {
    "offline": run_offline, "actors": run_actors,
}


@interruptible("throughput")
def run_throughput(args: argparse.Namespace) -> int:
    error = check_args(args)
    if error:
        return fail("throughput", error)
    workload = WORKLOADS[args.workload]
    cuda = torch.cuda.is_available()
    if not cuda and args.num_requests is None:
        return fail("throughput", cpu_refusal(args.model, workload))
    num_requests = args.num_requests or workload.size
    preset = args.model in PRESETS
    load_format = args.load_format or ("dummy" if preset else "auto")
    device = torch.device("cuda" if cuda else "cpu")
    record: dict[str, Any] = {
        "workload": workload.name if num_requests == workload.size else f"{workload.name}[:{num_requests}]",
        "model": args.model,
        "gpu": torch.cuda.get_device_name(device) if cuda else "none (CPU)",
        "tensor_parallel_size": args.tensor_parallel_size,
        "versions": versions(),
        "command": "mini-vllm " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    parallel: ParallelCost | None = None
    if cuda:
        _log("measuring copy bandwidth and bf16 matmul rate ...")
        bandwidth, flops = measure_gpu_peaks(device)
        torch.cuda.empty_cache()  # the 6 GiB of probe tensors are gone: give them back
        record["measured_bandwidth_bytes_per_s"] = bandwidth  # of GPU 0: with N GPUs, each one's
        record["measured_bf16_flops"] = flops
        if args.tensor_parallel_size > 1:
            measured = measure_tensor_parallel("throughput", model_shapes(args.model), args.tensor_parallel_size)
            if isinstance(measured, int):
                return measured
            record["collectives"], parallel = measured

    in_process = [p for p in args.path if p in IN_PROCESS_RUNS]
    requests: list[WorkloadRequest] | None = None  # None: the model's vocabulary is unknown here
    if in_process or args.trace:
        _log(f"loading {args.model} ({load_format}) ...")
        t0 = time.perf_counter()
        engine = load_engine("bench throughput", lambda: EngineArgs(
            model=None if args.model == "demo" else args.model, load_format=load_format,
            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, block_size=args.block_size,
            max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
            num_kv_blocks=args.num_kv_blocks, enforce_eager=args.enforce_eager, enable_prefix_caching=False,
            tensor_parallel_size=args.tensor_parallel_size, skinny_kernels=args.skinny_kernels,
            programmatic_dependent_launch=args.programmatic_dependent_launch,
        ))
        if isinstance(engine, int):
            return engine
        record["engine"] = engine_summary(engine, time.perf_counter() - t0)
        _log(f"loaded in {record['engine']['load_seconds']:.1f} s: {record['engine']['kv_blocks']} KV blocks")
        config = engine.model_config
        requests = workload.make(config.vocab_size, num_requests)
        warm_up(engine)
        threshold = gc.get_threshold()
        if args.freeze_gc:
            settle_gc()
        record["freeze_gc"] = args.freeze_gc
        try:
            for path in in_process:
                record[path] = IN_PROCESS_RUNS[path](engine, requests)
            if args.trace:
                from mini_vllm.bench.trace import trace_decode_steps

                record["trace"] = trace_decode_steps(engine, requests, Path(args.trace))
        finally:
            if args.freeze_gc:
                gc.unfreeze()  # the process may go on (tests call the command in-process)
                gc.set_threshold(*threshold)
            # Free the GPU now: the server's process (and the peer) load the model again.
            engine.close()
        del engine
        if cuda:
            torch.cuda.empty_cache()
    else:
        config = model_shapes(args.model)
        requests = None if config is None else workload.make(config.vocab_size, num_requests)
    if cuda and config is not None and requests is not None:
        floor = physical_floor(config, requests, bandwidth, flops, parallel=parallel)
        record["floor_seconds"] = floor.seconds
        record["floor_output_tokens_per_s"] = floor.output_tokens_per_s
        record["serial_floor_seconds"] = floor.serial_seconds
        if "time_by_step" in record.get("offline", {}):
            record["offline"]["against_floor"] = against_floor(record["offline"]["time_by_step"], floor)
        if parallel is not None:
            record["floor_communication_seconds"] = floor.communication_seconds

    server_error: str | None = None
    if "server" in args.path:
        connections = min(args.connections, num_requests)
        _log(f"[server] starting mini-vllm serve {args.model} for {num_requests} requests over {connections} "
             f"connections ...")
        try:
            record["server"] = run_server(server_argv(args, load_format, num_requests, connections), workload,
                                          num_requests, connections, args.client_processes)
        except ServerPathError as exc:
            server_error = f"the server path: {exc}"
            if not in_process:  # nothing measured to keep
                return fail("throughput", server_error, EXIT_ERROR)
            record["server_error"] = server_error
    if "offline" in record:
        for path in ("actors", "server"):
            if path in record:
                record[path]["fraction_of_offline"] = (
                    record[path]["output_tokens_per_s"] / record["offline"]["output_tokens_per_s"])
    main_path = next(record[p] for p in ("actors", "offline", "server") if p in record)
    record["output_tokens_per_s"] = main_path["output_tokens_per_s"]
    if cuda and "floor_output_tokens_per_s" in record:
        record["floor_fraction"] = record["output_tokens_per_s"] / record["floor_output_tokens_per_s"]
        if "offline" in record and "serial_floor_seconds" in record:
            record["offline"]["serial_floor_fraction"] = record["serial_floor_seconds"] / record["offline"]["seconds"]
    if args.peer == "transformers":
        if not cuda:
            record["peer_error"] = "the peer runs on a GPU only"
        elif requests is None:
            record["peer_error"] = f"the peer needs a preset or a model directory, got {args.model}"
        else:
            try:
                record["peer"] = run_peer(args.model, requests, args.peer_timeout)
                record["peer_output_tokens_per_s"] = record["peer"]["output_tokens_per_s"]
                record["ratio_to_peer"] = record["output_tokens_per_s"] / record["peer_output_tokens_per_s"]
            except Exception as exc:  # report the peer's failure in the record, keep our numbers
                record["peer_error"] = f"{type(exc).__name__}: {exc}"
    print_table(record)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M")
    name = f"throughput-{args.model.replace('/', '_')}-{stamp}{('-' + args.tag) if args.tag else ''}.json"
    path = Path(args.output_dir) / name
    failed = write_text("throughput", path, json.dumps(record, indent=2) + "\n")
    if failed is not None:
        return failed
    _log(f"wrote {path}")
    if server_error is not None:  # the other paths' figures are kept, but the run failed
        return fail("throughput", server_error, EXIT_ERROR)
    return 0


def engine_summary(engine: LLMEngine, load_seconds: float) -> dict[str, Any]:
    runner = engine.runner
    graphs = getattr(runner, "graph_stats", None)
    blocks = engine.block_manager.num_blocks
    return {
        "load_seconds": round(load_seconds, 2),
        "kv_blocks": blocks,
        "kv_tokens": blocks * engine.args.block_size,
        "kv_bytes": runner.kv_cache.numel() * runner.kv_cache.element_size(),
        "max_num_seqs": engine.args.max_num_seqs,
        "max_num_batched_tokens": engine.args.max_num_batched_tokens,
        "block_size": engine.args.block_size,
        # Whether steps of a few tokens took the few-row kernel (asked for, and possible here).
        "skinny_kernels": bool(getattr(runner, "skinny", False)),
        "programmatic_dependent_launch": bool(getattr(runner, "dependent_launch", False)),
        "dependent_launch_max_rows": int(getattr(runner, "dependent_launch_max_rows", 0)),  # steps it covers
        "cuda_graphs": (
            {"batch_sizes": list(graphs.batch_sizes), "mixed_token_counts": list(graphs.mixed_token_counts),
             "capture_seconds": round(graphs.capture_seconds, 2), "pool_bytes": graphs.pool_bytes}
            if graphs is not None and graphs.batch_sizes else None
        ),
        # The way greedy's argmax takes at each batch size (as measured at start, GPU only).
        "greedy_argmax_ways": (
            {str(n): way for n, way in argmax.by_size().items()}
            if (argmax := getattr(runner, "greedy_argmax", None)) is not None else None
        ),
    }


WARM_UP_PROMPT_LEN = 200 + 37 * 3  # warm_up's longest prompt


def warm_up(engine: LLMEngine) -> None:
    """Compile every kernel shape once (Triton JIT) so no run pays for it."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"warmup-{i}", [1 + i] * (200 + 37 * i), params)
    while engine.has_unfinished_requests():
        engine.step()


def print_table(record: dict[str, Any]) -> None:
    ranks = record.get("tensor_parallel_size", 1)
    gpu = f"{record['gpu']} x {ranks} (tensor parallel)" if ranks > 1 else record["gpu"]
    rows = [("workload", record["workload"]), ("model", record["model"]), ("gpu", gpu)]
    if "measured_bandwidth_bytes_per_s" in record:
        rows.append(("measured peaks, per GPU" if ranks > 1 else "measured peaks",
                     f"{record['measured_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s copy, "
                     f"{record['measured_bf16_flops'] / 1e12:.0f} TFLOP/s bf16 matmul"))
    if "collectives" in record:
        rows.append(("all-reduce (measured)", collectives_line(record["collectives"])))
    for path in PATHS:
        if path in record:
            r = record[path]
            over = (f" over {r['connections']} connections from {r['client_processes']} processes"
                    if "connections" in r else "")
            fraction = f"; {r['fraction_of_offline']:.2f} of offline" if "fraction_of_offline" in r else ""
            rows.append((f"{path}: output tok/s",
                         f"{r['output_tokens_per_s']:,.0f} ({r['output_tokens']:,} in {r['seconds']:.2f} s{over}{fraction})"))
    if "server_error" in record:
        rows.append(("server", record["server_error"]))
    if "freeze_gc" in record:
        rows.append(("collector, in-process runs", "frozen after start-up (--freeze-gc, as the engine core process)"
                     if record["freeze_gc"] else "Python's defaults (--no-freeze-gc)"))
    if "cpu_step_ms" in record.get("offline", {}):
        c = record["offline"]["cpu_step_ms"]
        rows.append((f"CPU ms per decode step @{c['running_seqs']} seqs",
                     f"{c['total_host']} (schedule {c['schedule_and_prepare']}, launch {c['launch']}, "
                     f"process {c['process_outputs']}; GPU wait {c['wait_for_gpu']})"))
    if "trace" in record:
        from mini_vllm.bench.trace import trace_line

        rows.append(("decode trace (--trace)", trace_line(record["trace"])))
    if "floor_output_tokens_per_s" in record:
        communication = (f"; {record['floor_communication_seconds']:.2f} s of it in collectives"
                         if "floor_communication_seconds" in record else "")
        rows.append((f"floor tok/s ({ranks} GPUs)" if ranks > 1 else "floor tok/s",
                     f"{record['floor_output_tokens_per_s']:,.0f} ({record['floor_seconds']:.2f} s{communication})"))
        rows.append(("fraction of floor", f"{record.get('floor_fraction', 0):.3f}"))
        if "serial_floor_fraction" in record.get("offline", {}):
            rows.append(("offline, of the serial floor", f"{record['offline']['serial_floor_fraction']:.3f} (kernels one "
                         f"after another at their bounds: {record['serial_floor_seconds']:.2f} s)"))
    if "peer_output_tokens_per_s" in record:
        rows.append(("peer (transformers CB) tok/s", f"{record['peer_output_tokens_per_s']:,.0f}"))
        rows.append(("ratio to peer", f"{record['ratio_to_peer']:.1f}x"))
    if "peer_error" in record:
        rows.append(("peer", record["peer_error"]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if "against_floor" in record.get("offline", {}):
        print_against_floor(record["offline"]["against_floor"])


def is_against_floor_record(record: dict[str, Any]) -> bool:
    """A ``bench throughput`` result whose offline run was set against the floor (a GPU run)."""
    return isinstance(record.get("offline"), dict) and "against_floor" in record["offline"]


def plot_against_floor(records: list[dict[str, Any]], path: Path, title: str) -> bool:
    """One panel per record: each kind of step's seconds, the floor's part and the part above it
    stacked, so a bar's height is the measured time; False if matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install 'mini-vllm[bench]')", file=sys.stderr)
        return False
    fig = Figure(figsize=(6.5 * len(records), 4.8), layout="constrained")
    axes = fig.subplots(1, len(records), squeeze=False)[0]
    for ax, record in zip(axes, records, strict=True):
        rows = record["offline"]["against_floor"]
        names = [r["steps"].replace("prefill-carrying", "prefill-\ncarrying").replace("decode ", "decode\n")
                 for r in rows]
        floor = [min(r["floor_seconds"], r["measured_seconds"]) for r in rows]
        over = [max(0.0, r["measured_seconds"] - r["floor_seconds"]) for r in rows]
        ax.bar(names, floor, color="0.7", label="the floor's time for the same work")
        ax.bar(names, over, bottom=floor, color="tab:red", label="measured, above the floor")
        for i, r in enumerate(rows):
            if r["measured_steps"]:
                ax.annotate(f"{1e3 * r['measured_seconds'] / r['measured_steps']:.1f}", (i, r["measured_seconds"]),
                            ha="center", va="bottom", fontsize=7)
        fraction = record.get("floor_fraction")
        ax.set_title(f"{record['model']}: {record['offline']['seconds']:.2f} s, floor {record['floor_seconds']:.2f} s"
                     + (f" ({fraction:.2f})" if fraction else ""), fontsize=10)
        ax.set_ylabel("seconds of the run (ms per step above each bar)")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def print_against_floor(rows: list[dict[str, Any]]) -> None:
    print("\noffline loop against the floor, by step (waited: the share of the time the host sat blocked on the "
          "GPU, near 0 where the host is the bound; serial: the floor's steps with their kernels one after "
          "another, each at its own bound):")
    print(f"{'steps':<18} {'measured':>9} {'s':>8} {'ms/step':>8} {'waited':>7} {'floor':>6} {'s':>8} {'ms/step':>8} "
          f"{'over, s':>8} {'serial, s':>9}")
    for r in rows:
        def per(seconds: float, steps: int) -> str:
            return f"{1e3 * seconds / steps:8.2f}" if steps else f"{'-':>8}"

        serial = r.get("serial_floor_seconds")  # absent in records written before 2026-12-03
        wait = r.get("measured_wait_seconds")  # the host blocked on the GPU; absent before 2026-12-06
        waited = f"{wait / r['measured_seconds']:7.0%}" if wait is not None and r["measured_seconds"] else f"{'-':>7}"
        print(f"{r['steps']:<18} {r['measured_steps']:>9} {r['measured_seconds']:8.3f} "
              f"{per(r['measured_seconds'], r['measured_steps'])} {waited} {r['floor_steps']:>6} {r['floor_seconds']:8.3f} "
              f"{per(r['floor_seconds'], r['floor_steps'])} {r['over_floor_seconds']:8.3f} "
              f"{f'{serial:9.3f}' if serial is not None else '-':>9}")
