"""On a GPU: a released LLM gives its device memory back at once, and a second LLM then fits.

At the default ``gpu_memory_utilization`` (0.9) the KV cache takes most of the GPU, so a second
LLM is refused while the first lives (``test_two_do_not_fit_at_once``) and the release tests'
memory accounting shows that the first one's memory is really free: after ``del llm`` with the cyclic garbage collector off (no
reference cycle may hold the weights, KV cache, CUDA graphs or buffers), after ``close()`` while
other references live, and after a ``with`` block; with CUDA graphs (their private memory pool)
and eagerly; and for the first LLM of a fresh process. Skipped without CUDA.
"""

from __future__ import annotations

import collections
import gc
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from no_gc import no_gc

from mini_vllm.engine import LLM, ConfigError, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GiB = 1 << 30
# What may stay allocated after an engine is gone: a cuBLAS workspace per stream and the like,
# kept by torch for the process. The KV cache is over a hundred times larger.
SLACK = GiB
ENGINE: dict[str, Any] = {"dtype": "bfloat16", "max_model_len": 256, "max_num_seqs": 8, "max_num_batched_tokens": 512}
PROMPTS = [[5, 6, 7, 8] * 10, [5, 6, 7, 8] * 10 + [9, 10]]  # a shared prefix of two full blocks
SAMPLED = SamplingParams(n=2, temperature=0.8, seed=0, max_tokens=8, logprobs=2, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


class Usage(NamedTuple):
    allocated: int
    reserved: int
    pool: int  # bytes in segments of private pools (where CUDA graphs allocate)
    pinned: int  # bytes of live pinned host tensors


def usage() -> Usage:
    torch.cuda.synchronize()
    pool = sum(
        seg["total_size"] for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id") or (0, 0)) != (0, 0)
    )
    pinned = sum(
        o.untyped_storage().nbytes() for o in gc.get_objects()
        if type(o) is torch.Tensor and o.device.type == "cpu" and o.is_pinned()
    )
    return Usage(torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), pool, pinned)


def baseline() -> Usage:
    """Usage once earlier tests' garbage is gone and the cache is handed back."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return usage()


def leak_report() -> str:
    """On a failure: what only the cyclic collector would free, and our frames among it."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        kinds = collections.Counter(type(o).__name__ for o in gc.garbage).most_common(15)
        frames = sorted({
            f"{Path(o.f_code.co_filename).name}:{o.f_code.co_name}"
            for o in gc.garbage
            if isinstance(o, types.FrameType) and any(d in o.f_code.co_filename for d in ("/engine/", "mini_vllm"))
        })
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return f"garbage {kinds}; our frames in it: {frames}"


def check_serving(llm: LLM, base: Usage, graphs: bool) -> None:
    now = usage()
    held = now.allocated - base.allocated
    total = torch.cuda.get_device_properties(0).total_memory
    assert held > total // 2, f"the KV cache should take most of the GPU, the engine holds {held / GiB:.1f} GiB"
    assert now.pinned > base.pinned, "the runner should hold pinned staging buffers"
    if graphs:
        assert llm.engine.runner.graphs, "the default should capture decode graphs"
        assert now.pool > base.pool, "the decode graphs should hold a private pool"
    for _ in range(2):  # the second round hits the prefix cache
        outs = llm.generate(PROMPTS, SAMPLED)
        assert [len(c.token_ids) for o in outs for c in o.outputs] == [8] * 4
        assert all(len(o.outputs[0].token_ids) == 8 for o in llm.generate(PROMPTS, GREEDY))
    print(f"serving: {held / GiB:.1f} GiB allocated, graph pool {(now.pool - base.pool) / 2**20:.0f} MiB, "
          f"pinned {(now.pinned - base.pinned) / 1024:.0f} KiB")


