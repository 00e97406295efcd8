"""The server side's subcommands, ``serve`` and ``generate``: each ``add_X(subparsers)`` defines its
flags and sets ``func``; ``mini_vllm.cli`` registers them beside ``bench``'s.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from mini_vllm.transport.flags import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    add_engine_flags,
    add_sampling_flags,
    engine_args_from,
    sampling_from,
)
from mini_vllm.transport.server import DEFAULT_HOST, DEFAULT_PORT, ServerLimits

# Imported lazily below: engine and actors pull in torch (seconds), which `--help` should not pay for.

BROWSER_PAGE = Path(__file__).resolve().parent.parent / "examples" / "browser" / "index.html"


# ---- serve ----------------------------------------------------------------------------------------


def add_serve(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve models over WebSockets",
        description="Serve one or more models over WebSockets (JSON frames; see docs/protocol.md).",
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="[NAME=]PATH",
        help="a model directory, hub id or preset, optionally named (repeatable); default: the demo model",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--max-pending-requests", type=int, default=256, help="per model, queued + running (admission)")
    p.add_argument("--max-requests-per-connection", type=int, default=64)
    p.add_argument("--max-frame-bytes", type=int, default=1 << 20)
    p.add_argument("--slow-client-timeout", type=float, default=30.0, help="seconds a frame may wait for a client")
    p.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds to flush final frames on Ctrl-C")
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads for models on the CPU (default: cores - 1, a core for the event loop)")
    add_engine_flags(p)
    p.set_defaults(func=run_serve)


@attrs.define
class _ProgressDisplay:
    """Model-loading progress on stderr: a live timer on a terminal, plain lines otherwise."""

    out: TextIO
    current: str | None = None
    started: float = 0.0

    def __call__(self, event: Any) -> None:  # an actors.LoadProgress
        prefix = f"[{event.index + 1}/{event.total}] {event.model}"
        if event.phase == "loading":
            self.current, self.started = prefix, time.monotonic()
            self._write(f"{prefix}: loading (KV: {event.kv_rule}) ...", final=not self.out.isatty())
        else:
            self.current = None
            self._write(f"{prefix}: loaded in {event.seconds:.1f} s", final=True)

    def _write(self, text: str, final: bool) -> None:
        if self.out.isatty():
            self.out.write("\r\x1b[K" + text + ("\n" if final else ""))
        else:
            self.out.write(text + "\n")
        self.out.flush()

    async def tick(self) -> None:
        if not self.out.isatty():
            return
        while True:
            await trio.sleep(0.25)
            if self.current is not None:
                self._write(f"{self.current}: loading ... {time.monotonic() - self.started:.1f} s", final=False)


def run_serve(args: argparse.Namespace) -> int:
    from mini_vllm.actors import ServiceConfig
    from mini_vllm.engine import MiniVllmError

    try:
        models = [engine_args_from(args, spec) for spec in (args.model or [None])]
        config = ServiceConfig(max_pending_per_model=args.max_pending_requests, cpu_threads=args.cpu_threads)
        limits = ServerLimits(
            max_frame_bytes=args.max_frame_bytes,
            hard_max_frame_bytes=max(16 << 20, args.max_frame_bytes),
            max_requests_per_connection=args.max_requests_per_connection,
            slow_client_timeout=args.slow_client_timeout,
        )
    except MiniVllmError as exc:
        print(f"mini-vllm serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        trio.run(_serve, models, config, limits, args.host, args.port, args.shutdown_grace)
    except (Exception, KeyboardInterrupt) as exc:  # nurseries wrap errors in groups: report the leaves
        leaves = _leaves(exc)
        if all(isinstance(e, KeyboardInterrupt) for e in leaves):  # Ctrl-C before the handler was set
            return EXIT_OK
        if not all(isinstance(e, MiniVllmError | OSError | KeyboardInterrupt) for e in leaves):
            raise
        for e in leaves:
            if isinstance(e, OSError):
                print(f"mini-vllm serve: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
            elif isinstance(e, MiniVllmError):
                print(f"mini-vllm serve: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _leaves(exc: BaseException) -> list[BaseException]:
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]


async def _serve(models: list[Any], config: Any, limits: ServerLimits, host: str, port: int, grace: float) -> None:
    from mini_vllm.actors import open_service
    from mini_vllm.transport.server import Server

    progress = _ProgressDisplay(sys.stderr)
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            serving = False

            async def watch_signals() -> None:
                async for _ in signals:
                    if serving and not stop.is_set():
                        print("\nmini-vllm: stopping (press Ctrl-C again to force) ...", file=sys.stderr, flush=True)
                        stop.set()
                    else:  # while loading, or a second Ctrl-C: stop now
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch_signals)
            nursery.start_soon(progress.tick)
            async with open_service(models, config, on_progress=progress) as service:
                progress.current = None
                server = Server(service, limits)
                async with trio.open_nursery() as listening:
                    await listening.start(server.run, host, port)
                    serving = True
                    names = ", ".join(m.name for m in service.models())
                    print(f"mini-vllm: serving {names} on {server.url}", flush=True)
                    if BROWSER_PAGE.is_file():
                        print(f"mini-vllm: browser page: {BROWSER_PAGE.as_uri()}?server={server.url}", flush=True)
                    await stop.wait()
                    await server.shutdown("the server is shutting down (interrupted)", grace)
                    listening.cancel_scope.cancel()
            print("mini-vllm: stopped", file=sys.stderr, flush=True)
            nursery.cancel_scope.cancel()


# ---- generate -------------------------------------------------------------------------------------


def add_generate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a running server (--url) or in-process",
        description="Stream a completion of PROMPT to stdout; usage goes to stderr.",
    )
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--url", default=None, help="a running server (ws://HOST:PORT); default: run in-process")
    p.add_argument(
        "--model",
        default=None,
        help="with --url: the served model's name; without: a model directory, hub id or preset (default: demo)",
    )
    p.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    add_sampling_flags(p)
    add_engine_flags(p, seed=False)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from mini_vllm.engine import MiniVllmError

    sampling = sampling_from(args)
    try:
        if args.url:
            return trio.run(_generate_remote, args.url, args.prompt, args.model, args.chat, sampling)
        return _generate_local(args, sampling)
    except MiniVllmError as exc:
        print(f"\nmini-vllm generate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nmini-vllm generate: interrupted", file=sys.stderr)
        return EXIT_OK


async def _generate_remote(url: str, prompt: str, model: str | None, chat: bool, sampling: dict[str, Any]) -> int:
    from mini_vllm.transport.client import ClientError, connect

    try:
        async with connect(url) as client:
            if chat:
                stream = client.chat([{"role": "user", "content": prompt}], model=model, **sampling)
            else:
                stream = client.generate(prompt, model=model, **sampling)
            async with stream:
                async for delta in stream:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
                    if delta.finish_reason is not None and delta.usage is not None:
                        _report(delta.finish_reason, delta.usage.prompt_tokens, delta.usage.completion_tokens)
    except ClientError as exc:
        print(f"\nmini-vllm generate: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _generate_local(args: argparse.Namespace, sampling: dict[str, Any]) -> int:
    from mini_vllm.engine import LLMEngine, SamplingParams

    engine = LLMEngine.from_engine_args(engine_args_from(args, args.model))
    params = SamplingParams.from_dict(sampling)
    if args.chat:
        ids = engine.apply_chat_template([{"role": "user", "content": args.prompt}])
    else:
        ids = engine.tokenize(args.prompt)
    engine.add_request("cli-0", ids, params)
    completion = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for s in delta.samples:
                if s.index != 0:
                    continue
                sys.stdout.write(s.text)
                sys.stdout.flush()
                completion += len(s.token_ids)
                if s.finish_reason is not None:
                    _report(s.finish_reason, delta.num_prompt_tokens, completion)
    return EXIT_OK


def _report(finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(
        f"[finish_reason={finish_reason} prompt_tokens={prompt_tokens} completion_tokens={completion_tokens}]",
        file=sys.stderr,
    )
