"""From a scheduled step to sampled tokens: input preparation, the forward pass, sampling.

``prepare_inputs`` runs on the scheduler's side and snapshots everything into plain lists, so
``ModelRunner.execute`` (which may run on another thread) reads no live scheduler state.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import attrs
import torch

from mini_vllm.engine.attention import AttentionMetadata, build_metadata, paged_attention_reference, store_kv_reference
from mini_vllm.engine.model import AttentionFn, CausalLM, StoreKvFn
from mini_vllm.engine.parallel import TensorParallel
from mini_vllm.engine.sampler import SamplerOutput, SamplingRow, derive_seed, sample
from mini_vllm.engine.scheduler import SchedulerOutput
from mini_vllm.engine.sequence import PLACEHOLDER


@attrs.frozen
class StepInputs:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]  # live tables: read them in launch, before the next schedule
    sample_indices: list[int]  # row of the hidden states each sample reads (repeats for n > 1)
    sampling_rows: list[SamplingRow]
    copies: tuple[tuple[int, int], ...]
    # Input tokens not known yet (sampled by the step in flight): input_ids[row] = previous[src].
    placeholder_rows: list[int]
    placeholder_src: list[int]
    sample_seq_ids: list[int]  # which sequence each sampling row belongs to (-1: a fork's new sample)

    @property
    def is_decode_only(self) -> bool:
        return len(self.input_ids) == len(self.query_lens)


@attrs.frozen
class ModelOutput:
    token_ids: list[int]  # one per sampling row
    logprobs: list[float] | None
    top: list[list[tuple[int, float]]] | None


def prepare_inputs(
    out: SchedulerOutput, block_size: int, eos_ids: Seq[int], previous: StepInputs | None
) -> StepInputs:
    """Flatten a scheduled step into lists; ``previous`` is the step still in flight, if any.

    Hot: it runs for every sequence of every step, so a decode (one token) takes a short path, and
    a request whose sampling needs nothing per step reuses its one ``Request.static_row``.
    """
    prev_row = {sid: r for r, sid in enumerate(previous.sample_seq_ids)} if previous is not None else {}
    placeholder_rows: list[int] = []
    placeholder_src: list[int] = []
    sample_seq_ids: list[int] = []
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    sample_indices: list[int] = []
    rows: list[SamplingRow] = []
    for s in out.seqs:
        seq, table, start, num_new = s.seq, s.block_table, s.start, s.num_new_tokens
        end = start + num_new
        token_ids = seq.token_ids
        if num_new == 1:  # decode: the common case, without slices or generators
            token = token_ids[start]
            if token == PLACEHOLDER:
                placeholder_rows.append(len(input_ids))
                placeholder_src.append(prev_row[seq.seq_id])
            input_ids.append(token)
            positions.append(start)
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            if token_ids[end - 1] == PLACEHOLDER:  # only ever the last input token
                placeholder_rows.append(len(input_ids) + num_new - 1)
                placeholder_src.append(prev_row[seq.seq_id])
            input_ids.extend(token_ids[start:end])
            positions.extend(range(start, end))
            # A block at a time, not a token at a time: a block's slots are one run of numbers.
            p = start
            while p < end:
                block, offset = divmod(p, block_size)
                run = min(end - p, block_size - offset)
                first = table[block] * block_size + offset
                slots.extend(range(first, first + run))
                p += run
        query_lens.append(num_new)
        seq_lens.append(end)
        tables.append(table)
        num_samples = s.num_samples
        if not num_samples:
            continue
        request = seq.request
        params = request.params
        out_pos = end - seq.num_prompt_tokens  # index of the sampled token in the output
        static = request.static_row
        if num_samples == 1 and static is not None and out_pos >= params.min_tokens:
            sample_seq_ids.append(seq.seq_id)
            sample_indices.append(len(input_ids) - 1)
            rows.append(static)
            continue
        blocked: tuple[int, ...] = ()
        if out_pos < params.min_tokens:
            blocked = params.stop_token_ids + (() if params.ignore_eos else tuple(eos_ids))
        prompt = request.prompt_token_ids if params.repetition_penalty != 1.0 else None
        penalized = params.uses_penalties
        output_ids = token_ids[seq.num_prompt_tokens : end] if penalized else []  # not the placeholder at end
        for k in range(num_samples):
            index = seq.index if num_samples == 1 else k
            sample_seq_ids.append(seq.seq_id if k == 0 else -1)
            sample_indices.append(len(input_ids) - 1)
            seed = None if params.seed is None else derive_seed(params.seed, index, out_pos)
            rows.append(static if static is not None and not blocked else SamplingRow(
                params=params, prompt_token_ids=prompt, output_token_ids=output_ids, blocked_token_ids=blocked,
                seed=seed,
            ))
    return StepInputs(
        input_ids, positions, slots, query_lens, seq_lens, tables, sample_indices, rows, out.copies,
        placeholder_rows, placeholder_src, sample_seq_ids,
    )


@attrs.define
class StepHandle:
    """A launched step: its sampled ids stay on the device (the next step may read them)."""

    sampled: torch.Tensor | None
    result: SamplerOutput | None
    event: torch.cuda.Event | None = None
    host: tuple[torch.Tensor, ...] = ()


class ModelRunner:
    """Owns the model and its KV cache on one device; this base runs eagerly (the CPU path).

    Nothing it holds may point back at it (no bound methods of ``self`` stored on ``self``): a
    dropped engine must free its device memory by reference counting alone, at once.

    With ``parallel`` it runs one rank's shard: every rank launches the same ``StepInputs``, only
    rank 0 samples, and the sampled ids are broadcast to the others, whose next step's placeholder
    tokens read them on their own device.
    """

    closed = False

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor | None,
        device: torch.device,
        seed: int,
        attention_fn: AttentionFn = paged_attention_reference,
        store_kv_fn: StoreKvFn = store_kv_reference,
        parallel: TensorParallel | None = None,
    ) -> None:
        self.model = model
        self.parallel = parallel
        self.kv_cache: torch.Tensor = kv_cache if kv_cache is not None else torch.empty(0)
        self.device = device
        self.attention_fn = attention_fn
        self.store_kv_fn = store_kv_fn
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._last_sampled: torch.Tensor | None = None

    def set_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache

    def close(self) -> None:
        """Let go of the weights, the KV cache and the last step's sampled ids now, rather than
        when the last reference to the runner goes (idempotent). The runner cannot run afterwards;
        the engine refuses to launch on a closed runner."""
        if self.closed:
            return
        self.closed = True
        del self.model
        self.kv_cache = torch.empty(0)
        self._last_sampled = None

    def metadata(self, inputs: StepInputs) -> AttentionMetadata:
        return build_metadata(
            inputs.query_lens, inputs.seq_lens, inputs.block_tables, inputs.slot_mapping, self.device
        )

    def copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        src = torch.tensor([c[0] for c in copies], device=self.device)
        dst = torch.tensor([c[1] for c in copies], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def fill_placeholders(self, ids: torch.Tensor, inputs: StepInputs) -> None:
        if inputs.placeholder_rows:
            if self._last_sampled is None:
                raise RuntimeError("a step reads tokens of a previous step that was never launched")
            rows = torch.tensor(inputs.placeholder_rows, device=self.device)
            src = torch.tensor(inputs.placeholder_src, device=self.device)
            ids[rows] = self._last_sampled[src]

    @torch.inference_mode()
    def launch(self, inputs: StepInputs) -> StepHandle:
        if inputs.copies:
            self.copy_blocks(inputs.copies)
        ids = torch.tensor(inputs.input_ids, dtype=torch.int64, device=self.device)
        self.fill_placeholders(ids, inputs)
        pos = torch.tensor(inputs.positions, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, self.kv_cache, self.metadata(inputs), self.attention_fn, self.store_kv_fn)
        if not inputs.sample_indices:
            return StepHandle(None, None)
        rows = torch.tensor(inputs.sample_indices, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden[rows])  # with tensor parallelism: gathered on every rank
        if self.parallel is not None and not self.parallel.is_driver:
            self._last_sampled = self.parallel.broadcast(torch.empty(len(rows), dtype=torch.int64, device=self.device))
            return StepHandle(None, None)
        out = sample(logits, inputs.sampling_rows, self.generator)
        if self.parallel is not None:
            self.parallel.broadcast(out.token_ids)
        self._last_sampled = out.token_ids
        return StepHandle(out.token_ids, out)

    def collect(self, handle: StepHandle) -> ModelOutput:
        return to_model_output(handle.result)

    def execute(self, inputs: StepInputs) -> ModelOutput:
        return self.collect(self.launch(inputs))


def to_model_output(out: SamplerOutput | None) -> ModelOutput:
    if out is None:
        return ModelOutput([], None, None)
    token_ids = out.token_ids.tolist()
    if out.logprobs is None:
        return ModelOutput(token_ids, None, None)
    top = None
    if out.top_ids is not None and out.top_logprobs is not None:
        top = [list(zip(i, lp, strict=True)) for i, lp in zip(out.top_ids.tolist(), out.top_logprobs.tolist(), strict=True)]
    return ModelOutput(token_ids, out.logprobs.tolist(), top)
