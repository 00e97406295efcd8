"""The sampler: from logits ``[N, vocab]`` to one token per row, vectorized over the batch.

Order of operations (the same as vLLM): penalties on the raw logits, min-tokens masking,
temperature, then top-k, top-p and min-p cut the support, then a draw. Greedy rows take the
argmax of the penalized logits. Drawing uses the exponential race (argmax of p / q with
q ~ Exp(1)), which samples exactly from p and lets a seeded row draw its noise from its own
generator: a seeded request's tokens depend on its seed and position alone, never on what else
is in the batch. Logprobs are those of the model's raw distribution (before any processing).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

import attrs
import torch

from mini_vllm.engine.sampling_params import SamplingParams


@attrs.frozen
class SamplingRow:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    prompt_token_ids: list[int] | None  # only needed for repetition_penalty
    output_token_ids: list[int]
    blocked_token_ids: tuple[int, ...]  # masked this step (EOS/stop ids before min_tokens)
    seed: int | None  # per-row derived seed (request seed, sample index, position); None: unseeded
    # The row's token is the logits' argmax and nothing else is asked of it (no logprobs, nothing
    # masked, no penalties): decided once here, read by the GPU runner for every row of every step.
    argmax_only: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        p = self.params
        only = p.greedy and p.logprobs is None and not self.blocked_token_ids and not p.uses_penalties
        object.__setattr__(self, "argmax_only", only)


@attrs.frozen
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64 (on the logits' device)
    logprobs: torch.Tensor | None  # [N] chosen token's logprob, float32
    top_ids: torch.Tensor | None  # [N, K] int64
    top_logprobs: torch.Tensor | None  # [N, K] float32


# Below this many pieces a row is reduced in one pass: a small or odd vocabulary gains nothing.
MIN_ARGMAX_PIECES = 16
MAX_ARGMAX_PIECES = 256


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax over the vocabulary: the first index of its largest value, as
    ``torch.argmax`` (which it equals, NaN and -inf included), in two passes. Each row is cut into
    up to 256 equal pieces (the largest power of two dividing the vocabulary), reduced in parallel,
    then the first piece holding the row's maximum is chosen: its first maximal index is the row's.
    This pays where one pass leaves the GPU idle (a row or a few); ``GreedyArgmax`` picks."""
    rows, vocab = logits.shape
    pieces = min(MAX_ARGMAX_PIECES, vocab & -vocab)
    if pieces < MIN_ARGMAX_PIECES or rows == 0:
        return logits.argmax(dim=-1)
    width = vocab // pieces
    best, where = logits.reshape(rows, pieces, width).max(dim=-1)
    piece = best.argmax(dim=-1, keepdim=True)  # the first piece whose maximum is the row's
    return (piece * width + where.gather(1, piece)).squeeze(1)


ArgmaxWay = Callable[[torch.Tensor], torch.Tensor]  # [rows, vocab] logits -> [rows] int64 indices


def one_pass_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


@attrs.frozen
class GreedyArgmax:
    """Greedy's argmax by whichever way was the fastest for that many rows on this device: one
    pass (``torch.argmax``), two (``argmax_rows``), or the GPU runner's others (its chunked Triton
    kernel, ``triton_argmax``). The fastest depends on the shape: on the H200 (2026-12-04) one row
    of 151,936 logits took 8.9 us in one pass, 18.1 in two, 10.1 in chunks; one of 128,256 took
    27.2, 15.8 and 4.6; 256 rows of either were fastest in chunks (44 and 38 us against 54 and 47
    in one pass). All give the same index, so the choice changes only the time."""

    sizes: tuple[int, ...]  # ascending row counts; more rows than the last use the last's choice
    choice: tuple[str, ...]  # the way each size takes, a name in ``ways``
    ways: dict[str, ArgmaxWay] = attrs.field(eq=False, repr=False)

    @classmethod
    def one_pass(cls) -> GreedyArgmax:
        return cls((1,), ("one pass",), {"one pass": one_pass_argmax})

    @classmethod
    def measured(cls, sizes: list[int], time_us: Callable[[int, ArgmaxWay], float],
                 others: dict[str, ArgmaxWay] | None = None) -> GreedyArgmax:
        """Choose per size the way of least ``time_us(rows, way)`` among one pass, two passes and
        ``others`` (a tie keeps the earlier, one pass first); a row count between two sizes takes
        the choice of the size above it."""
        if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"argmax sizes must be ascending positive row counts, got {sizes}")
        ways: dict[str, ArgmaxWay] = {"one pass": one_pass_argmax, "two passes": argmax_rows, **(others or {})}
        choice = []
        for n in sizes:
            times = {name: time_us(n, way) for name, way in ways.items()}
            choice.append(min(times, key=times.__getitem__))  # the first of the fastest
        return cls(tuple(sizes), tuple(choice), ways)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        i = min(bisect_left(self.sizes, logits.shape[0]), len(self.sizes) - 1)
        return self.ways[self.choice[i]](logits)

    def by_size(self) -> dict[int, str]:
        """Each measured size's way (what the benchmarks record)."""
        return dict(zip(self.sizes, self.choice, strict=True))


