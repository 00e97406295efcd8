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

import math
import random

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
class Floor:
    seconds: float
    output_tokens_per_s: float
    prefill_seconds: float
    decode_seconds: float


def matmul_params(config: ModelConfig) -> int:
    """Parameters that every token multiplies through (the embedding lookup is a gather)."""
    h, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    return config.num_hidden_layers * per_layer + h * config.vocab_size


def weight_bytes(config: ModelConfig, bytes_per_param: int = 2) -> int:
    embed = config.vocab_size * config.hidden_size
    lm_head = 0 if config.tie_word_embeddings else embed
    return (matmul_params(config) - config.hidden_size * config.vocab_size + embed + lm_head) * bytes_per_param


def physical_floor(
    config: ModelConfig, requests: list[WorkloadRequest], bandwidth: float, flops: float, bytes_per_param: int = 2
) -> Floor:
    """The physical floor (docs/design.md): all requests admitted at once, prefill at the matmul peak, and each
    decode step max(bytes / bandwidth, FLOPs / peak) with bytes = weights + every live KV."""
    params = matmul_params(config)
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * bytes_per_param
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    prefill = 2 * params * prompt_tokens / flops
    weights = weight_bytes(config, bytes_per_param)
    decode = 0.0
    # Step s produces every live request's s-th output token (the first comes from the prefill).
    for step in range(1, max(r.output_len for r in requests)):
        live = [r for r in requests if r.output_len > step]
        if not live:
            break
        context = sum(len(r.prompt_token_ids) + step for r in live)
        step_bytes = weights + kv_per_token * context
        decode += max(step_bytes / bandwidth, 2 * params * len(live) / flops)
    total = prefill + decode
    outputs = sum(r.output_len for r in requests)
    return Floor(total, outputs / total, prefill, decode)
