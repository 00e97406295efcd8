"""Streamed text deltas add up to decoding the whole output; stop strings never leak."""

from __future__ import annotations

import pytest

from mini_vllm.engine.demo_model import build_byte_tokenizer
from mini_vllm.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def stream(tok, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, tok.encode("prompt: "), stop)
    deltas = []
    for i in ids:
        d.add_tokens([i])
        deltas.append(d.take(final=False))
        if d.stopped_by:
            break
    d.finish()
    deltas.append(d.take(final=True))
    return deltas, d


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🎉🚀 mixed ü", "a\nb\tc"])
def test_deltas_concatenate_to_full_decode(tok, text: str) -> None:
    deltas, _ = stream(tok, text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas), "no replacement character mid-stream"


def test_multibyte_character_is_never_split(tok) -> None:
    deltas, _ = stream(tok, "🎉")  # four byte tokens, one character
    assert [d for d in deltas if d] == ["🎉"]


def test_stop_string_is_stripped_and_never_partially_emitted(tok) -> None:
    deltas, d = stream(tok, "hello STOP world", stop=("STOP",))
    assert "".join(deltas) == "hello "
    assert d.stopped_by == "STOP"
    for delta in deltas:
        assert "S" not in delta


def test_held_back_text_is_released_when_it_is_not_a_stop(tok) -> None:
    deltas, d = stream(tok, "a STAR is born", stop=("STOP",))
    assert d.stopped_by is None
    assert "".join(deltas) == "a STAR is born"


def test_earliest_stop_string_wins(tok) -> None:
    deltas, d = stream(tok, "x END y HALT", stop=("HALT", "END"))
    assert "".join(deltas) == "x "
    assert d.stopped_by == "END"
