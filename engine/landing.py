"""Landing a step's sampled tokens: the one implementation behind ``LLMEngine.process`` and the
``bench memory`` replay, which lands made-up tokens through it (so its block counts are the engine's).

Per scheduled sequence: publish its newly full blocks to the prefix cache, fork the other ``n > 1``
samples after the prefill (sharing the prompt's blocks), write each sample's token over its
placeholder, record it for the next delta, and finish the sequence on a stop or a length limit
(freeing its blocks). Synchronous and per-token hot: locals over attributes, no objects per token.
"""

from __future__ import annotations

from collections.abc import Callable, Container

import attrs

from mini_vllm.engine.model_runner import ModelOutput
from mini_vllm.engine.outputs import TokenLogprob
from mini_vllm.engine.scheduler import Scheduler, SchedulerOutput
from mini_vllm.engine.sequence import PLACEHOLDER, Request, SeqStatus, Sequence

# Makes (and registers with its owner) sample ``index`` of a request, holding ``token_ids``.
NewSequence = Callable[[Request, int, list[int]], Sequence]


@attrs.frozen
class LandedStep:
    touched: dict[str, Request]  # requests that got a token this step, in batch order
    prompt_tokens: int  # tokens of chunks that ended within the prompt
    generation_tokens: int  # tokens landed


def land_step(out: SchedulerOutput, output: ModelOutput, scheduler: Scheduler, new_sequence: NewSequence,
              eos_ids: Container[int], max_model_len: int) -> LandedStep:
    """Land ``output`` (one token per sampling row, rows in ``out.seqs`` order) on the step ``out``."""
    bm = scheduler.block_manager
    block_size = bm.block_size
    tokens = output.token_ids
    touched: dict[str, Request] = {}
    prompt_tokens = generated = 0
    row = 0
    for s in out.seqs:
        seq = s.seq
        first = row
        n = s.num_samples
        row += n
        status = seq.status
        if status is SeqStatus.FINISHED:  # aborted, or finished by the step before
            continue
        num_new = s.num_new_tokens
        end = s.start + num_new
        if end <= seq.num_prompt_tokens:
            prompt_tokens += num_new
        # One token fills a block only when it ends on a block boundary; publishing catches up on
        # any block left behind, so skipping the call in between loses nothing.
        if status is SeqStatus.RUNNING and (num_new > 1 or end % block_size == 0):
            bm.cache_full_blocks(seq.seq_id, seq.token_ids, end)
        if not n:
            continue
        request = seq.request
        touched[request.request_id] = request
        if n == 1:
            _land_token(seq, end, tokens[first], output, first, scheduler, eos_ids, max_model_len)
            generated += 1
            continue
        # The prompt is done: split off the other samples, sharing its blocks. All fork before any
        # lands, since landing may finish the parent and free the blocks they share.
        children = []
        for k in range(1, n):
            child = new_sequence(request, k, [*seq.token_ids[:end], tokens[first + k]])
            if seq.status is SeqStatus.RUNNING:
                child.num_computed_tokens = end
                bm.fork(seq.seq_id, child.seq_id)
                scheduler.add_running(child)
            else:  # the parent was preempted meanwhile: the child recomputes too
                scheduler.add(child)
            children.append(child)
        _land_token(seq, end, tokens[first], output, first, scheduler, eos_ids, max_model_len)
        for k, child in enumerate(children, 1):
            _land_token(child, end, tokens[first + k], output, first + k, scheduler, eos_ids, max_model_len)
        generated += n
    return LandedStep(touched, prompt_tokens, generated)


def _land_token(seq: Sequence, index: int, token: int, output: ModelOutput, row: int, scheduler: Scheduler,
                eos_ids: Container[int], max_model_len: int) -> None:
    token_ids = seq.token_ids
    if token_ids[index] != PLACEHOLDER and token_ids[index] != token:
        raise RuntimeError(f"sequence {seq.seq_id}: token {index} landed twice")
    token_ids[index] = token
    params = seq.request.params
    seq.new_token_ids.append(token)
    seq.delta_pending = True
    if seq.logprobs is not None and output.logprobs is not None:
        top = tuple(output.top[row][: params.logprobs]) if output.top is not None else ()
        lp = TokenLogprob(token, output.logprobs[row], top)
        seq.logprobs.append(lp)
        seq.new_logprobs.append(lp)
    detokenizer = seq.detokenizer
    if detokenizer is not None:
        detokenizer.add_tokens([token])
    n_out = index + 1 - seq.num_prompt_tokens
    reason = None
    if not params.ignore_eos and token in eos_ids and n_out >= params.min_tokens:
        reason = "stop"
    elif token in params.stop_token_ids and n_out >= params.min_tokens:
        reason = "stop"
    elif detokenizer is not None and detokenizer.stopped_by is not None:
        reason = "stop"
    elif n_out >= params.max_tokens or index + 1 >= max_model_len:
        reason = "length"
    if reason is not None:
        seq.finish_reason = reason
        del token_ids[index + 1 :]  # a token scheduled one step too late is dropped
        if detokenizer is not None:
            detokenizer.finish()
        scheduler.remove(seq)