def check_released(base: Usage, how: str) -> None:
    now = usage()
    allocated, reserved = now.allocated - base.allocated, now.reserved - base.reserved
    print(f"after {how}: {allocated / 2**20:.0f} MiB allocated, {reserved / 2**20:.0f} MiB reserved")
    assert allocated < SLACK, f"{allocated / GiB:.2f} GiB still allocated after {how}: {leak_report()}"
    assert reserved < SLACK, f"{reserved / GiB:.2f} GiB still reserved after {how}"
    assert now.pool <= base.pool, f"the graphs' pool outlived {how}: {leak_report()}"
    assert now.pinned <= base.pinned, f"pinned buffers outlived {how}: {leak_report()}"


@pytest.mark.timeout(600)
def test_two_do_not_fit_at_once(tiny_model: Callable[..., Path]) -> None:
    """The premise of the tests below; a refused load leaves nothing behind either.

    The first LLM holds about 0.9 of the GPU. A second one at the same share would get what the
    first left of its own share, the part of its activation reserve it did not use: on the H200 on
    2026-12-03, 0.02 GiB, which holds a tiny model's cache (docs/benchmarks/lifecycle_budget_probe.py,
    lifecycle-budget-20261203-f576167.log). So the second asks for a share smaller than what the
    first holds, and must be refused."""
    path = str(tiny_model("LlamaForCausalLM"))
    base = baseline()
    with no_gc():
        llm = LLM(path, **ENGINE)
        held = torch.cuda.memory_allocated()
        share = 0.8
        total = torch.cuda.get_device_properties(0).total_memory
        assert held - base.allocated > share * total, f"the first LLM holds {held / total:.2f} of the GPU"
        message = ""
        try:
            LLM(path, **{**ENGINE, "gpu_memory_utilization": share})
        except ConfigError as exc:
            message = str(exc)
        assert "KV cache" in message, "a second LLM fit beside the first: the tests below prove nothing"
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - held < SLACK, f"the refused load kept memory: {leak_report()}"
        del llm
        torch.cuda.empty_cache()
        check_released(base, "del")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("how", ["del", "close", "with"])
def test_a_second_llm_fits_once_the_first_is_released(
    how: str, enforce_eager: bool, tiny_model: Callable[..., Path]
) -> None:
    path = str(tiny_model("LlamaForCausalLM"))
    base = baseline()
    kw = {**ENGINE, "enforce_eager": enforce_eager}
    with no_gc():
        for _ in ("first", "second"):  # the second only fits if the first one's memory came back
            if how == "with":
                with LLM(path, **kw) as llm:
                    check_serving(llm, base, not enforce_eager)
                assert llm.closed
                check_released(base, how)  # while `llm` still names it
                del llm
            elif how == "close":
                llm = LLM(path, **kw)
                check_serving(llm, base, not enforce_eager)
                engine = llm.engine  # a reference that outlives close(): the memory goes anyway
                llm.close()
                llm.close()  # idempotent
                assert engine.closed
                check_released(base, how)
                del llm, engine
            else:
                llm = LLM(path, **kw)
                check_serving(llm, base, not enforce_eager)
                del llm
                torch.cuda.empty_cache()  # close() does this itself; here the test hands the cache back
                check_released(base, how)


FRESH_PROCESS = textwrap.dedent(
    """
    import gc, sys
    gc.disable()  # before anything is imported: first imports leave cycles that hold frames
    import torch
    from mini_vllm.engine import LLM, SamplingParams

    kw = dict(dtype="bfloat16", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=512)
    for i in range(2):  # the user's case: the second LLM after `del llm`, no gc.collect()
        llm = LLM(sys.argv[1], **kw)
        out = llm.generate([[5, 6, 7, 8] * 10], SamplingParams(n=2, temperature=0.8, seed=0, max_tokens=8))
        assert len(out[0].outputs) == 2
        del llm, out
        torch.cuda.synchronize()
        print(f"LLM {i} released: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated", flush=True)
    """
)


@pytest.mark.timeout(600)
def test_a_second_llm_fits_in_a_fresh_process(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    path = str(tiny_model("LlamaForCausalLM"))
    baseline()  # this process's cached memory would count against the child's budget
    proc = subprocess.run(  # not from the checkout's root, whose mini_vllm/ folder lacks engine/
        [sys.executable, "-c", FRESH_PROCESS, path], capture_output=True, text=True, timeout=500, cwd=tmp_path
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
