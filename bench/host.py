"""``mini-vllm bench host``: the engine's host work per step, with the device taken out.

On a GPU the host must schedule, prepare, land and report step N+1's worth of work while the
device runs step N; what it costs per step decides whether a large decode batch keeps the GPU
fed. This command runs the real host path of ``LLMEngine`` (the scheduler, the block manager,
``prepare_inputs``, the step loop one step ahead as on a GPU, ``land_step``, the per-request
deltas) on one batch, with the model runner replaced by ``NullRunner``: no model, no KV tensors,
no forward pass; each launch "samples" made-up token ids at once. So every microsecond it
reports is host work, and it runs the same on any machine. ``--runner device`` keeps the engine's
own runner instead (dummy weights on the default device): on a GPU the table then adds the
runner's host work (filling buffers, enqueueing copies, the graph replay, the sampler's launches)
and the time blocked on the GPU apart from it, and ``--profile`` names the runner's functions too. ``--profile N`` names the functions
that cost it (cProfile, on an extra iteration, so that the profiler's overhead stays out of the
table).

The engine is built as the engine core builds it in serving: token ids only, no tokenizer (the
frontend detokenizes), a preset's shapes for the vocabulary and EOS ids. Requests are greedy and
ignore EOS, so every one generates exactly ``--output-len`` tokens.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import json
import os
import platform
import pstats
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import attrs
import torch

from mini_vllm.actors.core import settle_gc
from mini_vllm.bench.command import HelpFormatter, fail, interruptible, unwritable, write_text
from mini_vllm.bench.env import cpu_name, versions
from mini_vllm.engine.config import PRESETS, EngineArgs, ModelConfig, valid_block_size
from mini_vllm.engine.errors import MiniVllmError
from mini_vllm.engine.llm_engine import LLMEngine, generation_eos_ids
from mini_vllm.engine.loader import resolve_model
from mini_vllm.engine.model_runner import ModelOutput, StepInputs
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.step_loop import StepTiming

# How a step is counted in the table: what it carried when it was launched.
DECODE_FULL = "decode, full batch"
DECODE_PARTIAL = "decode, partial batch"
WITH_PREFILL = "with a prefill chunk"
KINDS = (DECODE_FULL, DECODE_PARTIAL, WITH_PREFILL)
TOKEN_POOL = 4096  # made-up ids drawn once: a launch slices them, so it costs next to nothing


@attrs.frozen
class NullHandle:
    """A launched step of the ``NullRunner``: its tokens are known at once."""

    token_ids: list[int]


class NullRunner:
    """A model runner without a model, for measuring the engine's host work alone.

    It has the runner interface that ``LLMEngine`` drives (``device``, ``closed``, ``launch``,
    ``collect``, ``close``): ``launch`` returns at once with one made-up token per sampling row
    (drawn once from ``random.Random(seed)``, never one of ``avoid``: the command passes the EOS
    ids) and ``collect`` hands them back, so a step costs no device time at all. It returns no
    logprobs (a request asking for them gets none), holds no KV cache, and ignores placeholders
    and block copies: nothing is computed that could read them. Steps it runs count in
    ``launches`` and their rows in ``rows``.
    """

    def __init__(self, vocab_size: int, avoid: Container[int] = (), seed: int = 0) -> None:
        allowed = [t for t in range(vocab_size) if t not in avoid]
        if len(allowed) < 2:
            raise ValueError(f"the vocabulary must hold at least 2 ids besides the avoided ones, got {len(allowed)}")
        rng = random.Random(seed)
        pool = [rng.choice(allowed) for _ in range(TOKEN_POOL)]
        # Twice over, so that any run of up to TOKEN_POOL rows is one slice from any offset.
        self._pool = pool + pool
        self._offset = 0
        self.device = torch.device("cpu")
        self.closed = False
        self.launches = 0
        self.rows = 0

    def launch(self, inputs: StepInputs) -> NullHandle:
        n = len(inputs.sampling_rows)
        if n > TOKEN_POOL:
            tokens = [self._pool[(self._offset + i) % TOKEN_POOL] for i in range(n)]
        else:
            tokens = self._pool[self._offset : self._offset + n]
        self._offset = (self._offset + n) % TOKEN_POOL
        self.launches += 1
        self.rows += n
        return NullHandle(tokens)

    def collect(self, handle: NullHandle) -> ModelOutput:
        return ModelOutput(handle.token_ids, None, None)

    def close(self) -> None:
        self.closed = True


def add_bench_host(sub: Any) -> None:
    p = sub.add_parser("host", help="the engine's host work per step (schedule, prepare, land, deltas), no device",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="qwen3-0.6b",
                   help="a preset: its vocabulary and EOS ids (no weights are made or loaded with the null runner)")
    p.add_argument("--runner", choices=["null", "device"], default="null",
                   help="null: no model, made-up tokens at once (host work alone, any machine); device: the "
                        "engine's own runner with dummy weights on the default device (a GPU if there is one), "
                        "its host work beside the time waiting for the device")
    p.add_argument("--batch-size", type=int, default=256, help="requests in the batch, all added at once")
    p.add_argument("--input-len", type=int, default=560, help="prompt tokens per request (random ids)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (EOS ignored)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (a power of two <= 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, metavar="N",
                   help="tokens one step may carry, at least --batch-size (default: 8192, the engine's)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="hash full blocks for the prefix cache, as the server does (prompts are random: no hits)")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="blocks in the (tensor-less) KV pool (default: enough for the whole batch, so no preemption)")
    p.add_argument("--num-iters", type=int, default=3, help="measured iterations (the batch run to the end)")
    p.add_argument("--warmup-iters", type=int, default=1, help="unmeasured iterations first")
    p.add_argument("--freeze-gc", action="store_true",
                   help="as the engine core process does once its engine is built (actors/core.py, settle_gc): "
                        "gc.freeze(), so that the collector never walks the start-up heap again, and a young "
                        "generation collected after 20,000 net allocations instead of 700")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="one more iteration under cProfile: print the top N functions by own time (default: 0, none)")
    p.add_argument("--output", default=None, help="write the record as JSON here (default: no file, the table only)")
    p.set_defaults(func=run_host)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def blocks_per_sequence(args: argparse.Namespace) -> int:
    return -(-(args.input_len + args.output_len) // args.block_size)


def check_args(args: argparse.Namespace) -> str | None:
    for name in ("batch_size", "input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
    if args.warmup_iters < 0 or args.profile < 0:
        return f"--warmup-iters and --profile cannot be negative, got {args.warmup_iters} and {args.profile}"
    if not valid_block_size(args.block_size):
        return f"--block-size must be a power of two in [1, 256], got {args.block_size}"
    if args.max_num_batched_tokens < args.batch_size:
        return (f"--max-num-batched-tokens must be at least --batch-size ({args.batch_size}): a decode step carries "
                f"one token per sequence, got {args.max_num_batched_tokens}")
    longest = ModelConfig.from_dict(PRESETS[args.model], args.model).max_position_embeddings
    if args.input_len + args.output_len > longest:
        return (f"--input-len + --output-len ({args.input_len + args.output_len}) exceed {args.model}'s "
                f"max_position_embeddings ({longest})")
    if args.num_kv_blocks is not None and args.num_kv_blocks < blocks_per_sequence(args):
        return (f"--num-kv-blocks must hold one whole sequence ({blocks_per_sequence(args)} blocks of "
                f"{args.block_size} tokens), got {args.num_kv_blocks}")
    return unwritable(Path(args.output), "--output") if args.output else None


def build_engine(args: argparse.Namespace) -> tuple[LLMEngine, NullRunner | None]:
    """The engine exactly as ``from_engine_args`` builds it, except (with the null runner) that no
    model is built and no KV cache allocated: ``NullRunner`` stands where the device would be.
    With ``--runner device`` it is ``from_engine_args`` itself, dummy weights, and None for the runner."""
    num_blocks = args.num_kv_blocks or args.batch_size * blocks_per_sequence(args)
    engine_args = EngineArgs(
        model=args.model, load_format="dummy", max_model_len=args.input_len + args.output_len,
        block_size=args.block_size, max_num_seqs=args.batch_size, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching, skip_tokenizer_init=True,
        # The null runner is one step ahead as on a GPU; a real runner decides as it would in serving.
        async_scheduling=True if args.runner == "null" else None,
        num_kv_blocks=num_blocks if args.runner == "device" else None,
    )
    if args.runner == "device":
        return LLMEngine.from_engine_args(engine_args), None
    source = resolve_model(engine_args)
    eos_ids = generation_eos_ids(source.directory, source.config)
    runner = NullRunner(source.config.vocab_size, avoid=set(eos_ids))
    max_model_len = args.input_len + args.output_len
    # NullRunner has the interface the engine drives without being a ModelRunner (it has no model).
    engine = LLMEngine(engine_args, source, runner, num_blocks, max_model_len, None, eos_ids)  # type: ignore[arg-type]
    return engine, runner


class GcWatch:
    """Counts the cyclic garbage collector's runs, and their time, while it is installed: a full
    collection walks every object of the process and shows as one very long step."""

    def __init__(self) -> None:
        self.by_generation = [0, 0, 0]
        self.durations: list[float] = []
        self._started = 0.0

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.by_generation[info["generation"]] += 1
            self.durations.append(time.perf_counter() - self._started)

    def summary(self) -> dict[str, Any]:
        return {"collections": len(self.durations), "by_generation": self.by_generation,
                "total_ms": round(1e3 * sum(self.durations), 2),
                "longest_ms": round(1e3 * max(self.durations, default=0.0), 2)}


@attrs.frozen
class TimedStep:
    """One ``engine.step()`` call that launched a step: the loop's own split, and the call's wall time."""

    timing: StepTiming
    wall_s: float


def run_batch(engine: LLMEngine, prompts: list[list[int]], output_len: int, tag: str,
              step: Callable[[], object] | None = None) -> list[TimedStep]:
    """Add the batch, step it to the end; every call that launched a step, in order."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    call = step or engine.step
    timings: list[StepTiming] = []
    engine.step_timings = timings
    steps: list[TimedStep] = []
    try:
        while engine.has_unfinished_requests():
            known = len(timings)
            began = time.perf_counter()
            call()
            wall = time.perf_counter() - began
            # The loop records a timing only for a call that launched a step (the last calls, and
            # any call while nothing could be scheduled, only land one).
            if len(timings) > known:
                steps.append(TimedStep(timings[-1], wall))
    finally:
        engine.step_timings = None
    return steps


