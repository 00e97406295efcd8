"""Tensor parallelism on the CPU over gloo: ranks 1..N-1 are real worker processes.

Greedy output equals transformers' (and TP=1's) on every architecture, with KV heads split or
replicated (more ranks than KV heads); shards read only their slices; a killed rank ends every
request with an error and leaves no process; close stops them.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import trio
from conftest_serving import collect, greedy
from test_exactness import hf_greedy, prompts_of_mixed_lengths

import mini_vllm.engine.loader as loader
from mini_vllm.actors import ShuttingDown, open_service
from mini_vllm.engine import LLM, ConfigError, EngineClosed, LLMEngine, SamplingParams
from mini_vllm.engine.config import EngineArgs
from mini_vllm.engine.loader import build_model, resolve_model
from mini_vllm.engine.model_runner import StepInputs
from mini_vllm.engine.parallel import TensorParallel, check_tensor_parallel, local_config

MAX_TOKENS = 8
# Every architecture with heads and KV heads that 2 divide (Qwen2's tiny model has one KV head:
# overridden to 2 for the split, and as it is for the replicated case); Mistral with a vocabulary
# 2 does not divide (a padded last range).
TP2_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {"vocab_size": 301}),
    "qwen2": ("Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "qwen2-replicated-kv": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return [o.outputs[0].token_ids for o in outs]


def _record_steps(engine: LLMEngine) -> list[StepInputs]:
    """The steps rank 0 sends to its workers (wraps this pool's ``send``)."""
    pool = engine.workers
    if pool is None:
        raise AssertionError("not a tensor-parallel engine")
    sent: list[StepInputs] = []
    send = pool.send

    def recording(inputs: StepInputs) -> None:
        sent.append(inputs)
        send(inputs)

    pool.send = recording  # type: ignore[method-assign]
    return sent


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(TP2_MODELS))
def test_tp2_greedy_equals_transformers_and_tp1(case: str, tiny_model: Callable[..., Path]) -> None:
    arch, overrides = TP2_MODELS[case]
    path = tiny_model(arch, **overrides)
    prompts = prompts_of_mixed_lengths()[:5]
    # A small step budget: prompts are chunked and batched with decodes; one step ahead, so the
    # workers fill placeholder tokens from rank 0's broadcast of the sampled ids.
    kw: dict[str, Any] = {"num_kv_blocks": 128, "device": "cpu", "max_num_batched_tokens": 32, "async_scheduling": True}
    tp1 = LLM(str(path), **kw)
    want_tp1 = _greedy(tp1, prompts)
    tp1.close()
    llm = LLM(str(path), tensor_parallel_size=2, **kw)
    pool = llm.engine.workers
    assert pool is not None and len(pool.pids) == 1
    sent = _record_steps(llm.engine)
    got = _greedy(llm, prompts)
    llm.close()
    assert all(p.poll() == 0 for p in pool.procs), "close() lets every worker exit on its own"
    assert not any(_alive(pid) for pid in pool.pids)
    assert got == want_tp1
    assert got == [hf_greedy(path, p, MAX_TOKENS) for p in prompts]
    assert any(s.placeholder_rows for s in sent), "the placeholder path ran on the workers"
    assert any(not s.is_decode_only and len(s.query_lens) > 1 for s in sent), "a mixed step ran"


