"""``generate``'s prompts as token ids (for models without a tokenizer, such as the presets) and
what it writes: token ids without a tokenizer, control characters escaped on a terminal."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest_serving import Reference, build_engine, greedy, running_server

from mini_vllm import cli
from mini_vllm.engine import LLMEngine
from mini_vllm.transport import commands, flags

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def reference(demo_model_dir: Path) -> Reference:
    return Reference(demo_model_dir)


def _local(demo_model_dir: Path, *argv: str) -> list[str]:
    return ["generate", *argv, "--model", str(demo_model_dir), "--num-kv-blocks", "64", "--max-tokens", "6",
            "--temperature", "0", "--ignore-eos"]  # fmt: skip


@pytest.fixture
def no_tokenizer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Engines built in-process lose their tokenizer, as a preset's (which take seconds to build) have none."""
    build = LLMEngine.from_engine_args

    def without(args: Any) -> LLMEngine:
        engine = build(args)
        engine.tokenizer = None
        return engine

    monkeypatch.setattr(LLMEngine, "from_engine_args", without)
    yield


def test_prompt_token_ids_in_process(
    demo_model_dir: Path, reference: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = reference.tokenizer.encode("Hello")
    assert cli.main(_local(demo_model_dir, "--prompt-token-ids", ",".join(map(str, ids)))) == flags.EXIT_OK
    out, err = capsys.readouterr()
    assert out == reference(ids, **greedy(6)).text + "\n"  # a tokenizer: text, as for a text prompt
    assert f"prompt_tokens={len(ids)}" in err


def test_without_a_tokenizer_token_ids_go_in_and_come_out(
    demo_model_dir: Path, reference: Reference, no_tokenizer: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(_local(demo_model_dir, "--prompt-token-ids", "1, 2,3")) == flags.EXIT_OK
    out, err = capsys.readouterr()
    assert out == " ".join(map(str, reference([1, 2, 3], **greedy(6)).token_ids)) + "\n"
    assert "prompt_tokens=3 completion_tokens=6" in err


def test_random_prompts_are_seeded(
    demo_model_dir: Path, no_tokenizer: None, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = []
    for seed in ("1", "1", "2"):
        assert cli.main([*_local(demo_model_dir, "--random-prompt-len", "7"), "--seed", seed]) == flags.EXIT_OK
        out, err = capsys.readouterr()
        assert "prompt_tokens=7" in err
        runs.append(out)
    assert runs[0] == runs[1] != runs[2]
    spec = commands.PromptSpec(random_len=50, seed=3)
    ids = spec.ids(259, 4096, "demo")
    assert ids == spec.ids(259, 4096, "demo") and all(0 <= t < 259 for t in ids)
    with pytest.raises(commands.CommandError, match="at most 49 tokens"):
        spec.ids(259, 50, "demo")  # no room left to generate


def test_a_text_prompt_for_a_model_without_a_tokenizer_is_a_clear_error(
    demo_model_dir: Path, no_tokenizer: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(_local(demo_model_dir, "Hello")) == flags.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no tokenizer" in err and "--prompt-token-ids" in err


def test_a_preset_with_a_text_prompt_is_refused_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "Hello", "--model", "qwen3-0.6b"]) == flags.EXIT_USAGE
    assert "'qwen3-0.6b' has no tokenizer" in capsys.readouterr().err


def test_token_ids_are_checked(demo_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad, message in [("1,x", "integers separated by commas"), (",", "at least one"), ("3,-1", ">= 0")]:
        with pytest.raises(SystemExit):
            cli.main(["generate", "--prompt-token-ids", bad])
        assert message in capsys.readouterr().err
    assert cli.main(_local(demo_model_dir, "--prompt-token-ids", "1,100000")) == flags.EXIT_USAGE
    assert f"100000 is not a token of {demo_model_dir.name!r}, whose ids are 0..258" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # exactly one prompt
        cli.main(["generate", "Hello", "--random-prompt-len", "3"])
    assert "not allowed with" in capsys.readouterr().err
    assert cli.main(["generate", "--chat", "--prompt-token-ids", "1"]) == flags.EXIT_USAGE
    assert "--chat" in capsys.readouterr().err


async def test_token_id_prompts_against_a_server(
    demo_model_dir: Path, reference: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = build_engine(demo_model_dir)
    async with running_server([engine]) as (_, server):
        code = await commands._generate_remote(
            server.url, commands.PromptSpec(token_ids=(1, 2, 3)), None, False, greedy(6), commands._Output(sys.stdout)
        )
        assert code == flags.EXIT_OK
        assert capsys.readouterr().out == reference([1, 2, 3], **greedy(6)).text + "\n"
        code = await commands._generate_remote(
            server.url, commands.PromptSpec(token_ids=(5, 999)), None, False, greedy(6), commands._Output(sys.stdout)
        )
        assert code == flags.EXIT_USAGE and "999 is not a token of 'demo'" in capsys.readouterr().err
    engine = build_engine(demo_model_dir)
    engine.tokenizer = None  # now like a preset: ids come back as ids; text prompts are refused
    async with running_server([engine]) as (_, server):
        code = await commands._generate_remote(
            server.url, commands.PromptSpec(random_len=4), None, False, greedy(6), commands._Output(sys.stdout)
        )
        out, err = capsys.readouterr()
        assert code == flags.EXIT_OK and "prompt_tokens=4" in err
        assert len(out.split()) == 6 and all(t.isdigit() for t in out.split())
        code = await commands._generate_remote(
            server.url, commands.PromptSpec("Hello"), None, False, greedy(6), commands._Output(sys.stdout)
        )
        assert code == flags.EXIT_USAGE and "--prompt-token-ids" in capsys.readouterr().err


# ---- control characters -----------------------------------------------------------------------


def test_escape_controls() -> None:
    assert (
        commands.escape_controls("a\x1b[31mb\x07\r\n\tc\x00\x7f\x9b é 日")
        == "a\\x1b[31mb\\x07\\x0d\n\tc\\x00\\x7f\\x9b é 日"
    )
    assert commands.escape_controls("plain text\n") == "plain text\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_output_escapes_on_a_terminal_only() -> None:
    raw = "ok\x1b]0;pwned\x07\n"
    tty, pipe = _Terminal(), io.StringIO()
    for stream in (tty, pipe):
        out = commands._Output(stream)
        out.write(raw, [1])
        out.end()
    assert tty.getvalue() == "ok\\x1b]0;pwned\\x07\n\n"
    assert pipe.getvalue() == raw + "\n"