def step_kind(timing: StepTiming, batch_size: int) -> str:
    if not timing.decode_only:
        return WITH_PREFILL
    return DECODE_FULL if timing.num_seqs == batch_size else DECODE_PARTIAL


def _us(values: list[float]) -> dict[str, float]:
    return {"p50": round(1e6 * statistics.median(values), 2), "mean": round(1e6 * statistics.fmean(values), 2)}


def summarize(steps: list[TimedStep], batch_size: int) -> dict[str, Any]:
    """Per step kind: the count and the p50 / mean host time (µs) of each part, of the whole call,
    and of the call per sequence in the step."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        mine = [s for s in steps if step_kind(s.timing, batch_size) == kind]
        if not mine:
            continue
        out[kind] = {
            "steps": len(mine),
            "mean_seqs": round(statistics.fmean(s.timing.num_seqs for s in mine), 1),
            "schedule_prepare_us": _us([s.timing.schedule_s for s in mine]),
            "launch_us": _us([s.timing.launch_s for s in mine]),
            "wait_us": _us([s.timing.wait_s for s in mine]),
            "process_us": _us([s.timing.process_s for s in mine]),
            "total_us": _us([s.wall_s for s in mine]),
            "host_us": _us([s.wall_s - s.timing.wait_s for s in mine]),
            "per_seq_us": _us([(s.wall_s - s.timing.wait_s) / s.timing.num_seqs for s in mine]),
        }
    return out


def top_functions(profiler: cProfile.Profile, n: int, steps: int) -> list[dict[str, Any]]:
    """The ``n`` functions with the most own time, as plain records (per step: over ``steps``)."""
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((own, cumulative, calls, f"{_short(filename)}:{line}({name})"))
    rows.sort(reverse=True)
    return [{"function": where, "calls": calls, "own_s": round(own, 6), "cumulative_s": round(cumulative, 6),
             "own_us_per_step": round(1e6 * own / max(steps, 1), 2)} for own, cumulative, calls, where in rows[:n]]


def _short(filename: str) -> str:
    """A path from the package down (``engine/scheduler.py``), or as it is (``~`` for built-ins)."""
    parts = Path(filename).parts
    for top in ("engine", "actors", "bench", "transport"):
        if top in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(top):])
    return filename


def random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def measure(engine: LLMEngine, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """The warm-up and measured iterations: the step table, the collector's runs, the engine's counts."""
    vocab = engine.model_config.vocab_size
    measured: list[TimedStep] = []
    watch = GcWatch()
    before = engine.statistics()
    for i in range(args.warmup_iters + args.num_iters):
        prompts = random_prompts(rng, args.batch_size, args.input_len, vocab)
        warm = i < args.warmup_iters
        if warm:
            steps = run_batch(engine, prompts, args.output_len, f"it{i}")
            before = engine.statistics()
        else:
            with watch:
                steps = run_batch(engine, prompts, args.output_len, f"it{i}")
            measured.extend(steps)
        label = "warm-up" if warm else f"iteration {i - args.warmup_iters + 1}"
        _log(f"[{label}] {len(steps)} steps, {1e3 * sum(s.wall_s for s in steps):.1f} ms of host time")
    after = engine.statistics()
    return {
        "steps": summarize(measured, args.batch_size),
        "gc": watch.summary(),
        "generation_tokens": after.generation_tokens - before.generation_tokens,
        "preemptions": after.num_preemptions - before.num_preemptions,
    }


def profile(engine: LLMEngine, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """One more batch with cProfile on during each ``engine.step()`` call only."""
    profiler = cProfile.Profile()

    def profiled_step() -> object:
        profiler.enable()
        try:
            return engine.step()
        finally:
            profiler.disable()

    prompts = random_prompts(rng, args.batch_size, args.input_len, engine.model_config.vocab_size)
    steps = run_batch(engine, prompts, args.output_len, "profile", profiled_step)
    return {"steps": len(steps), "top_by_own_time": top_functions(profiler, args.profile, len(steps))}


@interruptible("host")
def run_host(args: argparse.Namespace) -> int:
    error = check_args(args)
    if error:
        return fail("host", error)
    try:
        engine, runner = build_engine(args)
    except MiniVllmError as exc:
        return fail("host", str(exc))
    record: dict[str, Any] = {
        "model": args.model,
        "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
        "block_size": args.block_size, "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": args.enable_prefix_caching, "num_kv_blocks": engine.block_manager.num_blocks,
        "num_iters": args.num_iters, "warmup_iters": args.warmup_iters, "freeze_gc": args.freeze_gc,
        "runner": (f"the engine's own ({type(engine.runner).__name__} on {engine.runner.device}, dummy weights)"
                   if runner is None else "NullRunner (no model, no forward pass; made-up tokens at once)"),
        "async_scheduling": engine.async_scheduling,
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(),
        "command": "mini-vllm " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    rng = random.Random(3)  # fresh prompts every iteration: nothing to reuse even with a prefix cache
    threshold = gc.get_threshold()
    if args.freeze_gc:
        settle_gc()
    record["gc_threshold"] = list(gc.get_threshold())
    try:
        record.update(measure(engine, args, rng))
        if args.profile:
            record["profile"] = profile(engine, args, rng)
    finally:
        if args.freeze_gc:
            gc.unfreeze()  # the process may go on (tests call the command in-process)
            gc.set_threshold(*threshold)
        engine.close()
    if runner is not None:
        record["null_runner_rows"] = runner.rows
    print_table(record)
    if args.output:
        failed = write_text("host", Path(args.output), json.dumps(record, indent=2) + "\n")
        if failed is not None:
            return failed
        _log(f"wrote {args.output}")
    return 0


def print_table(record: dict[str, Any]) -> None:
    print(f"host work per step: {record['model']} shapes, batch {record['batch_size']}, {record['input_len']} in / "
          f"{record['output_len']} out, blocks of {record['block_size']}, "
          f"step budget {record['max_num_batched_tokens']}, "
          f"prefix caching {'on' if record['enable_prefix_caching'] else 'off'}; {record['machine']['cpu']}")
    print(f"runner: {record['runner']}")
    print("µs per step, p50 / mean (total: the engine.step() call; wait: blocked on the device's last step; "
          "host: total less wait, and per sequence)")
    parts = ("schedule_prepare_us", "launch_us", "wait_us", "process_us", "total_us", "host_us", "per_seq_us")
    names = ("schedule+prepare", "launch", "wait", "process", "total", "host", "per sequence")
    rows = {kind: [f"{s[k]['p50']:.{2 if k == 'per_seq_us' else 1}f} / {s[k]['mean']:.{2 if k == 'per_seq_us' else 1}f}"
                   for k in parts] for kind, s in record["steps"].items()}
    widths = [2 + max(len(n), *(len(cells[i]) for cells in rows.values())) for i, n in enumerate(names)]
    print(f"{'step kind':<22}{'steps':>6}{'seqs':>6}" + "".join(n.rjust(w) for n, w in zip(names, widths, strict=True)))
    for kind, s in record["steps"].items():
        cells = "".join(c.rjust(w) for c, w in zip(rows[kind], widths, strict=True))
        print(f"{kind:<22}{s['steps']:>6}{s['mean_seqs']:>6.0f}{cells}")
    g = record["gc"]
    print(f"garbage collector during the measured steps: {g['collections']} collections (generation 0/1/2: "
          f"{'/'.join(str(n) for n in g['by_generation'])}), {g['total_ms']:.1f} ms in all, the longest "
          f"{g['longest_ms']:.1f} ms" + (f" (gc.freeze() after start-up, thresholds {tuple(record['gc_threshold'])})"
                                         if record["freeze_gc"] else ""))
    if record["preemptions"]:
        print(f"preemptions: {record['preemptions']}")
    if "profile" in record:
        p = record["profile"]
        print(f"\ntop functions by own time (cProfile, one more iteration of {p['steps']} steps; times inflated by "
              f"the profiler; a collector's run counts against the function whose allocation started it)")
        print(f"{'own µs/step':>12}{'calls':>10}  function")
        for f in p["top_by_own_time"]:
            print(f"{f['own_us_per_step']:>12.1f}{f['calls']:>10}  {f['function']}")
