"""``mini-vllm bench boundary``: what one step's message across the engine core's boundary costs.

A decode step of N sequences, as the core sends it: one ``CoreStep`` with N delta events (one new
token each, a few characters of text), pickled, written to a Unix socket, read, unpickled and
applied to N ``RequestStream``s on the frontend's side; then the frontend's work per client frame
for the same step: one ``token`` frame per request as JSON, framed as a WebSocket message
(wsproto, as trio-websocket does) and written to a socket. It times each part per step, on this
machine, and writes the table as JSON. (Not timed: the trio task switches between a stream, its
request task and its connection's writer, which the server adds per frame.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pickle
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from mini_vllm.actors.core import DELTA, CoreStep
from mini_vllm.actors.executor import ExecutorStats
from mini_vllm.actors.request_stream import RequestStream
from mini_vllm.actors.scheduler import SchedulerStats
from mini_vllm.bench.command import HelpFormatter, fail, interruptible, unwritable, write_text
from mini_vllm.bench.env import cpu_name, git_revision, versions
from mini_vllm.engine.block_manager import BlockStats
from mini_vllm.engine.llm_engine import EngineStats
from mini_vllm.engine.outputs import RequestDelta, SampleDelta
from mini_vllm.transport import protocol


def add_bench_boundary(sub: Any) -> None:
    p = sub.add_parser("boundary", help="the engine core's per-step message: encode, send, decode, apply (CPU)",
                       formatter_class=HelpFormatter)
    p.add_argument("--sequences", type=int, default=256, help="sequences decoding in the step")
    p.add_argument("--steps", type=int, default=2000, help="steps timed")
    p.add_argument("--output", default=None, help="write the JSON here (default: boundary-DATE.json)")
    p.set_defaults(func=run)


def _stats(blocks: BlockStats) -> tuple[SchedulerStats, ExecutorStats]:
    engine = EngineStats("m", 256, 0, 256, 0, 10, 1000, 1000, 1000, 16)
    scheduler = SchedulerStats("m", 256, 256, 0, 10, 0, 0.01, 0.1, True, engine, blocks)
    return scheduler, ExecutorStats("m", True, 10, 0.1, 0.01, False)


def _blocks() -> BlockStats:
    return BlockStats(num_blocks=1000, block_size=16, free_blocks=500, cached_blocks=0, used_blocks=500,
                      prefix_queries=0, prefix_hits=0, evictions=0)


def measure(sequences: int, steps: int) -> dict[str, float]:
    """Microseconds per step for each part, medians over ``steps`` steps."""
    scheduler, executor = _stats(_blocks())
    ids = [f"req-{i}" for i in range(sequences)]
    # The engine's deltas, as the scheduler actor hands them to the core's streams.
    deltas = [RequestDelta(rid, (SampleDelta(0, (1234,), "ab", None, None),), 500, False) for rid in ids]
    streams = [RequestStream(rid, "m", 1, lambda s: None) for rid in ids]
    from wsproto.frame_protocol import FrameProtocol

    framing = FrameProtocol(client=False, extensions=[])
    a, b = socket.socketpair()
    a.setblocking(True)
    b.setblocking(True)
    client_end, server_end = socket.socketpair()  # where the frames go (drained after each step)
    parts: dict[str, list[float]] = {"encode": [], "pickle": [], "send_receive": [], "unpickle": [], "apply": [],
                                     "frame_json": [], "frame_ws": [], "frame_send": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        events = [(DELTA, d.request_id, d.num_prompt_tokens, d.finished,
                   [(s.index, s.token_ids, s.text, s.logprobs, s.finish_reason) for s in d.samples]) for d in deltas]
        t1 = time.perf_counter()
        payload = pickle.dumps(CoreStep("m", events, scheduler, executor), protocol=5)
        t2 = time.perf_counter()
        a.sendall(len(payload).to_bytes(8, "little") + payload)
        size = int.from_bytes(b.recv(8, socket.MSG_WAITALL), "little")
        data = b.recv(size, socket.MSG_WAITALL)
        t3 = time.perf_counter()
        step = pickle.loads(data)
        t4 = time.perf_counter()
        for stream, event in zip(streams, step.events, strict=True):
            stream.push_parts(event[2], event[3], event[4])
        t5 = time.perf_counter()
        frames = []
        for stream in streams:  # each request's news as its client's frame
            p = stream._pending.pop(0)
            frames.append(protocol.token_frame(stream.request_id, 0, "".join(p.text), p.token_ids, None))
        t6 = time.perf_counter()
        wire = [framing.send_data(frame, True) for frame in frames]
        t7 = time.perf_counter()
        for data in wire:  # one send per frame, as each connection's writer does
            server_end.sendall(data)
        t8 = time.perf_counter()
        pending = sum(len(w) for w in wire)
        while pending:
            pending -= len(client_end.recv(1 << 20))
        for key, start, end in (("encode", t0, t1), ("pickle", t1, t2), ("send_receive", t2, t3),
                                ("unpickle", t3, t4), ("apply", t4, t5), ("frame_json", t5, t6),
                                ("frame_ws", t6, t7), ("frame_send", t7, t8)):
            parts[key].append((end - start) * 1e6)
    for s in (a, b, client_end, server_end):
        s.close()
    result = {k: round(statistics.median(v), 1) for k, v in parts.items()}
    result["boundary_total"] = round(sum(result[k] for k in ("encode", "pickle", "send_receive", "unpickle", "apply")), 1)
    result["frames_total"] = round(sum(result[k] for k in ("frame_json", "frame_ws", "frame_send")), 1)
    result["frame_us"] = round(result["frames_total"] / sequences, 2)  # per client frame
    result["bytes"] = len(payload)
    return result


@interruptible("boundary")
def run(args: argparse.Namespace) -> int:
    if args.sequences < 1 or args.steps < 1:
        return fail("boundary", "--sequences and --steps must be at least 1")
    now = dt.datetime.now(dt.UTC)
    path = Path(args.output or f"boundary-{now:%Y%m%d}.json")
    error = unwritable(path, "--output")
    if error:
        return fail("boundary", error)
    result = measure(args.sequences, args.steps)
    record = {
        "benchmark": "engine core boundary, one decode step",
        "sequences": args.sequences,
        "steps": args.steps,
        "microseconds_per_step": {k: v for k, v in result.items() if k not in ("bytes", "frame_us")},
        "microseconds_per_client_frame": result["frame_us"],
        "bytes_per_step": result["bytes"],
        "machine": cpu_name(),
        "versions": versions(),
        "git": git_revision(),
        "command": "mini-vllm " + " ".join(getattr(args, "argv", [])),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(f"one decode step of {args.sequences} sequences across the core's boundary ({result['bytes']} bytes), "
          f"then {args.sequences} client frames:")
    for key, value in record["microseconds_per_step"].items():
        print(f"  {key:<15} {value:>8.1f} us")
    print(f"  {'per frame':<15} {result['frame_us']:>8.2f} us (JSON, WebSocket framing, send)")
    return write_text("boundary", path, json.dumps(record, indent=1) + "\n") or 0

