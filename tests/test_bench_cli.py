"""What every ``mini-vllm bench`` subcommand shares: help that states each option's default,
results in the current directory (never a docs/ tree), bad paths as one-line errors, and Ctrl-C as
exit 130 with one line instead of a traceback."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from mini_vllm import cli
from mini_vllm.bench import attention as bench_attention
from mini_vllm.bench import latency as bench_latency
from mini_vllm.bench import memory as bench_memory
from mini_vllm.bench import serve as bench_serve
from mini_vllm.bench import throughput as bench_throughput
from mini_vllm.bench.command import HelpFormatter, unwritable
from mini_vllm.transport.flags import EXIT_INTERRUPTED

pytestmark = pytest.mark.timeout(120)

COMMANDS = ("throughput", "attention", "memory", "latency", "serve", "plot")
MEMORY_FLAGS = [
    "--num-requests", "8", "--pool-tokens", "8192", "--prefix-requests", "4", "--prefix-len", "64",
    "--suffix-min", "4", "--suffix-max", "20", "--prefix-max-tokens", "8", "--fork-requests", "2", "--fork-n", "2",
    "--block-sizes", "16",
]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    bench = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    return next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_states_its_default(command: str) -> None:
    parser = _subparsers()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS or action.required:
            continue  # positionals, --help, a required --output: nothing to default
        text = formatter._expand_help(action)  # type: ignore[attr-defined]
        assert "default" in text, (command, action.option_strings, text)
        assert "default: None" not in text and "default: )" not in text, (command, action.option_strings, text)
    assert "default" in parser.format_help()


def test_the_formatter_says_on_off_and_lists_as_typed() -> None:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--flag", action="store_true", help="a flag")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="sizes")
    parser.add_argument("--share", type=float, default=0.5, help="a share in %%")
    parser.add_argument("--where", default=None, help="where (default: the current directory)")
    text = " ".join(parser.format_help().split())
    assert "a flag (default: off)" in text and "sizes (default: 8 16)" in text and "a share in % (default: 0.5)" in text
    assert "where (default: the current directory)" in text and "None" not in text


# ---- results in the current directory -------------------------------------------------------------


def test_memory_writes_into_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # no picture: JSON only, quicker
    assert cli.main(["bench", "memory", *MEMORY_FLAGS]) == 0
    (out,) = tmp_path.iterdir()
    assert out.name == f"memory-{time.strftime('%Y%m%d', time.gmtime())}.json"
    assert json.loads(out.read_text())["benchmark"] == "memory"


def test_serve_writes_into_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = tmp_path / "data" / "d.jsonl"
    dataset.parent.mkdir()
    dataset.write_text(json.dumps({"prompt_token_ids": [5, 6, 7], "max_tokens": 3}) + "\n")
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "serve", "--dataset", str(dataset), "--warmup-requests", "0", "--connections", "1",
            "--max-model-len", "256", "--label", "cwd run"]
    assert cli.main(argv) == 0
    (out,) = (p for p in tmp_path.iterdir() if p.name != "data")
    assert out.name.startswith("serve-cwd-run-") and out.suffix == ".json"
    assert json.loads(out.read_text())["label"] == "cwd run"


def test_latency_writes_nothing_without_output(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "latency", "--model", "demo", "--input-len", "8", "--output-len", "4", "--num-iters", "1",
            "--warmup-iters", "0"]
    assert cli.main(argv) == 0
    assert "TPOT" in capsys.readouterr().out and list(tmp_path.iterdir()) == []


# ---- bad paths -------------------------------------------------------------------------------------------


def test_unwritable_names_the_flag_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    assert unwritable(tmp_path / "new" / "deeper" / "x.json", "--output") is None  # folders are made later
    assert unwritable(tmp_path, "--output") == f"--output {tmp_path} is a folder: give a file name"
    assert unwritable(tmp_path / "f" / "x.json", "--output") == (
        f"--output {tmp_path / 'f' / 'x.json'}: {tmp_path / 'f'} is a file, not a folder: choose another path")
    assert unwritable(tmp_path / "f", "--output-dir", folder=True) == f"--output-dir {tmp_path / 'f'} is a file: give a folder"
    assert unwritable(tmp_path / "new", "--output-dir", folder=True) is None
    assert not (tmp_path / "new").exists()


def _run_command(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code or 0)


def test_bad_output_paths_are_one_line_errors_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("")
    record = tmp_path / "r.json"
    record.write_text(json.dumps({"benchmark": "serve", "label": "x", "model": "m", "workload": "w", "runs": []}))
    cases = [
        (["memory", *MEMORY_FLAGS, "--output", "f/x.json"], "--output f/x.json: f is a file, not a folder"),
        (["memory", *MEMORY_FLAGS, "--output", "."], "--output . is a folder: give a file name"),
        (["memory", *MEMORY_FLAGS, "--plot", "f/x.png"], "--plot f/x.png: f is a file, not a folder"),
        (["latency", "--model", "demo", "--output", "f/x.json"], "--output f/x.json: f is a file, not a folder"),
        (["serve", "--url", "ws://127.0.0.1:1", "--output", "f/x.json"], "f is a file, not a folder"),
        (["serve", "--url", "ws://127.0.0.1:1", "--output", "/"], "--output / is a folder: give a file name"),
        (["serve", "--url", "ws://127.0.0.1:1", "--sweep", "--plot", "f/x.png"], "f is a file, not a folder"),
        (["serve", "--url", "localhost:8000"], "--url must be ws://HOST:PORT (or wss://), got 'localhost:8000'"),
        (["plot", str(record), "--output", "f/x.png"], "--output f/x.png: f is a file, not a folder"),
        (["throughput", "--num-requests", "1", "--output-dir", "f"], "--output-dir f is a file: give a folder"),
        (["attention", "--heads", "6", "--kv-heads", "4"], "--kv-heads (4) must divide --heads (6)"),
        (["attention", "--batch", "0"], "--batch must be at least 1, got 0"),
        (["attention"], "needs a CUDA GPU"),
    ]
    for argv, message in cases:
        assert _run_command(["bench", *argv]) == 2, argv
        captured = capsys.readouterr()
        [line] = captured.err.splitlines()
        assert line.startswith(f"mini-vllm bench {argv[0]}: error: ") and message in line, (argv, line)
        assert captured.out == "", argv  # refused before any run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "r.json"]


def test_a_failed_write_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)

    def refuse(self: Path, *args: Any, **kwargs: Any) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", refuse)
    assert cli.main(["bench", "memory", *MEMORY_FLAGS, "--output", "x.json"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line == "mini-vllm bench memory: error: cannot write x.json: Permission denied"


# ---- Ctrl-C --------------------------------------------------------------------------------------------------


def _interrupt(*_: Any, **__: Any) -> Any:
    raise KeyboardInterrupt


async def _interrupt_in_a_nursery(*_: Any, **__: Any) -> Any:
    async def interrupted() -> None:
        raise KeyboardInterrupt

    async with trio.open_nursery() as nursery:  # which delivers it inside an exception group
        nursery.start_soon(interrupted)


@pytest.mark.parametrize(
    "argv,module,name,raise_",
    [
        (["throughput", "--num-requests", "1"], bench_throughput, "load_engine", _interrupt),
        (["attention"], bench_attention, "check_args", _interrupt),
        (["memory", *MEMORY_FLAGS], bench_memory, "run_memory", _interrupt),
        (["latency", "--model", "demo"], bench_latency, "load_engine", _interrupt),
        (["serve", "--url", "ws://127.0.0.1:1"], bench_serve, "_bench", _interrupt_in_a_nursery),
        (["plot", "r.json", "--output", "x.png"], bench_serve, "plot_sweeps", _interrupt),
    ],
)
def test_ctrl_c_is_exit_130_with_one_line(
    argv: list[str], module: Any, name: str, raise_: Callable[..., Any], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_text(json.dumps({"benchmark": "serve", "model": "m", "workload": "w", "runs": []}))
    monkeypatch.setattr(module, name, raise_)
    assert cli.main(["bench", *argv]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.splitlines()[-1] == f"mini-vllm bench {argv[0]}: interrupted"


def test_other_exception_groups_are_not_taken_for_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    async def fail(*_: Any) -> Any:
        raise BaseExceptionGroup("trio", [RuntimeError("boom")])

    monkeypatch.setattr(bench_serve, "_bench", fail)
    with pytest.raises(BaseExceptionGroup):
        cli.main(["bench", "serve", "--url", "ws://127.0.0.1:1"])


def test_sigint_during_a_run_exits_130_without_a_traceback(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """A real Ctrl-C: SIGINT to ``bench throughput`` while the actors (trio, an executor thread) stream."""
    model = tiny_model("LlamaForCausalLM", max_position_embeddings=2048)
    argv = [sys.executable, "-m", "mini_vllm", "bench", "throughput", "--model", str(model), "--num-requests", "64",
            "--path", "actors"]
    proc = subprocess.Popen(argv, cwd=tmp_path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("[actors]"):  # the first tokens streamed: the run is under way
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == EXIT_INTERRUPTED, "".join(seen) + rest
    assert rest.strip() == "mini-vllm bench throughput: interrupted", rest  # after a new line, for the ^C
    assert list(tmp_path.iterdir()) == []
