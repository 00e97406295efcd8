"""Prompts to token ids for one model: plain text through its tokenizer, chat messages through its
chat template. The engine uses it, and so does a frontend that has the tokenizer but not the model
(the server, whose engine core runs in another process).

It also holds the checks that need the model but not its weights (vocabulary size, max_model_len):
a frontend runs them before a request reaches the engine core, where a token id outside the
vocabulary would fail the step of every request in the batch, not just its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mini_vllm.engine.errors import InvalidRequest
from mini_vllm.engine.sampling_params import SamplingParams, lone_surrogate, show_value


class PromptEncoder:
    def __init__(self, model: str, tokenizer: Any, max_model_len: int, vocab_size: int) -> None:
        self.model = model
        self.tokenizer = tokenizer  # None for a dummy preset: token-id prompts only
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest(f"model {self.model!r} has no tokenizer (dummy preset): send prompt_token_ids")
        _check_text(prompt, "prompt")  # the tokenizer's own error for these is a bare TypeError
        return list(self.tokenizer.encode(prompt))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise InvalidRequest(f"model {self.model!r} has no chat template: use a plain prompt")
        check_messages(messages)
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors from a template that rejects these messages
            raise InvalidRequest(f"the chat template rejected the messages: {exc}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def check_prompt(self, prompt_token_ids: Sequence[object]) -> None:
        """The prompt fits the model: not empty, shorter than max_model_len, ids in the vocabulary."""
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty: give at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(prompt_token_ids)} tokens but max_model_len is {self.max_model_len} "
                f"(the prompt must leave room for at least one generated token)"
            )
        vocab = self.vocab_size
        bad = [t for t in prompt_token_ids if not _is_token_id(t, vocab)]
        if bad:
            raise InvalidRequest(
                f"prompt_token_ids must be token ids in [0, {vocab}) (the model's vocabulary), got {show_value(bad[:5])}"
            )

    def check_params(self, params: SamplingParams) -> None:
        """The sampling fields that index the vocabulary stay inside it (the sampler indexes a
        ``[batch, vocab]`` tensor with them: one id outside would fail the whole batch's step)."""
        vocab = self.vocab_size
        if params.top_k > vocab:
            raise InvalidRequest(
                f"top_k must be -1 or 0 (disabled) or at most the vocabulary size {vocab}, got {params.top_k}"
            )
        bad = [t for t in params.stop_token_ids if not _is_token_id(t, vocab)]
        if bad:
            raise InvalidRequest(
                f"stop_token_ids must be token ids in [0, {vocab}) (the model's vocabulary), got {show_value(bad[:5])}"
            )
        if params.logprobs is not None and params.logprobs > vocab:
            raise InvalidRequest(f"logprobs must be at most the vocabulary size {vocab}, got {params.logprobs}")


def check_messages(messages: object) -> None:
    """Chat messages as templates expect them: a non-empty list of {role, content} strings of
    valid Unicode (a lone surrogate would reach the tokenizer)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"messages must be a non-empty list of {{role, content}} objects, got {show_value(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise InvalidRequest(f"messages[{i}] must be an object with exactly 'role' and 'content', got {show_value(m)}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise InvalidRequest(f"messages[{i}].role must be a non-empty string, got {show_value(m['role'])}")
        _check_text(m["role"], f"messages[{i}].role")
        _check_text(m["content"], f"messages[{i}].content")


def _check_text(text: object, field: str) -> None:
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a string, got {type(text).__name__}")
    at = lone_surrogate(text)
    if at is not None:
        raise InvalidRequest(f"{field} must be valid Unicode text: it has a lone surrogate at index {at}")


def _is_token_id(value: object, vocab: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab
