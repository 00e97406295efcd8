"""The server side's subcommands, ``serve`` and ``generate``: each ``add_X(subparsers)`` defines its
flags and sets ``func``; ``mini_vllm.cli`` registers them beside ``bench``'s.

Every failure is one line on stderr (``mini-vllm CMD: error: ...``) and an exit code from
``transport.flags``; Ctrl-C is exit 130, except a graceful stop of ``serve``, its normal end.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal, TextIO

import attrs
import trio

from mini_vllm.actors.service_config import ServiceConfig
from mini_vllm.transport.flags import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    add_client_api_key,
    add_engine_flags,
    add_sampling_flags,
    api_key,
    api_key_from,
    engine_args_from,
    fraction,
    is_interrupt,
    leaf_exceptions,
    non_negative_float,
    origins,
    port,
    positive_float,
    positive_int,
    sampling_from,
)
from mini_vllm.transport.server import CLIENT_KEYS, DEFAULT_HOST, DEFAULT_PORT, ServerLimits

# Imported lazily below: engine and actors pull in torch (seconds), which `--help` should not pay for.

_CONNECT_TIMEOUT = 10.0  # seconds for generate --url to reach the server (the client's default is 60)
_RESERVED_FDS = 128  # descriptors kept for the process itself (model files, pipes, the loop) beside connections


class CommandError(Exception):
    """A failure the command reports as one line (the message says what to do) and exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# ---- serve ----------------------------------------------------------------------------------------


