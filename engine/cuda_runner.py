"""The GPU model runner: Triton kernels, CUDA graphs for every step, a copy stream, async readback.

A step's host work is filling persistent pinned buffers (numpy views, no per-step allocation);
a separate copy stream moves them to device staging buffers, ordered with events, so the copy of
step N+1 overlaps step N's compute. Two buffer sets alternate: with at most two steps in flight
the CPU never writes a buffer the GPU may still read. Block tables stay on the device between
steps (``engine/block_table_rows.py``): a step sends only the entries that changed and which row
each of its sequences reads, and the step's tables are gathered on the device.

Two ladders of CUDA graphs are captured at start-up. Decode-only steps replay the decode graph
of the next batch size up (padding rows have seq_len 0 and slot -1, so they neither read nor
write the cache). Steps that carry prefill tokens replay the mixed graph of the next token count
up: its prefill attention runs over a tile map rewritten each step into a buffer sized for the
largest step of that count, and the programs past the step's real tile count return at once
(padding tokens belong to no tile and have slot -1). The graphs end at the last hidden states;
the rows to sample are picked and projected to logits eagerly, since their number varies.
Sampled ids are copied back into pinned memory behind an event; only ``collect`` waits for it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import numpy as np
import torch

from mini_vllm.engine.attention import AttentionMetadata
from mini_vllm.engine.block_table_rows import BlockTableRows
from mini_vllm.engine.errors import ConfigError
from mini_vllm.engine.model import CausalLM
from mini_vllm.engine.model_runner import ModelOutput, ModelRunner, StepHandle, StepInputs
from mini_vllm.engine.parallel import TensorParallel
from mini_vllm.engine.sampler import ArgmaxWay, GreedyArgmax, SamplerOutput, SamplingRow, sample
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.triton_argmax import argmax_chunks_triton
from mini_vllm.engine.triton_attention import (
    PrefillSchedule,
    build_prefill_schedule,
    decode_attention_triton,
    decode_variant,
    max_prefill_tiles,
    num_splits_for,
    prefill_attention_triton,
    prefill_tile_map,
    prefill_tokens_per_tile,
    store_kv_triton,
    tile_sizes,
)
from mini_vllm.engine.triton_norm import rms_norm_triton, rotary_triton, silu_mul_triton
from mini_vllm.engine.triton_qkv import LARGE_TILE_MIN_TOKENS as PROLOGUE_LARGE_TILE_MIN_TOKENS
from mini_vllm.engine.triton_qkv import SUPPORTED_DTYPES as PROLOGUE_DTYPES
from mini_vllm.engine.triton_qkv import qkv_prologue_triton
from mini_vllm.engine.triton_skinny import MAX_ROWS as SKINNY_MAX_ROWS
from mini_vllm.engine.triton_skinny import SUPPORTED_DTYPES as SKINNY_DTYPES
from mini_vllm.engine.triton_skinny import skinny_linear_triton

# Programmatic dependent launch pays at a few rows and costs at many: on the H200 it took 7 % off
# qwen3-0.6b's decode graph at one row and 3 % off llama3-8b's, left 16-64 rows within 2 %, and
# added 1-1.5 % at 256 (docs/gpu-execution.md). So steps of at most this many tokens take it.
DEPENDENT_LAUNCH_MAX_ROWS = 64
# Decode steps of at least this many sequences start the longest contexts' attention first (the
# rows sorted on the host): on the H200 9-12 % less attention time on mixed contexts at 96-256
# rows, 6-8 % at 64, 1-3 % at 32 (2 % more on equal ones there; docs/benchmarks/decode-order-*.json).
# Smaller steps, one stream's among them, keep the kernel in row order: nothing measured a gain.
LONGEST_FIRST_MIN_ROWS = 32


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to ``max_num_seqs``: padding wastes at most 15 rows."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


# Steps of more tokens run eagerly: their launches are a small part of a step that long (8,192
# tokens of qwen3-0.6b take ~20 ms on an H200), while each graph holds its activations' memory.
MAX_MIXED_GRAPH_TOKENS = 8192


def mixed_graph_sizes(max_num_batched_tokens: int) -> list[int]:
    """16, 32, 48, 64, then four sizes per doubling (each at most a quarter above the one below)
    up to ``max_num_batched_tokens`` or ``MAX_MIXED_GRAPH_TOKENS``, whichever is smaller: a
    step's padding is at most a fifth of its tokens."""
    top = min(max_num_batched_tokens, MAX_MIXED_GRAPH_TOKENS)
    sizes = [16, 32, 48, 64]
    while sizes[-1] < top:
        sizes.append(sizes[-1] + (1 << (sizes[-1].bit_length() - 1)) // 4)
    return [*(n for n in sizes if n < top), top]


def gpu_time_us(
    fn: Callable[[], object], reps: int = 30, stream: torch.cuda.Stream | None = None, wait_cycles: int = 20_000_000
) -> float:
    """Device time of one ``fn()`` in µs, the GPU's alone: the calls are queued behind a wait
    (``torch.cuda._sleep`` of ``wait_cycles``, about 10 ms by default), so that their launches do
    not count, as in a step, where they are queued while the GPU is busy. One call first, to
    compile and warm up; on ``stream`` (None: the current one)."""
    with torch.cuda.stream(stream):
        fn()
        torch.cuda._sleep(wait_cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


@attrs.frozen
class GraphStats:
    batch_sizes: tuple[int, ...]  # the decode graphs' (sequences = tokens)
    capture_seconds: float
    pool_bytes: int  # device memory the graphs' private pool holds
    mixed_token_counts: tuple[int, ...] = ()  # the mixed graphs' (tokens, any sequence count)


class _Buffers:
    """One set of pinned host buffers and their device staging twins."""

    def __init__(self, tokens: int, seqs: int, rows: int, max_blocks: int, max_tiles: int, device: torch.device) -> None:
        self.tokens, self.seqs, self.rows, self.max_blocks = tokens, seqs, rows, max_blocks
        # int64 segments: ids, positions, slots (tokens each), sample rows, placeholder rows/src
        # (seqs), each sequence's block-table row (seqs), the table entries to update (flat
        # indices; at most seqs * max_blocks, and last: only the used part is copied)
        self.table_rows_at = 3 * tokens + rows + 2 * seqs
        self.entries_at = self.table_rows_at + seqs
        n64 = self.entries_at + seqs * max_blocks
        # int32 segments: query_start_loc (seqs + 1), seq_lens (seqs), a decode step's rows longest
        # first (seqs), the prefill tile map (2 * max_tiles) and its tile count (1), the updated
        # entries' values (last, like their indices)
        self.order_at = 2 * seqs + 1
        self.tiles_at = 3 * seqs + 1
        self.count_at = self.tiles_at + 2 * max_tiles
        self.values_at = self.count_at + 1
        n32 = self.values_at + seqs * max_blocks
        self.host64 = torch.zeros(n64, dtype=torch.int64, pin_memory=True)
        self.host32 = torch.zeros(n32, dtype=torch.int32, pin_memory=True)
        self.np64 = self.host64.numpy()
        self.np32 = self.host32.numpy()
        self.dev64 = torch.zeros(n64, dtype=torch.int64, device=device)
        self.dev32 = torch.zeros(n32, dtype=torch.int32, device=device)
        self.copied = torch.cuda.Event()  # host -> device copy finished (host buffers reusable)
        self.consumed = torch.cuda.Event()  # the compute stream is done reading the device side
        self.copied.record()
        self.consumed.record()


class _DependentUpTo:
    """``fn(x, ...)`` with ``pdl`` true where ``x`` has at most ``max_rows`` rows (``max_rows`` 0:
    never). Every kernel it wraps takes a row per token of the step first, so all of a step's
    covered kernels launch the same way."""

    def __init__(self, fn: Callable[..., Any], max_rows: int) -> None:
        self.fn = fn
        self.max_rows = max_rows

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.fn(x, *args, pdl=x.shape[0] <= self.max_rows, **kwargs)


class _TritonAttention:
    """The attention callable the model calls on the GPU, with the state it reads (the SM count,
    the split ladder, the eager step's prefill tile map). Its own object rather than a bound
    method of the runner: the runner holding ``self._attention`` would reference itself, and such
    a cycle keeps the weights, KV cache and graphs alive until the cyclic GC happens to run."""

    def __init__(self, max_model_len: int, num_kv_heads: int, num_sms: int, *, pdl_max_rows: int) -> None:
        # Up to one 64-key tile per partition: a small batch has too few (sequence, kv head)
        # programs to fill the GPU otherwise (docs/gpu-execution.md, batch 1).
        self.num_splits = num_splits_for(max_model_len, tokens_per_split=64, max_splits=64)
        self.num_kv_heads = num_kv_heads
        self.num_sms = num_sms
        self.schedule: PrefillSchedule | None = None  # the current eager step's prefill tile map
        self.pdl_max_rows = pdl_max_rows  # decode batches this small launch with programmatic dependent launch

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if meta.max_query_len == 1 and q.shape[0] == meta.seq_lens.shape[0]:
            return decode_attention_triton(
                q, k, v, meta.seq_lens, meta.block_tables, scale, self.decode_splits(q.shape[0]), num_warps=4,
                pdl=q.shape[0] <= self.pdl_max_rows, order=meta.decode_order,
            )
        return prefill_attention_triton(q, k, v, meta, scale, schedule=self.schedule)

    def decode_splits(self, batch: int) -> int:
        """Split the contexts until every SM has a few (sequence, kv head, partition) programs:
        eight from 32 sequences up, four below. From 132 sequences up (on an H200, 8 kv heads) one
        partition is fastest; at batch 1 the context is cut into up to ``num_splits`` pieces.
        Eight rather than four from 32 rows: when the contexts differ in length the longest ones
        hold up the step's end, and at 66-131 sequences two partitions gained 4-11 % over one; at
        8-16 rows four per SM stayed as fast or faster (docs/benchmarks/decode-partition-*.json).
        Fixed per batch size, so graphs keep it."""
        per_sm = 8 if batch >= 32 else 4
        want = -(-per_sm * self.num_sms // (batch * self.num_kv_heads))
        return max(1, min(self.num_splits, want))


class CudaModelRunner(ModelRunner):
    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor | None,
        device: torch.device,
        seed: int,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        block_size: int,
        enforce_eager: bool,
        skinny_kernels: bool,
        dependent_launch: bool | None = None,
        parallel: TensorParallel | None = None,
    ) -> None:
        config = model.config  # with tensor parallelism this rank's: its heads and KV heads
        sm90 = torch.cuda.get_device_capability(device) >= (9, 0)
        if dependent_launch and not sm90:
            raise ConfigError(f"programmatic_dependent_launch needs compute capability 9.0 or newer; "
                              f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}")
        # None: on where it was measured, one sm_90+ GPU a model (tensor-parallel ranks have not run it).
        self.dependent_launch = (sm90 and parallel is None) if dependent_launch is None else dependent_launch
        self.dependent_launch_max_rows = DEPENDENT_LAUNCH_MAX_ROWS if self.dependent_launch else 0
        self._attention = _TritonAttention(
            max_model_len, config.num_key_value_heads, torch.cuda.get_device_properties(device).multi_processor_count,
            pdl_max_rows=self.dependent_launch_max_rows,
        )
        super().__init__(
            model, kv_cache, device, seed, attention_fn=self._attention, store_kv_fn=store_kv_triton, parallel=parallel
        )
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        block_m = tile_sizes(config.head_dim, model.embed_tokens.weight.dtype)[0]
        self.tokens_per_tile = prefill_tokens_per_tile(config.num_attention_heads, config.num_key_value_heads, block_m)
        # With dependent launch, our kernels in a small step take pdl=True (rotary and store_kv, which
        # the prologue replaces for bf16 and fp32, and the prefill kernel keep plain launches).
        dtype = model.embed_tokens.weight.dtype
        pdl_rows = self.dependent_launch_max_rows
        self.prologue = dtype in PROLOGUE_DTYPES  # float16 keeps the separate norm, rotary and store
        prologue = _DependentUpTo(qkv_prologue_triton, pdl_rows) if self.prologue else None
        model.use_fused_kernels(_DependentUpTo(rms_norm_triton, pdl_rows), rotary_triton,
                                _DependentUpTo(silu_mul_triton, pdl_rows), qkv_prologue=prologue)
        self.skinny = skinny_kernels and parallel is None and dtype in SKINNY_DTYPES
        if self.skinny:  # steps of a few tokens: o, gate_up+SiLU and down in engine/triton_skinny.py
            model.use_skinny_linear(_DependentUpTo(skinny_linear_triton, pdl_rows), SKINNY_MAX_ROWS)
        rows = max(max_num_batched_tokens, max_num_seqs)
        self.max_num_batched_tokens = max_num_batched_tokens
        max_tiles = max_prefill_tiles(max_num_batched_tokens, max_num_seqs, self.tokens_per_tile)
        self._sets = [
            _Buffers(max_num_batched_tokens, max_num_seqs, rows, self.max_blocks, max_tiles, device) for _ in range(2)
        ]
        self._parity = 0
        self.copy_stream = torch.cuda.Stream(device)
        # Its own compute stream too: two models' executors then overlap on one GPU instead of
        # queueing behind each other on the default stream.
        self.compute_stream = torch.cuda.Stream(device)
        self._out_host = [torch.zeros(rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # decode: batch -> logits
        self.mixed_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # tokens -> graph writing _m_hidden
        self.graph_stats = GraphStats((), 0.0, 0)
        # Steps run so far by how: a benchmark's check that the steps that matter were graphed.
        self.step_kinds = {"decode_graph": 0, "mixed_graph": 0, "eager": 0}
        # The graphs' static inputs (written by a device copy just before each replay).
        self._g_ids = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self._g_pos = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self._g_slots = torch.full((max_num_seqs,), -1, dtype=torch.int64, device=device)
        self._g_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self._g_order = torch.arange(max_num_seqs, dtype=torch.int32, device=device)  # a permutation at capture too
        self._g_tables = torch.zeros((max_num_seqs, self.max_blocks), dtype=torch.int32, device=device)
        # The persistent block tables the steps' tables are gathered from (engine/block_table_rows.py);
        # twice the batch's rows, so that a row is reclaimed only after its sequence left.
        self._table_rows = BlockTableRows(2 * max_num_seqs, self.max_blocks)
        self._tables = torch.zeros((2 * max_num_seqs, self.max_blocks), dtype=torch.int32, device=device)
        self._g_qsl = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)
        # The mixed graphs' own (token-sized) inputs; they share _g_tables with the decode graphs.
        m_tokens = mixed_graph_sizes(max_num_batched_tokens)[-1]
        self._m_ids = torch.zeros(m_tokens, dtype=torch.int64, device=device)
        self._m_pos = torch.zeros(m_tokens, dtype=torch.int64, device=device)
        self._m_slots = torch.full((m_tokens,), -1, dtype=torch.int64, device=device)
        self._m_qsl = torch.zeros(max_num_seqs + 1, dtype=torch.int32, device=device)
        self._m_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self._m_tiles = torch.zeros((max_prefill_tiles(m_tokens, max_num_seqs, self.tokens_per_tile), 2),
                                    dtype=torch.int32, device=device)
        self._m_count = torch.zeros(1, dtype=torch.int32, device=device)
        self._m_hidden = torch.zeros((m_tokens, config.hidden_size), dtype=model.embed_tokens.weight.dtype, device=device)
        self.enforce_eager = enforce_eager
        self.greedy_argmax = GreedyArgmax.one_pass()  # measured once the cache is in (set_kv_cache)
        self._stream_ready = False

    def set_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """Install the cache (sized after profiling), compile the eager step's kernels and capture
        the graphs over it."""
        self.kv_cache = kv_cache
        self.warm_up_eager()
        self.greedy_argmax = self.measure_greedy_argmax()
        if not self.enforce_eager:
            self.capture_graphs()

    def graph_reserve_bytes(self, eager_peak: int) -> int:
        """Device memory the CUDA graphs' private pool will hold, to keep out of the KV budget:
        every decode graph's logits, the activations of the largest mixed graph (``eager_peak``
        is ``profile_peak_bytes`` at the step budget; a smaller top graph is measured), and
        256 MiB for what capture allocates besides (cuBLAS workspaces, Triton scratch)."""
        if self.enforce_eager:
            return 0
        config = self.model.config
        itemsize = self.model.embed_tokens.weight.element_size()
        logits = sum(graph_batch_sizes(self.max_num_seqs)) * config.vocab_size * itemsize
        top = mixed_graph_sizes(self.max_num_batched_tokens)[-1]
        activations = eager_peak if top == self.max_num_batched_tokens else self.profile_peak_bytes(top)
        return logits + activations + (256 << 20)

    def close(self) -> None:
        """Free the weights, KV cache, CUDA graphs (and so their private pool), staging and pinned
        buffers and streams now, and hand the cached memory back to the driver: the next engine's
        KV budget is what ``mem_get_info`` shows free (idempotent)."""
        if self.closed:
            return
        # Memory freed here can be handed out again at once: a step still running on our streams
        # must finish before the cache and buffers it reads and writes go.
        self.compute_stream.synchronize()
        self.copy_stream.synchronize()
        super().close()
        self.graphs.clear()  # the private pool is released once every graph and its logits are gone
        self.mixed_graphs.clear()
        self._attention.schedule = None
        self._sets.clear()
        self._out_host.clear()
        del self._g_ids, self._g_pos, self._g_slots, self._g_lens, self._g_order, self._g_tables, self._g_qsl, self._tables
        self._table_rows.clear()
        del self._m_ids, self._m_pos, self._m_slots, self._m_qsl, self._m_lens, self._m_tiles, self._m_count
        del self._m_hidden
        del self.copy_stream, self.compute_stream
        torch.cuda.empty_cache()

    def warm_up_eager(self) -> None:
        """Run eager steps now through the same buffers as real steps, so that no request waits
        for Triton to compile a kernel (it specializes on the buffers' alignment too): a prefill
        (and with graphs off, a decode); with the skinny kernels a step too large for them; with
        dependent launch a step too large for it; a step for the qkv prologue's large tile; with
        graphs off a decode batch of each kernel variant the batch sizes give (dependent launch or
        not, longest first or not, split count).
        Slots -1 write nothing; what the steps read from block 0 is discarded."""
        greedy = SamplingRow(SamplingParams(temperature=0, max_tokens=1), None, [], (), None)
        longest = min(self._sets[0].tokens, self.max_blocks * self.block_size)  # one sequence's step
        tokens = min(3, longest)
        steps = ([[tokens]] if tokens > 1 else []) + ([[1]] if self.enforce_eager or tokens == 1 else [])
        prologue_rows = PROLOGUE_LARGE_TILE_MIN_TOKENS - 1 if self.prologue else 0
        for rows in (SKINNY_MAX_ROWS if self.skinny else 0, self.dependent_launch_max_rows, prologue_rows):
            if rows and longest > rows:
                steps.append([rows + 1])  # the steps above took the kernels for few rows: one that does not
        if self.enforce_eager:  # a decode batch of every variant the sizes give (graphs capture them otherwise)
            variants = {self._decode_variant(1)}  # the decode step of one sequence above
            for batch in range(2, min(self.max_num_seqs, self._sets[0].tokens) + 1):
                variant = self._decode_variant(batch)
                if variant not in variants:
                    variants.add(variant)
                    steps.append([1] * batch)
        for query_lens in steps:
            n = sum(query_lens)
            inputs = StepInputs(
                input_ids=[0] * n, positions=[p for q in query_lens for p in range(q)], slot_mapping=[-1] * n,
                query_lens=query_lens, seq_lens=query_lens,
                block_tables=[[0] * -(-q // self.block_size) for q in query_lens],
                sample_indices=[end - 1 for end in itertools.accumulate(query_lens)],
                sampling_rows=[greedy] * len(query_lens), copies=(),
                placeholder_rows=[], placeholder_src=[], sample_seq_ids=list(range(len(query_lens))),
            )
            self.collect(self.launch(inputs))
        self._last_sampled = None
        self.step_kinds = dict.fromkeys(self.step_kinds, 0)  # warm-up steps are not served steps

    def _decode_variant(self, batch: int) -> tuple[bool, bool, bool, int]:
        """What the kernels of an eager decode step of ``batch`` sequences compile for."""
        return (
            batch <= self.dependent_launch_max_rows, batch >= LONGEST_FIRST_MIN_ROWS,
            *decode_variant(self._attention.decode_splits(batch)),
        )

    @torch.inference_mode()
    def measure_greedy_argmax(self, reps: int = 10) -> GreedyArgmax:
        """Time one pass against two at each decode graph's batch size, on random logits of the
        lm head's shape and dtype, on the compute stream (some 50 ms at start)."""
        sizes = graph_batch_sizes(self.max_num_seqs)
        dtype = self.model.embed_tokens.weight.dtype
        with torch.cuda.stream(self.compute_stream):
            logits = torch.randn((sizes[-1], self.model.config.vocab_size), dtype=dtype, device=self.device)

        def time_us(rows: int, way: ArgmaxWay) -> float:
            # In a step the argmax is queued while the GPU still runs the forward pass, so its
            # launches are hidden: the GPU alone, behind a wait of about a ms (enough for 10 calls).
            return gpu_time_us(partial(way, logits[:rows]), reps, self.compute_stream, wait_cycles=2_000_000)

        # The logits go with this frame.
        return GreedyArgmax.measured(sizes, time_us, {"chunks": argmax_chunks_triton})

    # ---- CUDA graphs ------------------------------------------------------------------------------
    def _graph_meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._g_slots[:bs],
            query_start_loc=self._g_qsl[: bs + 1],
            seq_lens=self._g_lens[:bs],
            block_tables=self._g_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size,
            query_start_loc_list=[],
            seq_lens_list=[],
            decode_order=self._g_order[:bs] if bs >= LONGEST_FIRST_MIN_ROWS else None,
        )

    def _decode_forward(self, bs: int) -> torch.Tensor:
        meta = self._graph_meta(bs)
        hidden = self.model(self._g_ids[:bs], self._g_pos[:bs], self.kv_cache, meta, self._attention, store_kv_triton)
        # Logits in the weights' dtype: greedy takes the argmax of those (the same index as of
        # their fp32 copy), and only sampling pays for the fp32 conversion.
        return self.model.lm_head(hidden)

    def _mixed_forward(self, n: int) -> None:
        meta = AttentionMetadata(
            slot_mapping=self._m_slots[:n],
            query_start_loc=self._m_qsl,
            seq_lens=self._m_lens,
            block_tables=self._g_tables,
            max_query_len=n,  # > 1: the prefill kernel, which serves any mix of chunks and decodes
            max_seq_len=self.max_blocks * self.block_size,
            query_start_loc_list=[],
            seq_lens_list=[],
        )
        tiles = max_prefill_tiles(n, self.max_num_seqs, self.tokens_per_tile)
        self._attention.schedule = PrefillSchedule(self._m_tiles[:tiles], self.tokens_per_tile, self._m_count)
        hidden = self.model(self._m_ids[:n], self._m_pos[:n], self.kv_cache, meta, self._attention, store_kv_triton)
        self._m_hidden[:n].copy_(hidden)  # one output buffer for every mixed graph, outside the pool
        self._attention.schedule = None

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        # Capture on harmless inputs: decode reads slot 0 of block 0, mixed steps have no tiles;
        # nothing is written (slots -1).
        self._g_lens.fill_(1)
        self._m_count.zero_()
        # Largest first, so that smaller graphs reuse its pool memory; mixed ones (the larger
        # activations) before decode ones.
        mixed = mixed_graph_sizes(self.max_num_batched_tokens)
        for n in reversed(mixed):
            self._mixed_forward(n)  # warm up (Triton compiles, cuBLAS picks kernels)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=self.compute_stream):
                self._mixed_forward(n)
            self.mixed_graphs[n] = graph
        sizes = graph_batch_sizes(self.max_num_seqs)
        for bs in reversed(sizes):
            self._decode_forward(bs)
            graph = torch.cuda.CUDAGraph()
            # On the compute stream, whose cuBLAS workspace the eager warm-up allocated: on a stream
            # new to cuBLAS (torch's own capture stream) the workspace would be allocated inside
            # the private pool and, kept by torch for the process, pin the pool after the graphs go.
            with torch.cuda.graph(graph, pool=pool, stream=self.compute_stream):
                logits = self._decode_forward(bs)
            self.graphs[bs] = (graph, logits)
        # A graph's first replay cost the host 0.34-0.56 ms, the next ones some 16 µs (presumably the
        # driver uploading it; replay-in-loop-qwen3-0.6b-20261204-31a73bb.json): pay it here, on the capture's
        # harmless inputs (no context, slots -1: nothing is written to the cache).
        self._g_lens.zero_()
        with torch.cuda.stream(self.compute_stream):
            for graph in self.mixed_graphs.values():
                graph.replay()
            for graph, _ in self.graphs.values():
                graph.replay()
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        self.graph_stats = GraphStats(tuple(sizes), time.perf_counter() - start, used, tuple(mixed))

    @staticmethod
    def _size_up(sizes: tuple[int, ...], n: int) -> int | None:
        for size in sizes:
            if size >= n:
                return size
        return None

    # ---- a step ------------------------------------------------------------------------------
    def launch(self, inputs: StepInputs) -> StepHandle:
        # Start-up work (weights, cache, graphs) ran on the default stream: order after it once.
        if not self._stream_ready:
            self.compute_stream.wait_stream(torch.cuda.current_stream(self.device))
            self._stream_ready = True
        with torch.cuda.stream(self.compute_stream):
            return self._launch(inputs)

    @torch.inference_mode()
    def _launch(self, inputs: StepInputs) -> StepHandle:
        buf = self._sets[self._parity]
        out_host = self._out_host[self._parity]
        self._parity ^= 1
        n_tok, n_seq, n_rows = len(inputs.input_ids), len(inputs.query_lens), len(inputs.sample_indices)
        if n_tok > buf.tokens or n_seq > buf.seqs or n_rows > buf.rows:
            raise RuntimeError(f"step larger than the runner's buffers ({n_tok} tokens, {n_seq} seqs, {n_rows} rows)")
        decode = inputs.is_decode_only
        decode_bs = self._size_up(self.graph_stats.batch_sizes, n_tok) if decode and self.graphs else None
        mixed_n = self._size_up(self.graph_stats.mixed_token_counts, n_tok) if not decode and self.mixed_graphs else None
        padded = decode_bs or mixed_n or n_tok
        seqs_padded = decode_bs or n_seq

        # 1. Fill the pinned host buffers (the copy that last read them has finished).
        buf.copied.synchronize()
        T, S, R = buf.tokens, buf.seqs, buf.rows
        a = buf.np64
        a[0:n_tok] = inputs.input_ids
        a[T : T + n_tok] = inputs.positions
        a[2 * T : 2 * T + n_tok] = inputs.slot_mapping
        if padded > n_tok:  # graph padding: position 0, no cache write (and no tile: no attention)
            a[n_tok:padded] = 0
            a[T + n_tok : T + padded] = 0
            a[2 * T + n_tok : 2 * T + padded] = -1
        a[3 * T : 3 * T + n_rows] = inputs.sample_indices
        n_ph = len(inputs.placeholder_rows)
        a[3 * T + R : 3 * T + R + n_ph] = inputs.placeholder_rows
        a[3 * T + R + S : 3 * T + R + S + n_ph] = inputs.placeholder_src
        b = buf.np32
        qsl = np.cumsum([0, *inputs.query_lens], dtype=np.int32)
        b[0 : n_seq + 1] = qsl
        b[S + 1 : S + 1 + n_seq] = inputs.seq_lens
        if seqs_padded > n_seq:
            b[S + 1 + n_seq : S + 1 + seqs_padded] = 0
        ordered = decode and seqs_padded >= LONGEST_FIRST_MIN_ROWS
        if ordered:  # the attention kernel starts the longest contexts first (padding, 0, last)
            lens = b[S + 1 : S + 1 + seqs_padded]
            b[buf.order_at : buf.order_at + seqs_padded] = np.argsort(lens, kind="stable")[::-1]
        n_tiles = 0
        if not decode:  # the prefill kernel's tile map, shared by every layer
            tile_map = prefill_tile_map(qsl, self.tokens_per_tile, inputs.seq_lens)  # longest tiles first
            n_tiles = len(tile_map)
            b[buf.tiles_at : buf.tiles_at + 2 * n_tiles] = tile_map.ravel()
            b[buf.count_at] = n_tiles
        # Block tables: which persistent row each sequence reads, and the entries the rows lack.
        rows_at, entries_at, values_at = buf.table_rows_at, buf.entries_at, buf.values_at
        try:
            n_new = self._table_rows.sync(
                inputs.block_tables, a[rows_at : rows_at + n_seq], a[entries_at:], b[values_at:]
            )
        except BaseException:
            self._table_rows.clear()  # the rows' bookkeeping may be half updated: resend everything
            raise
        if seqs_padded > n_seq:  # graph padding reads any row (seq_len 0: no key is read)
            a[rows_at + n_seq : rows_at + seqs_padded] = 0

        # 2. Copy on the side stream once the compute stream is done with these device buffers.
        compute = torch.cuda.current_stream(self.device)
        n64, n32 = entries_at + n_new, values_at + n_new
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(buf.consumed)
            buf.dev64[:n64].copy_(buf.host64[:n64], non_blocking=True)
            buf.dev32[:n32].copy_(buf.host32[:n32], non_blocking=True)
            buf.copied.record(self.copy_stream)
        compute.wait_event(buf.copied)

        d, e = buf.dev64, buf.dev32
        ids = d[0:padded]
        positions = d[T : T + padded]
        slots = d[2 * T : 2 * T + padded]
        sample_rows = d[3 * T : 3 * T + n_rows]
        seq_lens = e[S + 1 : S + 1 + seqs_padded]
        order = e[buf.order_at : buf.order_at + seqs_padded] if ordered else None
        table_rows = d[rows_at : rows_at + seqs_padded]
        if n_new:  # in stream order: the step in flight has gathered its tables already
            self._tables.view(-1).index_copy_(0, d[entries_at:n64], e[values_at:n32])
        if inputs.copies:
            self.copy_blocks(inputs.copies)
        if n_ph:
            if self._last_sampled is None:
                raise RuntimeError("a step reads tokens of a previous step that was never launched")
            ph_rows = d[3 * T + R : 3 * T + R + n_ph]
            ph_src = d[3 * T + R + S : 3 * T + R + S + n_ph]
            ids.index_copy_(0, ph_rows, self._last_sampled.index_select(0, ph_src))

        # 3. The forward pass: a graph replay (decode or mixed), eager kernels without graphs.
        logits: torch.Tensor | None = None
        if decode_bs is not None:
            graph, logits_all = self.graphs[decode_bs]
            self._g_ids[:decode_bs].copy_(ids)
            self._g_pos[:decode_bs].copy_(positions)
            self._g_slots[:decode_bs].copy_(slots)
            self._g_lens[:decode_bs].copy_(seq_lens)
            if order is not None:
                self._g_order[:decode_bs].copy_(order)
            torch.index_select(self._tables, 0, table_rows, out=self._g_tables[:decode_bs])
            graph.replay()
            self.step_kinds["decode_graph"] += 1
            logits = logits_all[:n_rows] if n_rows == n_tok else logits_all.index_select(0, sample_rows)
        else:
            if mixed_n is not None:
                self._m_ids[:mixed_n].copy_(ids)
                self._m_pos[:mixed_n].copy_(positions)
                self._m_slots[:mixed_n].copy_(slots)
                self._m_qsl[: n_seq + 1].copy_(e[0 : n_seq + 1])
                self._m_lens[:n_seq].copy_(seq_lens)
                torch.index_select(self._tables, 0, table_rows, out=self._g_tables[:n_seq])
                self._m_tiles[:n_tiles].copy_(e[buf.tiles_at : buf.tiles_at + 2 * n_tiles].view(n_tiles, 2))
                self._m_count.copy_(e[buf.count_at : buf.count_at + 1])
                self.mixed_graphs[mixed_n].replay()
                self.step_kinds["mixed_graph"] += 1
                hidden = self._m_hidden[:n_tok]
            else:
                meta = AttentionMetadata(
                    slot_mapping=slots,
                    query_start_loc=e[0 : n_seq + 1],
                    seq_lens=seq_lens,
                    block_tables=self._tables.index_select(0, table_rows),
                    max_query_len=max(inputs.query_lens),
                    max_seq_len=max(inputs.seq_lens),
                    query_start_loc_list=qsl.tolist(),
                    seq_lens_list=inputs.seq_lens,
                    decode_order=order,
                )
                self._attention.schedule = None if decode else PrefillSchedule(
                    e[buf.tiles_at : buf.tiles_at + 2 * n_tiles].view(n_tiles, 2), self.tokens_per_tile
                )
                hidden = self.model(ids, positions, self.kv_cache, meta, self._attention, store_kv_triton)
                self.step_kinds["eager"] += 1
            if n_rows:
                logits = self.model.lm_head(hidden.index_select(0, sample_rows))
        buf.consumed.record(compute)
        if logits is None:
            return StepHandle(None, None)

        # 4. Sample and start the copy back; collect() waits for it. With tensor parallelism only
        # rank 0 samples; its ids reach the other ranks by a broadcast in stream order, for the
        # next step's placeholders.
        if self.parallel is not None and not self.parallel.is_driver:
            self._last_sampled = self.parallel.broadcast(torch.empty(n_rows, dtype=torch.int64, device=self.device))
            return StepHandle(None, None)
        if all(r.argmax_only for r in inputs.sampling_rows):
            result = SamplerOutput(self.greedy_argmax(logits), None, None, None)
        else:
            result = sample(logits.float(), inputs.sampling_rows, self.generator)
        if self.parallel is not None:
            self.parallel.broadcast(result.token_ids)
        self._last_sampled = result.token_ids
        out_host[:n_rows].copy_(result.token_ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record(compute)
        return StepHandle(result.token_ids, result, done, (out_host[:n_rows],))

    def collect(self, handle: StepHandle) -> ModelOutput:
        if handle.result is None:
            return ModelOutput([], None, None)
        if handle.event is not None:
            handle.event.synchronize()
        result = handle.result
        if result.logprobs is None:
            return ModelOutput(handle.host[0].tolist(), None, None)
        top = None
        if result.top_ids is not None and result.top_logprobs is not None:
            top = [
                list(zip(i, lp, strict=True))
                for i, lp in zip(result.top_ids.tolist(), result.top_logprobs.tolist(), strict=True)
            ]
        return ModelOutput(handle.host[0].tolist(), result.logprobs.tolist(), top)

    @torch.inference_mode()
    def profile_peak_bytes(self, num_tokens: int) -> int:
        """Activation peak of the largest eager step (``num_tokens`` of prefill), measured."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        # As many sequences of at most max_model_len as the token budget holds.
        seq_len = min(num_tokens, self.max_model_len)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        per_seq = -(-seq_len // self.block_size)
        blocks = per_seq * len(lens)
        cfg = self.model.config
        dtype = self.model.embed_tokens.weight.dtype
        cache_shape = (cfg.num_hidden_layers, 2, blocks, self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        cache = torch.zeros(cache_shape, dtype=dtype, device=self.device)
        cache_bytes = cache.numel() * cache.element_size()
        qsl = np.cumsum([0, *lens], dtype=np.int32)
        positions = np.concatenate([np.arange(n) for n in lens])
        slots = np.concatenate([i * per_seq * self.block_size + np.arange(n) for i, n in enumerate(lens)])
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            query_start_loc=torch.tensor(qsl, device=self.device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=self.device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device).view(len(lens), per_seq),
            max_query_len=seq_len,
            max_seq_len=seq_len,
            query_start_loc_list=qsl.tolist(),
            seq_lens_list=lens,
        )
        self._attention.schedule = build_prefill_schedule(qsl, self.tokens_per_tile, self.device)
        ids = torch.randint(0, cfg.vocab_size, (num_tokens,), device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, pos, cache, meta, self._attention, store_kv_triton)
        logits = self.model.compute_logits(hidden[-self.max_num_seqs :])
        logits.softmax(dim=-1).sort(dim=-1, descending=True)  # the sampler's top-p sort is its peak
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base - cache_bytes
        del cache, hidden, logits
        torch.cuda.empty_cache()
        return int(peak)