def derive_seed(seed: int, sample_index: int, position: int) -> int:
    # tuple-of-int hashes are stable across processes (only str/bytes hashing is randomized)
    return hash((seed, sample_index, position)) & ((1 << 63) - 1)


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor of per-row values on ``device`` without waiting for it. A plain copy from
    pageable memory to a GPU blocks until the stream has run everything queued before it (here the
    step's whole forward pass), so the CPU could not prepare the next step meanwhile; from pinned
    memory the copy is queued in stream order and the CPU goes on."""
    if device.type != "cuda":
        return values
    return values.pin_memory().to(device, non_blocking=True)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (prompt+output, divide positive / multiply negative), presence and frequency
    (output counts) penalties, as vLLM and OpenAI define them."""
    _n, vocab = logits.shape
    device = logits.device
    table = to_device(torch.tensor([[r.params.repetition_penalty, r.params.presence_penalty,
                                     r.params.frequency_penalty] for r in rows], dtype=logits.dtype), device)
    rep, pres, freq = table[:, 0], table[:, 1], table[:, 2]
    counts = _token_counts([r.output_token_ids for r in rows], vocab, device)
    if any(r.params.repetition_penalty != 1.0 for r in rows):  # decided on the host: no wait for the device
        seen = counts > 0
        prompt_rows = [r.prompt_token_ids or [] if r.params.repetition_penalty != 1.0 else [] for r in rows]
        seen |= _token_counts(prompt_rows, vocab, device) > 0
        factor = torch.where(logits > 0, 1.0 / rep.unsqueeze(1), rep.unsqueeze(1))
        logits = torch.where(seen, logits * factor, logits)
    logits = logits - freq.unsqueeze(1) * counts - pres.unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    n = len(token_lists)
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros((n, vocab + 1), dtype=torch.float32, device=device)
    if width:
        ids = torch.full((n, width), vocab, dtype=torch.int64)  # pad into a spare column
        for i, t in enumerate(token_lists):
            if t:
                ids[i, : len(t)] = torch.tensor(t, dtype=torch.int64)
        counts.scatter_add_(1, to_device(ids, device), torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def support_mask(probs_sorted: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """For probabilities sorted descending, True where a token is cut by top-k or top-p.

    Top-p keeps the smallest prefix whose mass reaches p (always at least one token).
    """
    ranks = torch.arange(probs_sorted.shape[1], device=probs_sorted.device).unsqueeze(0)
    cut = ranks >= top_k.unsqueeze(1)
    mass_before = probs_sorted.cumsum(dim=1) - probs_sorted
    cut |= mass_before >= top_p.unsqueeze(1)
    cut[:, 0] = False
    return cut


def sample(logits: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator | None) -> SamplerOutput:
    """One token per row of ``logits`` (float32 ``[N, vocab]``). On a GPU nothing here waits for
    the device: the GPU runner calls it as it launches a step, and the CPU must be free to prepare
    the next one while this one runs. So every branch is decided from the rows' parameters on the
    host, never from a device tensor, and per-row values travel from pinned memory."""
    _n, vocab = logits.shape
    device = logits.device
    params = [r.params for r in rows]
    max_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if max_logprobs is not None else None

    if any(p.uses_penalties for p in params):
        logits = apply_penalties(logits, rows)
    blocked = [(i, t) for i, r in enumerate(rows) for t in r.blocked_token_ids]  # a handful of ids a row
    if blocked:
        where = to_device(torch.tensor(blocked, dtype=torch.int64), device)
        logits = logits.index_put((where[:, 0], where[:, 1]), logits.new_full((), float("-inf")))

    chosen = logits.argmax(dim=-1)
    if not all(p.greedy for p in params):
        # One table, one copy: greedy, temperature, top-k (the vocabulary for none), top-p, min-p.
        table = to_device(torch.tensor([[float(p.greedy), 1.0 if p.greedy else p.temperature,
                                         p.top_k if p.top_k > 0 else vocab, p.top_p, p.min_p] for p in params],
                                       dtype=torch.float32), device)
        greedy, temp, top_k, top_p, min_p = table[:, 0] > 0, table[:, 1], table[:, 2].long(), table[:, 3], table[:, 4]
        probs = torch.softmax(logits / temp.unsqueeze(1), dim=-1)
        top_p, min_p = top_p.to(probs.dtype), min_p.to(probs.dtype)
        if any(0 < p.top_k < vocab or p.top_p < 1 for p in params):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            cut = support_mask(sorted_probs, top_k, top_p)
            probs = probs.masked_fill(torch.zeros_like(cut).scatter_(1, order, cut), 0.0)
        if any(p.min_p > 0 for p in params):
            probs = probs.masked_fill(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), 0.0)
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for i, r in enumerate(rows):  # one generator call per seeded row, vectorized over the vocabulary
            if r.seed is not None and not r.params.greedy:
                g = torch.Generator(device=device).manual_seed(r.seed)
                noise[i].exponential_(generator=g)
        drawn = (probs / noise).argmax(dim=-1)
        chosen = torch.where(greedy, chosen, drawn)

    if raw_logprobs is None:
        return SamplerOutput(chosen, None, None, None)
    chosen_lp = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    top_lp, top_ids = raw_logprobs.topk(max_logprobs, dim=-1) if max_logprobs else (None, None)
    return SamplerOutput(chosen, chosen_lp, top_ids, top_lp)
