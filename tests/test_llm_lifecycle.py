"""An engine's lifetime on the CPU: dropping an ``LLM`` frees its model and KV cache by reference
counting alone, and ``close()`` or a ``with`` block frees them on demand.

Every check runs with the cyclic garbage collector off: an object that only the collector could
free (a reference cycle) shows up as a weak reference still alive. On a GPU such a cycle keeps
the KV cache's device memory until the collector happens to run, and a second ``LLM`` fails
(``tests/test_gpu_lifecycle.py`` checks that against device memory).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import pytest
from no_gc import no_gc

from mini_vllm.engine import LLM, ConfigError, EngineArgs, LLMEngine, SamplingParams
from mini_vllm.engine.errors import EngineClosed
from mini_vllm.engine.model import CausalLM

SMALL = {"num_kv_blocks": 64, "device": "cpu"}
# Two prompts sharing a prefix longer than a block (prefix-cache hits the second time), n > 1 (forks,
# copy-on-write), sampling with a seed, logprobs and a stop string (the detokenizer's path).
PROMPTS = ["The quick brown fox jumps over it", "The quick brown fox jumps over them"]
SAMPLING = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=4, logprobs=2, stop=["zz"])


def refs_of(engine: LLMEngine) -> dict[str, weakref.ref[Any]]:
    runner = engine.runner
    return {
        "engine": weakref.ref(engine),
        "runner": weakref.ref(runner),
        "model": weakref.ref(runner.model),
        "kv_cache": weakref.ref(runner.kv_cache),
        "tokenizer": weakref.ref(engine.tokenizer),
    }


def alive(refs: dict[str, weakref.ref[Any]]) -> list[str]:
    return [name for name, ref in refs.items() if ref() is not None]


def test_del_frees_everything_without_gc(demo_model_dir: Path) -> None:
    with no_gc():
        llm = LLM(str(demo_model_dir), **SMALL)
        refs = refs_of(llm.engine)
        del llm
        assert alive(refs) == []


def test_del_after_generating_frees_everything_without_gc(demo_model_dir: Path) -> None:
    with no_gc():
        llm = LLM(str(demo_model_dir), enable_prefix_caching=True, **SMALL)
        refs = refs_of(llm.engine)
        for _ in range(2):  # the second call hits the prefix cache
            outs = llm.generate(PROMPTS, SAMPLING)
            assert [len(o.outputs) for o in outs] == [3, 3]
        assert llm.engine.block_manager.statistics().prefix_hits > 0
        del llm
        assert alive(refs) == []


def test_close_frees_the_model_while_references_remain(demo_model_dir: Path) -> None:
    with no_gc():
        llm = LLM(str(demo_model_dir), **SMALL)
        llm.generate(PROMPTS, SAMPLING)
        engine = llm.engine  # a reference that outlives close(): the memory must go anyway
        refs = refs_of(engine)
        llm.close()
        assert llm.closed and engine.closed
        assert alive(refs) == ["engine", "runner", "tokenizer"]
        llm.close()  # idempotent
        with pytest.raises(EngineClosed, match="closed"):
            llm.generate("Hello")
        with pytest.raises(EngineClosed, match="closed"):
            engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2))
        assert engine.step() == []  # nothing left to run
        del llm, engine
        assert alive(refs) == []


def test_with_block_closes(demo_model_dir: Path) -> None:
    with no_gc():
        with LLM(str(demo_model_dir), **SMALL) as llm:
            refs = refs_of(llm.engine)
            assert llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids
        assert llm.closed
        assert alive(refs) == ["engine", "runner", "tokenizer"]
        with pytest.raises(EngineClosed, match="build a new one"):
            llm.generate("Hello")
        del llm
        assert alive(refs) == []


def test_with_block_closes_on_error(demo_model_dir: Path) -> None:
    with no_gc():
        with pytest.raises(KeyError), LLM(str(demo_model_dir), **SMALL) as llm:
            refs = refs_of(llm.engine)
            raise KeyError("boom")
        assert llm.closed
        assert "model" not in alive(refs) and "kv_cache" not in alive(refs)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_alone_with_requests_in_flight(demo_model_dir: Path, async_scheduling: bool) -> None:
    """Dropped mid-generation (a step launched, forks made, requests unfinished): the device side
    goes at once. With close() first, the requests' own cycles go too."""
    args = EngineArgs(model=str(demo_model_dir), async_scheduling=async_scheduling, **SMALL)
    for close_first in (False, True):
        with no_gc():
            engine = LLMEngine.from_engine_args(args)
            refs = refs_of(engine)
            engine.add_request("a", [5, 6, 7, 8, 9], SamplingParams(n=2, temperature=0.9, seed=3, max_tokens=50))
            engine.add_request("b", [5, 6, 7, 8, 10], SamplingParams(max_tokens=50, stop=["zz"]))
            engine.add_request("c", [11, 12], SamplingParams(max_tokens=50))
            for _ in range(3):
                engine.step()
            assert engine.abort_request("c") is not None
            assert engine.has_unfinished_requests()
            if close_first:
                engine.close()
                assert not engine.has_unfinished_requests()
                assert alive(refs) == ["engine", "runner", "tokenizer"]
            del engine
            # Without close(), an unfinished Request and its Sequences still point at each other
            # (engine/sequence.py), so they and the tokenizer may wait for the collector; the
            # engine and its device side never do.
            assert not {"engine", "runner", "model", "kv_cache"} & set(alive(refs))
            if close_first:
                assert alive(refs) == []