@pytest.mark.timeout(120)
def test_tp4_with_two_kv_heads_greedy_equals_transformers(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("LlamaForCausalLM")  # 2 KV heads: ranks 0-1 hold KV head 0, ranks 2-3 head 1
    prompts = prompts_of_mixed_lengths()[:4]
    llm = LLM(str(path), tensor_parallel_size=4, num_kv_blocks=64, device="cpu", max_num_batched_tokens=48,
              async_scheduling=True)
    pool = llm.engine.workers
    assert pool is not None
    try:
        got = _greedy(llm, prompts)
    finally:
        llm.close()
    assert not any(_alive(pid) for pid in pool.pids)
    assert got == [hf_greedy(path, p, MAX_TOKENS) for p in prompts]


def test_sizes_that_do_not_split_the_model_are_refused(tiny_model: Callable[..., Path]) -> None:
    three_kv = tiny_model("LlamaForCausalLM", hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    with pytest.raises(ConfigError, match=(
        r"tensor_parallel_size=2 must divide the model's num_key_value_heads \(3\) to split them, or be a "
        r"multiple of it to replicate them: choose a divisor or a multiple of 3"
    )):
        LLM(str(three_kv), tensor_parallel_size=2, device="cpu", num_kv_blocks=16)
    llama = tiny_model("LlamaForCausalLM")
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=3 must divide the model's num_attention_heads \(4\)"):
        LLM(str(llama), tensor_parallel_size=3, device="cpu", num_kv_blocks=16)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be an integer >= 1, got 0"):
        EngineArgs(tensor_parallel_size=0)


def test_kv_heads_split_or_replicate_by_size(tiny_model: Callable[..., Path]) -> None:
    config = resolve_model(EngineArgs(model=str(tiny_model("LlamaForCausalLM")))).config
    wide = attrs.evolve(config, num_attention_heads=8, num_key_value_heads=4, intermediate_size=128)
    for size in (1, 2, 4, 8):  # divisors and multiples of 4 KV heads
        check_tensor_parallel(wide, size)
    assert [local_config(wide, n).num_key_value_heads for n in (2, 4, 8)] == [2, 1, 1]
    assert [TensorParallel(r, 2).kv_head_shard(4) for r in range(2)] == [(0, 2), (2, 2)]
    assert [TensorParallel(r, 8).kv_head_shard(4) for r in range(8)] == [(h, 1) for h in (0, 0, 1, 1, 2, 2, 3, 3)]
    odd = attrs.evolve(wide, num_key_value_heads=2, num_attention_heads=6, intermediate_size=90)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=3 must divide the model's num_key_value_heads \(2\)"):
        check_tensor_parallel(odd, 3)  # neither a divisor nor a multiple of 2
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=4 must divide the model's intermediate_size \(90\)"):
        check_tensor_parallel(attrs.evolve(odd, num_attention_heads=8), 4)


class _SpyFile:
    """A safetensors file that records how each tensor was read."""

    def __init__(self, inner: Any, whole: list[str], sliced: list[str]) -> None:
        self.inner, self.whole, self.sliced = inner, whole, sliced

    def __enter__(self) -> _SpyFile:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)

    def keys(self) -> Any:
        return self.inner.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        self.whole.append(name)
        return self.inner.get_tensor(name)

    def get_slice(self, name: str) -> Any:
        self.sliced.append(name)
        return self.inner.get_slice(name)


def _kv_part(qkv: torch.Tensor, config: Any, which: int, head: int) -> torch.Tensor:
    """Rows of KV head ``head`` of k (``which`` 1) or v (2) in a fused qkv weight or bias."""
    q, d = config.num_attention_heads * config.head_dim, config.head_dim
    start = q + (which - 1) * config.num_key_value_heads * d + head * d
    return qkv[start : start + d]


@pytest.mark.parametrize(("arch", "size", "overrides"), [
    ("Qwen2ForCausalLM", 2, {"num_key_value_heads": 2, "vocab_size": 301}),  # biases, tied, padded vocabulary
    ("Qwen2ForCausalLM", 2, {"vocab_size": 301}),  # its one KV head on both ranks, with its biases
    ("LlamaForCausalLM", 4, {"num_key_value_heads": 4}),
    ("LlamaForCausalLM", 4, {}),  # 2 KV heads, each on two ranks
])
def test_each_rank_reads_only_its_slices(
    arch: str, size: int, overrides: dict[str, Any], tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_model(arch, **overrides)
    source = resolve_model(EngineArgs(model=str(path)))
    full = build_model(source, 64, torch.float32, torch.device("cpu"), 0)
    whole: list[str] = []
    sliced: list[str] = []
    sliced_rows: list[tuple[str, int]] = []
    real_open = loader.safe_open
    real_read_cut = loader._read_cut

    def read_cut(f: Any, name: str, cut: Any, file_name: str) -> torch.Tensor:
        out = real_read_cut(f, name, cut, file_name)
        sliced_rows.append((name, out.shape[0]))
        return out

    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: _SpyFile(real_open(*a, **k), whole, sliced))
    monkeypatch.setattr(loader, "_read_cut", read_cut)
    shards = [build_model(source, 64, torch.float32, torch.device("cpu"), 0, TensorParallel(r, size))
              for r in range(size)]
    # Only norms are read whole; every projection, the embedding and the LM head by slices.
    assert whole and all("norm" in name for name in whole), whole
    assert any("q_proj" in n for n in sliced) and any("embed_tokens" in n for n in sliced)
    cfg = source.config
    kv_heads, d = cfg.num_key_value_heads, cfg.head_dim
    replicating = size > kv_heads
    # Each replicated k/v row is read once per rank that holds it, never in a bigger piece.
    k_rows = [rows for name, rows in sliced_rows if "k_proj" in name]
    assert k_rows and all(rows == (d if replicating else kv_heads * d // size) for rows in k_rows), k_rows
    full_params = dict(full.named_parameters())
    replicated = sum(p.numel() for n, p in full_params.items() if "norm" in n)
    vocab = cfg.vocab_size
    rows = -(-vocab // size)
    pad = (rows * size - vocab) * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    # Replicated KV heads: every rank holds one head's k and v rows, size // kv_heads copies of each.
    kv_copies = (size - kv_heads) * 2 * d * (cfg.hidden_size + cfg.attention_bias) * cfg.num_hidden_layers
    extra = kv_copies if replicating else 0
    for shard in shards:  # each rank holds 1/size of the sharded weights (plus its vocabulary padding's share)
        held = sum(p.numel() for p in shard.parameters())
        assert held * size == (sum(p.numel() for p in full.parameters()) - replicated + pad) + replicated * size + extra
    # Put back together, the shards are the whole model.
    for name, param in full_params.items():
        parts = [dict(s.named_parameters())[name] for s in shards]
        if "norm" in name:
            assert all(torch.equal(p, param) for p in parts)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.equal(torch.cat(parts, dim=1), param), name
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            joined = torch.cat(parts, dim=0)
            assert torch.equal(joined[:vocab], param) and not joined[vocab:].any(), name
        elif "qkv_proj" in name and replicating:
            _check_replicated_qkv(name, param, parts, cfg)
        elif "qkv_proj" in name or "gate_up_proj" in name:
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            sizes = [q, kv, kv] if "qkv_proj" in name else [cfg.intermediate_size] * 2
            pieces = [torch.cat([p.split([s // size for s in sizes])[i] for p in parts]) for i in range(len(sizes))]
            assert torch.equal(torch.cat(pieces), param), name
        else:
            raise AssertionError(f"unexpected parameter {name}")
    if source.config.tie_word_embeddings:
        assert all(s.lm_head.weight is s.embed_tokens.weight for s in shards)


def _check_replicated_qkv(name: str, param: torch.Tensor, parts: list[torch.Tensor], cfg: Any) -> None:
    """Rank r's q rows are its contiguous query heads; its k/v rows are the KV head that those
    query heads use in the unsharded model (GQA: query head h uses KV head h // group)."""
    size = len(parts)
    heads_per_rank, d = cfg.num_attention_heads // size, cfg.head_dim
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    q = cfg.num_attention_heads * d
    assert torch.equal(torch.cat([p[: heads_per_rank * d] for p in parts]), param[:q]), name
    for rank, part in enumerate(parts):
        assert part.shape[0] == heads_per_rank * d + 2 * d, name  # one KV head's k and v
        [head] = {h // group for h in range(rank * heads_per_rank, (rank + 1) * heads_per_rank)}
        for which in (1, 2):
            rows = part[heads_per_rank * d + (which - 1) * d :][:d]
            assert torch.equal(rows, _kv_part(param, cfg, which, head)), (name, rank, which)


def test_dummy_weights_give_the_ranks_of_one_kv_head_the_same_k_and_v(tiny_model: Callable[..., Path]) -> None:
    source = resolve_model(EngineArgs(model=str(tiny_model("Qwen2ForCausalLM", num_key_value_heads=2)),
                                      load_format="dummy"))
    shards = [build_model(source, 64, torch.float32, torch.device("cpu"), 0, TensorParallel(r, 4)) for r in range(4)]
    q = source.config.num_attention_heads // 4 * source.config.head_dim
    for name in ("layers.0.self_attn.qkv_proj.weight", "layers.1.self_attn.qkv_proj.bias"):
        parts = [dict(s.named_parameters())[name] for s in shards]
        kv = [p[q:] for p in parts]
        assert torch.equal(kv[0], kv[1]) and torch.equal(kv[2], kv[3]), name  # ranks 0-1: head 0, 2-3: head 1
        assert not torch.equal(kv[0], kv[2]), name
        assert not torch.equal(parts[0][:q], parts[1][:q]), name  # query heads stay each rank's own
        assert kv[0].abs().max() <= 0.05 and kv[0].std() > 0.01  # drawn like every other weight


async def test_a_killed_rank_ends_every_request_with_an_error_and_leaves_no_process(
    tiny_model: Callable[..., Path],
) -> None:
    path = tiny_model("LlamaForCausalLM")
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(path), tensor_parallel_size=2, device="cpu",
                                                   num_kv_blocks=128, max_num_batched_tokens=64))
    pool = engine.workers
    assert pool is not None
    [pid] = pool.pids
    errors: list[Any] = []
    started = trio.Semaphore(0)
    async with open_service([engine]) as service:

        async def one(prompt: list[int]) -> None:
            first = True
            async for delta in service.generate(prompt, **greedy(max_tokens=400)):
                if first:
                    first = False
                    started.release()
                if delta.finished:
                    errors.append(delta.error)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(one, [10 + i, 11, 12])
                for _ in range(3):  # every request is decoding
                    await started.acquire()
                os.kill(pid, signal.SIGKILL)
        with trio.fail_after(30), pytest.raises(ShuttingDown, match=r"failed and is closed: tensor-parallel rank 1"):
            await collect(service.generate([5, 6], **greedy(max_tokens=4)))  # refused, naming the rank
    assert len(errors) == 3 and all(e is not None and e.code == "model_error" for e in errors), errors
    assert all("tensor-parallel rank 1" in e.message and "killed by signal 9" in e.message for e in errors)
    assert engine.closed and not _alive(pid) and pool.procs[0].poll() == -signal.SIGKILL
    with pytest.raises(EngineClosed, match="tensor-parallel rank 1"):
        engine.add_request("late", [1, 2], SamplingParams(max_tokens=1))
    engine.close()  # idempotent after the failure


def test_a_rank_that_dies_offline_raises_and_stops_the_others(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("LlamaForCausalLM", num_key_value_heads=4)
    llm = LLM(str(path), tensor_parallel_size=4, device="cpu", num_kv_blocks=64)
    pool = llm.engine.workers
    assert pool is not None
    _greedy(llm, [[3, 4, 5]])
    os.kill(pool.pids[1], signal.SIGKILL)  # rank 2, while idle: the next step finds it gone
    with pytest.raises(EngineClosed, match=r"tensor-parallel rank 2 \(pid \d+\) was killed by signal 9"):
        _greedy(llm, [[3, 4, 5]])
    assert llm.closed and not any(_alive(p) for p in pool.pids)


async def _wait_exit(pid: int) -> None:
    """Until ``pid`` (not our child) has exited: a pidfd becomes readable then."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


_KILLED_PARENT = """
import os, signal, sys
from mini_vllm.engine import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2, device="cpu", num_kv_blocks=16)
print(*llm.engine.workers.pids, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


async def test_a_killed_engine_process_leaves_no_worker(tiny_model: Callable[..., Path]) -> None:
    path = tiny_model("LlamaForCausalLM")
    with trio.fail_after(60):
        done = await trio.run_process([sys.executable, "-c", _KILLED_PARENT, str(path)], capture_stdout=True,
                                      capture_stderr=True, check=False)
        assert done.returncode == -signal.SIGKILL, done.stderr.decode()
        [pid] = [int(p) for p in done.stdout.split()]
        await _wait_exit(pid)  # the worker watches its parent: it exits within its poll interval
