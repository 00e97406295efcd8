"""The offline API, shaped like vLLM's ``LLM``: give prompts, get finished outputs in order."""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import attrs

from mini_vllm.engine.config import EngineArgs
from mini_vllm.engine.errors import EngineClosed, InvalidRequest
from mini_vllm.engine.llm_engine import LLMEngine
from mini_vllm.engine.outputs import CompletionOutput, FinishReason, RequestOutput, TokenLogprob
from mini_vllm.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """``LLM(model=None, **engine_args)``; ``model=None`` is the built-in demo model.

    ``del llm`` frees the device memory at once (nothing in the engine is a reference cycle);
    ``close()``, or leaving ``with LLM(...) as llm:``, frees it even while other references live.
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **engine_args))
        self._calls = itertools.count()  # request ids stay unique across generate() calls

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def closed(self) -> bool:
        return self.engine.closed

    def close(self) -> None:
        """Free the weights, KV cache, CUDA graphs and buffers now (idempotent); ``generate``
        raises ``EngineClosed`` afterwards."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if self.engine.closed:
            raise EngineClosed("this LLM is closed (close() or the end of its with block freed its model): build a new one")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompt_list: list[Prompt] = [prompts]  # type: ignore[list-item]
        else:
            prompt_list = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise InvalidRequest(
                    f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts: give one, or one per prompt"
                )
        engine = self.engine
        ids: list[str] = []
        # Validate everything before adding anything, so a bad prompt leaves no half-run batch behind.
        encoded = []
        for prompt, params in zip(prompt_list, params_list, strict=True):
            token_ids = engine.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            engine.validate_request(token_ids, params)
            encoded.append((prompt if isinstance(prompt, str) else None, token_ids, params))
        call = next(self._calls)
        for i, (text, token_ids, params) in enumerate(encoded):
            request_id = f"offline-{call}-{i}"
            engine.add_request(request_id, token_ids, params, prompt=text)
            ids.append(request_id)
        collected: dict[str, dict[int, _Collected]] = {rid: {} for rid in ids}
        with _heap_frozen():
            while engine.has_unfinished_requests():
                for delta in engine.step():
                    samples = collected[delta.request_id]
                    for d in delta.samples:
                        c = samples.setdefault(d.index, _Collected())
                        c.token_ids.extend(d.token_ids)
                        c.text.append(d.text)
                        if d.logprobs is not None:
                            c.logprobs.extend(d.logprobs)
                        if d.finish_reason is not None:
                            c.finish_reason = d.finish_reason
        results = []
        for rid, (text, token_ids, params) in zip(ids, encoded, strict=True):
            outs = [
                CompletionOutput(
                    index=i,
                    token_ids=c.token_ids,
                    text="".join(c.text),
                    finish_reason=c.finish_reason or "abort",
                    logprobs=c.logprobs if params.logprobs is not None else None,
                )
                for i, c in sorted(collected[rid].items())
            ]
            results.append(RequestOutput(rid, text, token_ids, outs))
        return results


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """While ``generate`` steps the engine, the collector leaves alone every object that was alive
    when it began (``gc.freeze``; the objects return to the oldest generation after). A full
    collection otherwise walks the whole heap, the ~165k objects torch's import leaves among it,
    tens of ms each, and the steps of a large batch allocate enough to set them off: on the H200
    12 of OFFLINE-256's 20 prefill-carrying steps took 23-48 ms of host time instead of 3-8
    (docs/benchmarks/prefill-steps-qwen3-0.6b-20261202-9ed0e9f.json). A program that froze
    objects itself manages its collector: then nothing changes here."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@attrs.define
class _Collected:
    """One sample's deltas, gathered until it finishes."""

    token_ids: list[int] = attrs.field(factory=list)
    text: list[str] = attrs.field(factory=list)
    logprobs: list[TokenLogprob] = attrs.field(factory=list)
    finish_reason: FinishReason | None = None