def test_finished_and_aborted_requests_are_freed_at_once(demo_model_dir: Path) -> None:
    """A request's sequences point at it and it lists them: the engine breaks that cycle when the
    request leaves (finished or aborted), so they go while the engine lives on."""
    with no_gc():
        engine = LLMEngine.from_engine_args(EngineArgs(model=str(demo_model_dir), async_scheduling=True, **SMALL))
        engine.add_request("done", [5, 6, 7], SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=4, stop=["zz"]))
        engine.add_request("aborted", [5, 6, 8], SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=50))
        engine.step()
        engine.step()  # the prefill has landed: both requests have forked
        refs = [weakref.ref(o) for r in engine.requests.values() for o in (r, *r.sequences)]
        assert len(refs) == 6
        engine.abort_request("aborted")
        while engine.has_unfinished_requests():
            engine.step()
        assert [r() for r in refs] == [None] * 6


def test_failed_load_frees_the_model(demo_model_dir: Path) -> None:
    """The KV cache cannot hold max_model_len: the weights were built, then the load failed."""

    def models() -> int:
        return sum(type(o) is CausalLM for o in gc.get_objects())

    with no_gc():
        before = models()
        try:
            LLM(str(demo_model_dir), num_kv_blocks=2, max_model_len=100, device="cpu")
        except ConfigError:
            pass
        else:
            pytest.fail("the load should have failed")
        assert models() == before


FRESH_PROCESS = textwrap.dedent(
    """
    import gc, sys, weakref
    gc.disable()  # before anything is imported: first imports leave cycles that hold frames
    from mini_vllm.engine import LLM, SamplingParams

    llm = LLM(sys.argv[1], num_kv_blocks=64, device="cpu")
    engine = llm.engine
    refs = [weakref.ref(o) for o in (engine, engine.runner, engine.runner.model, engine.runner.kv_cache)]
    del engine
    llm.generate(["Hello there, hello there", "Hello there"], SamplingParams(n=2, temperature=1.0, max_tokens=5))
    del llm
    alive = [i for i, r in enumerate(refs) if r() is not None]
    print("alive:", alive)
    sys.exit(1 if alive else 0)
    """
)


def test_first_llm_in_a_fresh_process_frees_without_gc(demo_model_dir: Path, tmp_path: Path) -> None:
    """The first LLM of a process is the one a user deletes to make room for a second: its load
    ran the first imports of transformers and torch internals, whose cycles hold frames."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(  # not from the checkout's root, whose mini_vllm/ folder lacks engine/
        [sys.executable, "-c", FRESH_PROCESS, str(demo_model_dir)],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_generate_freezes_the_heap_it_found_and_gives_it_back(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLM(str(demo_model_dir), **SMALL)
    seen: list[int] = []
    step = llm.engine.step

    def watched() -> list[Any]:
        seen.append(gc.get_freeze_count())
        return step()

    monkeypatch.setattr(llm.engine, "step", watched)
    assert gc.get_freeze_count() == 0
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0))
    assert seen and all(count > 0 for count in seen)  # the collector skipped the old heap throughout
    assert gc.get_freeze_count() == 0  # and has it back
    # A program that froze objects itself keeps its freeze: generate neither adds to it nor undoes it.
    calls: list[str] = []
    freeze, unfreeze = gc.freeze, gc.unfreeze
    gc.freeze()
    try:
        monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
        monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0))
        assert calls == [] and gc.get_freeze_count() > 0
    finally:
        monkeypatch.setattr(gc, "freeze", freeze)
        monkeypatch.setattr(gc, "unfreeze", unfreeze)
        gc.unfreeze()
    llm.close()
