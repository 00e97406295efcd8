"""Prompts to token ids for one model: plain text through its tokenizer, chat messages through its
chat template. The engine uses it, and so does a frontend that has the tokenizer but not the model
(the server, whose engine core runs in another process)."""

from __future__ import annotations

from typing import Any

from mini_vllm.engine.errors import InvalidRequest


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
        return list(self.tokenizer.encode(prompt))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise InvalidRequest(f"model {self.model!r} has no chat template: use a plain prompt")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors from a template that rejects these messages
            raise InvalidRequest(f"the chat template rejected the messages: {exc}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))
