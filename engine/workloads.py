"""Reference workloads and the physical floor they are measured against (docs/design.md, "Reference workloads").

OFFLINE-256: 256 requests; for each, in order, ``random.Random(0)`` draws the prompt length and
then the output length, each ``randint(100, 1024)``; prompt ids come from
``random.Random(1).randrange(vocab_size)``, request by request. Every request generates exactly
its output length (EOS ignored).

ONLINE-1000 (the serving benchmark): 1000 requests; ``random.Random(0)`` draws, request by
request, ``randint(128, 1024)`` for the prompt length and then ``randint(32, 512)`` for the output
length; prompt ids from ``random.Random(1).randrange(vocab_size)``; exact output lengths. Arrivals
are gamma-distributed gaps (``arrival_times``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from typing import Any

import attrs

from mini_vllm.engine.config import ModelConfig

OFFLINE_256_PROMPT_TOKENS = 148_194
OFFLINE_256_OUTPUT_TOKENS = 140_797


@attrs.frozen
class WorkloadRequest:
    prompt_token_ids: list[int]
    output_len: int


def _random_requests(
    vocab_size: int, num_requests: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int]
) -> list[WorkloadRequest]:
    """``random.Random(0)`` draws each request's prompt length, then its output length;
    ``random.Random(1)`` the prompt ids, request by request."""
    lengths = random.Random(0)
    ids = random.Random(1)
    requests = []
    for _ in range(num_requests):
        prompt_len = lengths.randint(*prompt_lens)
        output_len = lengths.randint(*output_lens)
        prompt = [ids.randrange(vocab_size) for _ in range(prompt_len)]
        requests.append(WorkloadRequest(prompt, output_len))
    return requests


def offline_256(vocab_size: int, num_requests: int = 256) -> list[WorkloadRequest]:
    return _random_requests(vocab_size, num_requests, (100, 1024), (100, 1024))


def online_1000(vocab_size: int, num_requests: int = 1000) -> list[WorkloadRequest]:
    return _random_requests(vocab_size, num_requests, (128, 1024), (32, 512))


def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0) -> list[float]:
    """Seconds after the start at which each request arrives, as vLLM's serving benchmark draws them.

    Gaps are gamma-distributed with mean ``1 / request_rate`` and shape ``burstiness`` (1 is a
    Poisson process; below 1 burstier, above 1 more regular), drawn from ``random.Random(2)``; a
    request is sent, then the gap to the next is drawn. ``inf`` sends everything at once. The same
    seed at every rate gives the same pattern, only stretched.
    """
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = random.Random(2)
    times, clock = [], 0.0
    for _ in range(num_requests):
        times.append(clock)
        clock += gaps.gammavariate(burstiness, 1.0 / (request_rate * burstiness))
    return times


@attrs.frozen
class DecodeStepFloor:
    """One decode step of the floor: how many requests it serves and what it costs."""

    live: int
    seconds: float  # max(bytes / bandwidth, FLOPs / peak) + collective_seconds
    collective_seconds: float = 0.0
    # The same step with its kernels one after another, each at its own bound: every projection
    # max(its weight bytes / bandwidth, its FLOPs / peak), the KV and the other weights at the
    # bandwidth, plus the collectives. At least ``seconds``; more where the projections are
    # compute-bound (many rows) while attention reads the KV: ``seconds`` then assumes the two
    # overlap, which kernels run in sequence cannot do.
    serial_seconds: float = 0.0


@attrs.frozen
class Floor:
    seconds: float
    output_tokens_per_s: float
    prefill_seconds: float
    decode_seconds: float
    # The part of ``seconds`` spent in collectives between GPUs (0 on one GPU).
    communication_seconds: float = 0.0
    decode_steps: tuple[DecodeStepFloor, ...] = ()  # what decode_seconds sums, step by step

    @property
    def serial_seconds(self) -> float:
        """The floor with each decode step's kernels one after another (``DecodeStepFloor.serial_seconds``)."""
        return self.prefill_seconds + sum(s.serial_seconds for s in self.decode_steps)


@attrs.frozen
class CollectiveCost:
    """Measured seconds of one collective as a function of its size in bytes.

    ``points`` are (bytes, seconds) measurements, sorted by bytes. A collective can always pad its
    tensor to a larger measured size, so a size costs at most what any larger measured one did: the
    points' times are first lowered to the least time at that size or above (measurement noise can
    make a small size look slower). Between two points the time is interpolated linearly; below the
    smallest it is the smallest's (a small collective costs its latency); above the largest it grows
    in proportion to the bytes (a large one is bandwidth-bound, as if sent in pieces of the largest size).
    """

    points: tuple[tuple[int, float], ...] = attrs.field(converter=lambda ps: tuple((int(b), float(s)) for b, s in ps))
    _envelope: tuple[tuple[int, float], ...] = attrs.field(init=False, repr=False, eq=False)

    @points.validator
    def _check(self, _attribute: attrs.Attribute[Any], points: tuple[tuple[int, float], ...]) -> None:
        if not points:
            raise ValueError("CollectiveCost.points must hold at least one (bytes, seconds) measurement")
        if any(b < 1 or not 0 <= s < math.inf for b, s in points):
            raise ValueError(f"CollectiveCost.points must be (bytes >= 1, finite seconds >= 0), got {points}")
        if any(b1 >= b2 for (b1, _), (b2, _) in itertools.pairwise(points)):
            raise ValueError(f"CollectiveCost.points must be sorted by strictly increasing bytes, got {points}")

    @_envelope.default
    def _lowered(self) -> tuple[tuple[int, float], ...]:
        least, out = math.inf, []
        for nbytes, seconds in reversed(self.points):
            least = min(least, seconds)
            out.append((nbytes, least))
        return tuple(reversed(out))

    def seconds(self, nbytes: int) -> float:
        """The time of one collective of ``nbytes`` (0 for nothing to send)."""
        if nbytes <= 0:
            return 0.0
        points = self._envelope
        first_bytes, first_s = points[0]
        if nbytes <= first_bytes:
            return first_s
        last_bytes, last_s = points[-1]
        if nbytes >= last_bytes:
            return last_s * nbytes / last_bytes
        upper = bisect.bisect_left(points, nbytes, key=lambda point: point[0])  # first point >= nbytes
        (b1, s1), (b2, s2) = points[upper - 1], points[upper]
        return s1 + (s2 - s1) * (nbytes - b1) / (b2 - b1)


