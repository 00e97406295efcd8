"""From a scheduled step to sampled tokens: input preparation, the forward pass, sampling.

``prepare_inputs`` runs on the scheduler's side and snapshots everything into plain lists, so
``ModelRunner.execute`` (which may run on another thread) reads no live scheduler state.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import attrs
import torch

from engine.attention import AttentionMetadata, build_metadata, paged_attention_reference, store_kv_reference
from engine.model import AttentionFn, CausalLM, StoreKvFn
from engine.sampler import SamplingRow, derive_seed, sample
from engine.scheduler import SchedulerOutput


@attrs.frozen
class StepInputs:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[tuple[int, ...]]
    sample_indices: list[int]  # row of the hidden states each sample reads (repeats for n > 1)
    sampling_rows: list[SamplingRow]
    copies: tuple[tuple[int, int], ...]


@attrs.frozen
class ModelOutput:
    token_ids: list[int]  # one per sampling row
    logprobs: list[float] | None
    top: list[list[tuple[int, float]]] | None


def prepare_inputs(out: SchedulerOutput, block_size: int, eos_ids: Seq[int]) -> StepInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    tables: list[tuple[int, ...]] = []
    sample_indices: list[int] = []
    rows: list[SamplingRow] = []
    for s in out.seqs:
        seq, table = s.seq, s.block_table
        input_ids.extend(seq.token_ids[s.start : s.end])
        pos = range(s.start, s.end)
        positions.extend(pos)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        query_lens.append(s.num_new_tokens)
        seq_lens.append(s.end)
        tables.append(table)
        if not s.num_samples:
            continue
        params = seq.request.params
        out_pos = len(seq.token_ids) - seq.num_prompt_tokens
        blocked: tuple[int, ...] = ()
        if out_pos < params.min_tokens:
            blocked = params.stop_token_ids + (() if params.ignore_eos else tuple(eos_ids))
        prompt = seq.request.prompt_token_ids if params.repetition_penalty != 1.0 else None
        for k in range(s.num_samples):
            index = seq.index if s.num_samples == 1 else k
            sample_indices.append(len(input_ids) - 1)
            rows.append(
                SamplingRow(
                    params=params,
                    prompt_token_ids=prompt,
                    output_token_ids=seq.token_ids[seq.num_prompt_tokens :]
                    if (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0)
                    else [],
                    blocked_token_ids=blocked,
                    seed=None if params.seed is None else derive_seed(params.seed, index, out_pos),
                )
            )
    return StepInputs(input_ids, positions, slots, query_lens, seq_lens, tables, sample_indices, rows, out.copies)


class ModelRunner:
    """Owns the model and its KV cache on one device."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        device: torch.device,
        seed: int,
        attention_fn: AttentionFn = paged_attention_reference,
        store_kv_fn: StoreKvFn = store_kv_reference,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.attention_fn = attention_fn
        self.store_kv_fn = store_kv_fn
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def metadata(self, inputs: StepInputs) -> AttentionMetadata:
        return build_metadata(
            inputs.query_lens, inputs.seq_lens, [list(t) for t in inputs.block_tables], inputs.slot_mapping, self.device
        )

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> ModelOutput:
        if inputs.copies:
            src = torch.tensor([c[0] for c in inputs.copies], device=self.device)
            dst = torch.tensor([c[1] for c in inputs.copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        ids = torch.tensor(inputs.input_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(inputs.positions, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, self.kv_cache, self.metadata(inputs), self.attention_fn, self.store_kv_fn)
        if not inputs.sample_indices:
            return ModelOutput([], None, None)
        rows = torch.tensor(inputs.sample_indices, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        out = sample(logits, inputs.sampling_rows, self.generator)
        token_ids = out.token_ids.tolist()
        if out.logprobs is None:
            return ModelOutput(token_ids, None, None)
        top = None
        if out.top_ids is not None and out.top_logprobs is not None:
            top = [list(zip(i, lp, strict=True)) for i, lp in zip(out.top_ids.tolist(), out.top_logprobs.tolist(), strict=True)]
        return ModelOutput(token_ids, out.logprobs.tolist(), top)