def add_serve(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve models over WebSockets and HTTP",
        description="Serve one or more models on one port: WebSockets (JSON frames; see docs/protocol.md), "
        "HTTP routes and the browser page at /.",
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="[NAME=]PATH",
        help="a model directory, hub id or preset, optionally named (repeatable; names must differ) "
        "(default: the demo model)",
    )
    limits = attrs.fields(ServerLimits)
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=port, default=DEFAULT_PORT, help="0..65535; 0: any free port (default: %(default)s)")
    p.add_argument("--max-pending-requests", type=positive_int,
                   default=attrs.fields(ServiceConfig).max_pending_per_model.default,
                   help="per model, queued + running, beyond which requests are refused (default: %(default)s)")
    p.add_argument("--max-requests-per-connection", type=positive_int,
                   default=limits.max_requests_per_connection.default,
                   help="requests one connection may have in flight at once (default: %(default)s)")
    p.add_argument("--max-frame-bytes", type=positive_int, default=limits.max_frame_bytes.default,
                   help="larger client frames get an error frame (default: %(default)s)")
    p.add_argument("--slow-client-timeout", type=positive_float, default=limits.slow_client_timeout.default,
                   help="seconds a frame may wait for a client (default: %(default)s)")
    p.add_argument("--max-connections", type=positive_int, default=limits.max_connections.default,
                   help="open connections, HTTP and WebSocket; more are refused with HTTP 503 (default: "
                   "%(default)s; capped to what the open-file limit allows)")
    p.add_argument("--idle-timeout", type=positive_float, default=limits.idle_timeout.default,
                   help="seconds a WebSocket with no request in flight may stay silent before it is "
                   "closed (code 1001), and a keep-alive HTTP connection may wait for its next request "
                   "(default: %(default)s)")
    p.add_argument("--max-header-bytes", type=positive_int, default=limits.max_header_bytes.default,
                   help="an HTTP request head larger than this is refused with 431 (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=positive_int, default=limits.max_body_bytes.default,
                   help="an HTTP request body larger than this is refused with 413 (default: %(default)s)")
    p.add_argument("--api-key", type=api_key, action="append", default=None, metavar="KEY",
                   help="require this key (repeatable: any of them) on every HTTP route but /, /health, "
                   "/version and /metrics, and on every WebSocket: 'Authorization: Bearer KEY', or for "
                   "browsers the subprotocol mini-vllm.bearer.BASE64URL(KEY) (the page does this) "
                   "(default: the environment variable MINI_VLLM_API_KEY if set, else no key)")
    p.add_argument("--allowed-origins", type=origins, action="append", default=None, metavar="ORIGIN[,ORIGIN...]",
                   help="browser origins that may connect beside the server's own http://HOST:PORT, "
                   "comma-separated or repeated: scheme://host[:port], null (pages opened from file://, "
                   "e.g. examples/browser/index.html; also sandboxed frames of any site) or * (any page); "
                   "clients that send no Origin (programs) are always served "
                   "(default: only the server's own origin)")
    p.add_argument("--client-key", choices=CLIENT_KEYS, default=limits.client_key.default,
                   help="who is one client for the fair share of each model's queue: ip (remote address), "
                   "connection (behind a proxy), off (no share) (default: %(default)s)")
    p.add_argument("--client-share", type=fraction, default=limits.client_share.default,
                   help="a client's share of each model's --max-pending-requests (at least "
                   f"{limits.min_client_share.default} requests); beyond it a client is served only while a "
                   "share stays free for others (default: %(default)s)")
    service = attrs.fields(ServiceConfig)
    for flag, field, what in (
        ("--max-n", service.max_n, "samples per request (n)"),
        ("--max-logprobs", service.max_logprobs, "top logprobs per token a request may ask for"),
        ("--max-stop-strings", service.max_stop_strings, "stop strings per request"),
        ("--max-stop-string-chars", service.max_stop_string_chars, "characters per stop string"),
        ("--max-stop-token-ids", service.max_stop_token_ids, "stop_token_ids per request"),
        ("--max-request-tokens", service.max_request_tokens,
         "n x max_tokens of one request (max_tokens counted up to what max_model_len leaves)"),
    ):
        p.add_argument(flag, type=int, default=field.default, metavar="N",
                       help=f"at most this many {what}; more is refused as invalid_request (default: %(default)s)")
    p.add_argument("--shutdown-grace", type=non_negative_float, default=5.0,
                   help="seconds to flush final frames on Ctrl-C (default: %(default)s)")
    p.add_argument("--core-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run each model's engine core in a process of its own, so the event loop that serves "
                   "clients never shares the interpreter with the GPU loop (default: on)")
    p.add_argument("--cpu-threads", type=positive_int, default=None,
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
    from mini_vllm.actors.core import check_model_names
    from mini_vllm.engine import MiniVllmError

    try:
        models = [engine_args_from(args, spec) for spec in (args.model or [None])]
        check_model_names(models)
        config = ServiceConfig(
            max_pending_per_model=args.max_pending_requests, cpu_threads=args.cpu_threads,
            core_process=args.core_process, max_n=args.max_n, max_logprobs=args.max_logprobs,
            max_stop_strings=args.max_stop_strings, max_stop_string_chars=args.max_stop_string_chars,
            max_stop_token_ids=args.max_stop_token_ids, max_request_tokens=args.max_request_tokens,
        )
        limits = ServerLimits(
            max_frame_bytes=args.max_frame_bytes,
            hard_max_frame_bytes=max(16 << 20, args.max_frame_bytes),
            max_requests_per_connection=args.max_requests_per_connection,
            slow_client_timeout=args.slow_client_timeout,
            max_connections=args.max_connections,
            idle_timeout=args.idle_timeout,
            max_header_bytes=args.max_header_bytes,
            max_body_bytes=args.max_body_bytes,
            allowed_origins=tuple(o for group in args.allowed_origins or () for o in group),
            client_key=args.client_key,
            client_share=args.client_share,
        )
        api_keys = _serve_keys(args.api_key)
    except MiniVllmError as exc:
        print(f"mini-vllm serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    limits = _fit_open_file_limit(limits, raise_open_file_limit())
    try:
        return trio.run(_serve, models, config, limits, args.host, args.port, args.shutdown_grace, api_keys)
    except BaseException as exc:  # nurseries wrap errors in groups (a KeyboardInterrupt too): report the leaves
        leaves = leaf_exceptions(exc)
        if is_interrupt(exc):  # Ctrl-C before the signal handler was set
            print("\nmini-vllm serve: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if not all(isinstance(e, MiniVllmError | OSError | KeyboardInterrupt) for e in leaves):
            raise
        for e in leaves:
            if isinstance(e, OSError):
                print(f"mini-vllm serve: error: cannot listen on {args.host}:{args.port}: {_listen_failure(e)}",
                      file=sys.stderr)
            elif isinstance(e, MiniVllmError):
                print(f"mini-vllm serve: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def _serve_keys(flags: list[str] | None) -> tuple[str, ...]:
    """The keys ``serve`` requires: ``--api-key`` (checked while parsing), else MINI_VLLM_API_KEY (checked here)."""
    from mini_vllm.transport.auth import API_KEY_ENV, check_key, keys_from

    keys = keys_from(flags)
    if not flags:
        for key in keys:
            check_key(key, API_KEY_ENV)
    return keys


def raise_open_file_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (every connection is a descriptor; the
    soft limit is often 1024) and say so on stderr. Returns the soft limit now in force (None:
    unlimited, or unknown on this platform)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot always be the soft one (macOS caps it): try a large number, then less.
    targets = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 10240]
    if soft == resource.RLIM_INFINITY or soft >= targets[0]:
        return None if soft == resource.RLIM_INFINITY else soft
    for target in targets:
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        shown = "unlimited" if hard == resource.RLIM_INFINITY else hard
        print(f"mini-vllm: raised the open-file limit from {soft} to {target} (hard limit: {shown})",
              file=sys.stderr, flush=True)
        return target
    print(f"mini-vllm: could not raise the open-file limit above {soft}", file=sys.stderr, flush=True)
    return soft


def _fit_open_file_limit(limits: ServerLimits, open_files: int | None) -> ServerLimits:
    """Cap max_connections below the open-file limit: past it, accept fails (EMFILE) before the
    server can answer 503, and every new client is locked out instead of told."""
    if open_files is None or limits.max_connections <= open_files - _RESERVED_FDS:
        return limits
    fitted = max(1, open_files - _RESERVED_FDS)
    print(f"mini-vllm: --max-connections {limits.max_connections} lowered to {fitted}: the open-file limit is "
          f"{open_files} ({_RESERVED_FDS} kept for the server itself; raise it with ulimit -Hn)",
          file=sys.stderr, flush=True)
    return attrs.evolve(limits, max_connections=fitted)


def _listen_failure(e: OSError) -> str:
    """Why the server could not listen, and what to change."""
    if isinstance(e, socket.gaierror):
        return f"unknown host ({e.strerror}): --host takes an address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
    hints = {
        errno.EADDRINUSE: "the port is in use (another server?): pick another --port, or --port 0 for any free one",
        errno.EADDRNOTAVAIL: "not an address of this machine: check --host (0.0.0.0: every interface)",
        errno.EACCES: "permission denied (ports below 1024 need privileges): pick a --port above 1023",
    }
    return hints.get(e.errno or 0, e.strerror or str(e))


def _exit_after(seconds: float) -> None:
    """The last resort that bounds every shutdown: if this process still runs ``seconds`` from now
    (a step wedged in-process, a peer that never lets go), it exits anyway, and says so. A daemon
    thread, since the event loop may be the thing that is stuck."""

    def exit_anyway() -> None:
        print(f"mini-vllm serve: the shutdown did not finish within {seconds:.0f} s: exiting anyway",
              file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)

    timer = threading.Timer(seconds, exit_anyway)
    timer.daemon = True
    timer.start()


async def _serve(
    models: list[Any], config: Any, limits: ServerLimits, host: str, port: int, grace: float,
    api_keys: Sequence[str] = (),
) -> int:
    """Serve until a signal: the first while serving stops gracefully (exit 0); one while loading,
    or a second one, stops at once (exit 128 + the signal, 130 for Ctrl-C)."""
    from mini_vllm.actors import open_service
    from mini_vllm.transport.server import Server

    progress = _ProgressDisplay(sys.stderr)
    stop = trio.Event()
    forced: int | None = None  # the signal that stopped the server at once
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            serving = False

            async def watch_signals() -> None:
                nonlocal forced
                async for signum in signals:
                    if serving and not stop.is_set():
                        print("\nmini-vllm: stopping (press Ctrl-C again to force) ...", file=sys.stderr, flush=True)
                        stop.set()
                        _exit_after(grace + 2 * config.stop_timeout + 5)
                    else:  # while loading, or a second Ctrl-C: stop now
                        forced = signum
                        what = "while loading the models" if not serving else "before the shutdown finished"
                        print(f"\nmini-vllm serve: interrupted {what}", file=sys.stderr, flush=True)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch_signals)
            nursery.start_soon(progress.tick)
            async with open_service(models, config, on_progress=progress) as service:
                progress.current = None
                server = Server(service, limits, api_keys=api_keys)
                async with trio.open_nursery() as listening:
                    await listening.start(server.run, host, port)
                    serving = True
                    names = ", ".join(m.name for m in service.models())
                    print(f"mini-vllm: serving {names} on {server.url}", flush=True)
                    for line in serve_notes(server):
                        print(f"mini-vllm: {line}", flush=True)
                    await stop.wait()
                    await server.shutdown("the server is shutting down (interrupted)", grace)
                    listening.cancel_scope.cancel()
            print("mini-vllm: stopped", file=sys.stderr, flush=True)
            nursery.cancel_scope.cancel()
    return EXIT_OK if forced is None else 128 + forced  # as shells report a command a signal stopped


def serve_notes(server: Any) -> list[str]:  # server: a running transport.server.Server
    """What ``serve`` says once listening, beside the WebSocket URL: the page's URL, the key rule."""
    from mini_vllm.transport.server import netloc

    notes = []
    host = server.host or ""
    wildcard = host in ("", "0.0.0.0", "::")
    if server.has_page:
        # Nobody browses to the wildcard address; loopback is one of the origins the server allows.
        shown = ("::1" if ":" in host else "127.0.0.1") if wildcard else host
        notes.append(f"browser page: http://{netloc(shown, server.port)}/")
        if wildcard:
            notes.append("from another machine the page's origin is http://NAME:PORT: allow it with "
                         "--allowed-origins http://NAME:PORT")
    if server.keys.enabled:
        notes.append(f"an API key is required ({len(server.keys)} accepted) on every route but /, /health, "
                     "/version and /metrics, and on WebSockets")
    return notes


# ---- generate -------------------------------------------------------------------------------------


def token_ids(text: str) -> tuple[int, ...]:
    """``--prompt-token-ids``: comma-separated token ids (checked against the vocabulary once the model is known)."""
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise argparse.ArgumentTypeError("give at least one token id, e.g. 1,2,3")
    try:
        ids = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids are integers separated by commas, e.g. 1,2,3; got {text!r}") from None
    if any(t < 0 for t in ids):
        raise argparse.ArgumentTypeError(f"token ids are >= 0, got {min(ids)}")
    return ids


def add_generate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a running server (--url) or in-process",
        description="Stream a completion to stdout; usage goes to stderr. The prompt is PROMPT (text), "
        "--prompt-token-ids or --random-prompt-len: exactly one. A model without a tokenizer (the "
        "presets) takes token ids and prints token ids.",
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                        help="the text to complete (default: none; give it or one of the two below)")
    prompt.add_argument("--prompt-token-ids", type=token_ids, default=None, metavar="ID,ID,...",
                        help="the prompt as comma-separated token ids (default: none)")
    prompt.add_argument("--random-prompt-len", type=positive_int, default=None, metavar="N",
                        help="a prompt of N random token ids, drawn with --seed (default: none; seed 0)")
    p.add_argument("--url", default=None, help="a running server, ws://HOST:PORT (default: none, run in-process)")
    add_client_api_key(p)
    p.add_argument(
        "--model",
        default=None,
        help="with --url: the served model's name; without: a model directory, hub id or preset "
        "(default: the server's only model / the demo model)",
    )
    p.add_argument("--chat", action="store_true",
                   help="send PROMPT as a user message through the chat template (default: off)")
    add_sampling_flags(p)
    add_engine_flags(p, seed=False)
    p.set_defaults(func=run_generate)


@attrs.frozen
class PromptSpec:
    """What ``generate`` was asked to complete: text, token ids, or a length of random ids."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    random_len: int | None = None
    seed: int = 0  # for random ids

    def ids(self, vocab_size: int, max_model_len: int, model: str) -> list[int]:
        """The token-id prompt, checked against (or drawn from) ``model``'s vocabulary."""
        if self.random_len is not None:
            if self.random_len >= max_model_len:  # refused before a list of that length is built
                raise CommandError(
                    f"--random-prompt-len {self.random_len}: {model!r} takes prompts of at most "
                    f"{max_model_len - 1} tokens (max_model_len {max_model_len}, one left to generate)",
                    EXIT_USAGE,
                )
            rng = random.Random(self.seed)
            return [rng.randrange(vocab_size) for _ in range(self.random_len)]
        ids = list(self.token_ids or ())
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise CommandError(
                f"--prompt-token-ids: {bad[0]} is not a token of {model!r}, whose ids are 0..{vocab_size - 1}",
                EXIT_USAGE,
            )
        return ids


def _no_tokenizer(model: str | None) -> CommandError:
    return CommandError(
        f"{'the model' if model is None else f'model {model!r}'} has no tokenizer (a preset is shapes only), "
        "so it cannot take a text PROMPT: "
        "give token ids with --prompt-token-ids 1,2,3 or --random-prompt-len N",
        EXIT_USAGE,
    )


# Control characters a terminal would act on (ESC starts escape sequences, BEL rings, CR rewrites
# the line), C1 included: written as \xNN. Newline and tab are layout, kept.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c not in (0x09, 0x0A)}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS)


@attrs.define
class _Output:
    """Sample 0 on stdout: text, with control characters escaped on a terminal (a random-weights
    model emits ESC and BEL) and written unchanged to a pipe or file; or token ids for a model
    without a tokenizer. ``auto`` (a remote model that may lack one): ids are held until text
    arrives, and written at the end if none ever does."""

    stream: TextIO
    mode: Literal["text", "ids", "auto"] = "text"
    escape: bool = attrs.field(init=False)
    open_line: bool = False  # written, no newline yet
    held: list[int] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.escape = self.stream.isatty()

    def write(self, text: str, ids: Sequence[int]) -> None:
        if self.mode == "auto":
            if not text:
                self.held.extend(ids)
                return
            self.mode, self.held = "text", []
        if self.mode == "ids":
            self._put(" ".join(map(str, ids)), sep=" ")
        else:
            self._put(escape_controls(text) if self.escape else text)

    def end(self) -> None:
        if self.mode == "auto" and self.held:
            self.mode = "ids"
            self.write("", self.held)
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False

    def _put(self, text: str, sep: str = "") -> None:
        if text:
            self.stream.write((sep if self.open_line else "") + text)
            self.stream.flush()
            self.open_line = True


def run_generate(args: argparse.Namespace) -> int:
    from mini_vllm.engine import MiniVllmError

    if args.chat and args.prompt is None:
        return _fail("--chat sends a text PROMPT as a user message; it cannot take token ids", None, EXIT_USAGE)
    if args.url:
        from mini_vllm.transport.client import InvalidURL, check_url

        try:
            check_url(args.url)
        except InvalidURL as exc:
            return _fail(f"--url: {exc}", None, EXIT_USAGE)
    prompt = PromptSpec(args.prompt, args.prompt_token_ids, args.random_prompt_len, args.sampling_seed or 0)
    sampling = sampling_from(args)
    out = _Output(sys.stdout)
    try:
        if args.url:
            key = api_key_from(args)
            return trio.run(_generate_remote, args.url, prompt, args.model, args.chat, sampling, out, key)
        return _generate_local(args, prompt, sampling, out)
    except BaseException as exc:  # a group from trio.run may hold a KeyboardInterrupt
        if is_interrupt(exc):
            return _fail("interrupted", out, EXIT_INTERRUPTED, prefix="")
        if isinstance(exc, CommandError):
            return _fail(str(exc), out, exc.code)
        if isinstance(exc, MiniVllmError):
            return _fail(str(exc), out)
        raise


def _fail(message: str, out: _Output | None, code: int = EXIT_ERROR, prefix: str = "error: ") -> int:
    if out is not None:
        out.end()  # finish the output's line first, so the message starts one
    print(f"mini-vllm generate: {prefix}{message}", file=sys.stderr)
    return code


async def _generate_remote(
    url: str, prompt: PromptSpec, model: str | None, chat: bool, sampling: dict[str, Any], out: _Output,
    api_key: str | None = None,
) -> int:
    from mini_vllm.transport.client import ClientError, InvalidRequestError, connect

    try:
        # api_key None: connect reads MINI_VLLM_API_KEY itself (as --api-key's default does).
        async with connect(url, connect_timeout=_CONNECT_TIMEOUT, api_key=api_key) as client:
            if prompt.text is None:
                info = _served_model(await client.models(), model)
                ids = prompt.ids(info.vocab_size, info.max_model_len, info.name)
                stream = client.generate(ids, model=model, **sampling)
                # The server does not say whether a model has a tokenizer; one with a chat template has.
                out.mode = "text" if info.has_chat_template else "auto"
            elif chat:
                stream = client.chat([{"role": "user", "content": prompt.text}], model=model, **sampling)
            else:
                stream = client.generate(prompt.text, model=model, **sampling)
            async with stream:
                async for delta in stream:
                    if delta.index != 0:
                        continue
                    out.write(delta.text, delta.token_ids)
                    if delta.finish_reason is not None and delta.usage is not None:
                        out.end()
                        _report(delta.finish_reason, delta.usage.prompt_tokens, delta.usage.completion_tokens)
    except InvalidRequestError as exc:
        if "no tokenizer" in exc.message:
            return _fail(str(_no_tokenizer(model)), out, EXIT_USAGE)
        return _fail(str(exc), out)
    except CommandError as exc:
        return _fail(str(exc), out, exc.code)
    except ClientError as exc:
        return _fail(str(exc), out)
    return EXIT_OK


def _served_model(models: Sequence[Any], name: str | None) -> Any:  # -> protocol.ModelInfo
    names = ", ".join(m.name for m in models)
    if name is None:
        if len(models) == 1:
            return models[0]
        raise CommandError(f"the server serves several models ({names}): pick one with --model NAME", EXIT_USAGE)
    for m in models:
        if m.name == name:
            return m
    raise CommandError(f"the server has no model {name!r}; it serves: {names} (pick one with --model)", EXIT_USAGE)


def _generate_local(args: argparse.Namespace, prompt: PromptSpec, sampling: dict[str, Any], out: _Output) -> int:
    from mini_vllm.engine import LLMEngine, SamplingParams
    from mini_vllm.engine.config import PRESETS

    engine_args = engine_args_from(args, args.model)
    params = SamplingParams.from_dict(sampling)  # a bad sampling flag fails before the model loads
    if prompt.text is not None and engine_args.model in PRESETS:
        raise _no_tokenizer(engine_args.model)  # known before loading: presets never have one
    engine = LLMEngine.from_engine_args(engine_args)
    if args.chat:
        ids = engine.apply_chat_template([{"role": "user", "content": prompt.text}])
    elif prompt.text is not None:
        if engine.tokenizer is None:
            raise _no_tokenizer(engine.name)
        ids = engine.tokenize(prompt.text)
    else:
        ids = prompt.ids(engine.model_config.vocab_size, engine.max_model_len, engine.name)
    out.mode = "text" if engine.tokenizer is not None else "ids"
    engine.add_request("cli-0", ids, params)
    completion = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for s in delta.samples:
                if s.index != 0:
                    continue
                out.write(s.text, s.token_ids)
                completion += len(s.token_ids)
                if s.finish_reason is not None:
                    out.end()
                    _report(s.finish_reason, delta.num_prompt_tokens, completion)
    return EXIT_OK


def _report(finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
    print(
        f"[finish_reason={finish_reason} prompt_tokens={prompt_tokens} completion_tokens={completion_tokens}]",
        file=sys.stderr,
    )