@attrs.frozen
class ParallelCost:
    """How a model is split over ``size`` GPUs of one host for the floor, with the measured cost of
    its collectives: ``all_reduce`` keyed by the bytes of the [tokens, hidden] activations it sums,
    ``all_gather`` by the bytes of the whole [rows, vocab] logits it gathers."""

    size: int
    all_reduce: CollectiveCost
    all_gather: CollectiveCost

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"ParallelCost.size (GPUs) must be an integer >= 1, got {self.size!r}")

    def step_seconds(self, config: ModelConfig, tokens: int, sampled: int, bytes_per_param: int = 2) -> float:
        """Collectives of one forward over ``tokens`` tokens of which ``sampled`` need logits: two
        all-reduces per layer (after o_proj and after down_proj) and the vocabulary gather of the logits."""
        if self.size == 1:
            return 0.0
        activations = tokens * config.hidden_size * bytes_per_param
        logits = sampled * config.vocab_size * bytes_per_param
        return 2 * config.num_hidden_layers * self.all_reduce.seconds(activations) + self.all_gather.seconds(logits)


def kv_heads_per_rank(config: ModelConfig, tensor_parallel_size: int) -> int:
    """KV heads each rank holds: split evenly, at least one (with more ranks than heads, ranks share heads)."""
    return -(-config.num_key_value_heads // tensor_parallel_size)


def matmul_params(config: ModelConfig) -> int:
    """Parameters that every token multiplies through (the embedding lookup is a gather)."""
    return sum(k * n * count for k, n, count in projection_shapes(config))


def projection_shapes(config: ModelConfig) -> list[tuple[int, int, int]]:
    """(in features, out features, how many per forward) of every matrix a token multiplies
    through: per layer qkv, o, gate_up and down, then the LM head (``matmul_params`` sums them)."""
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layers = config.num_hidden_layers
    return [(h, q + 2 * kv, layers), (q, h, layers), (h, 2 * config.intermediate_size, layers),
            (config.intermediate_size, h, layers), (h, config.vocab_size, 1)]


def weight_bytes(config: ModelConfig, bytes_per_param: int = 2) -> int:
    embed = config.vocab_size * config.hidden_size
    lm_head = 0 if config.tie_word_embeddings else embed
    return (matmul_params(config) - config.hidden_size * config.vocab_size + embed + lm_head) * bytes_per_param


def physical_floor(
    config: ModelConfig,
    requests: list[WorkloadRequest],
    bandwidth: float,
    flops: float,
    bytes_per_param: int = 2,
    parallel: ParallelCost | None = None,
) -> Floor:
    """The physical floor (docs/design.md): all requests admitted at once, prefill at the matmul peak, and each
    decode step max(bytes / bandwidth, FLOPs / peak) with bytes = weights + every live KV.

    With ``parallel`` (N GPUs), ``bandwidth`` and ``flops`` are one GPU's: each rank reads 1/N of the
    weights and its share of the KV heads, and does 1/N of the FLOPs, all ranks at once; every forward
    then adds its collectives (``ParallelCost.step_seconds``), which no overlap hides: the next layer
    needs their result."""
    ranks = 1 if parallel is None else parallel.size
    params = matmul_params(config)
    kv_per_token = (2 * config.num_hidden_layers * kv_heads_per_rank(config, ranks) * config.head_dim
                    * bytes_per_param)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    communication = 0.0 if parallel is None else parallel.step_seconds(
        config, prompt_tokens, len(requests), bytes_per_param)  # each prompt's last token is sampled
    prefill = 2 * params * prompt_tokens / (ranks * flops) + communication
    weights = weight_bytes(config, bytes_per_param) / ranks
    shapes = projection_shapes(config)
    other_weights = weights - params * bytes_per_param / ranks  # the embedding table (untied models)
    steps: list[DecodeStepFloor] = []
    # Step s produces every live request's s-th output token (the first comes from the prefill) and
    # reads the weights and every live request's KV once.
    for step in range(1, max((r.output_len for r in requests), default=0)):
        live = [r for r in requests if r.output_len > step]
        if not live:
            break
        context = sum(len(r.prompt_token_ids) + step for r in live)
        step_bytes = weights + kv_per_token * context
        collectives = 0.0 if parallel is None else parallel.step_seconds(config, len(live), len(live), bytes_per_param)
        compute = max(step_bytes / bandwidth, 2 * params * len(live) / (ranks * flops))
        serial = sum(count * max(k * n * bytes_per_param / (ranks * bandwidth), 2 * k * n * len(live) / (ranks * flops))
                     for k, n, count in shapes)
        serial += (other_weights + kv_per_token * context) / bandwidth
        steps.append(DecodeStepFloor(len(live), compute + collectives, collectives, serial + collectives))
    communication += sum(s.collective_seconds for s in steps)
    decode = sum(s.seconds for s in steps)
    total = prefill + decode
    outputs = sum(r.output_len for r in requests)
    return Floor(total, outputs / total, prefill, decode, communication, tuple(steps))
