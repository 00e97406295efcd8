"""One request that breaks the step fails alone: the others are rolled back, retried and finish
exact; a step that fails whatever it holds fails everyone, and says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from conftest_serving import Collected, Reference, build_engine, collect, greedy, wait_blocks_released

from mini_vllm.actors import open_service
from mini_vllm.engine import LLMEngine
from mini_vllm.engine.fault_isolation import FaultIsolation

pytestmark = pytest.mark.timeout(120)


def _search(requests: list[str], culprits: set[str], always_fail: bool = False) -> tuple[list[str], bool, int]:
    """Drive the policy as the scheduler actor does: a step holds every request not held, and
    fails if a culprit is in it; returns (blamed, systemic, steps)."""
    iso = FaultIsolation()
    live, held, blamed = list(requests), set(), []
    systemic = False
    steps = 0
    while live and steps < 200:
        steps += 1
        running = [r for r in live if r not in held]
        if always_fail or culprits & set(running):
            verdict = iso.failed(running)
        else:
            verdict = iso.landed(dict.fromkeys(running, 1), ())
        if verdict.systemic:
            systemic = True
            break
        for r in verdict.blame:
            blamed.append(r)
            live.remove(r)
            iso.forget(r)
        held |= set(verdict.hold)
        held -= set(verdict.release)
        if not iso.active and not culprits & set(live):
            break
    return blamed, systemic, steps


@pytest.mark.parametrize("culprits", [{"r0"}, {"r5"}, {"r7"}, {"r2", "r6"}, set()])
def test_the_search_blames_exactly_the_culprits(culprits: set[str]) -> None:
    requests = [f"r{i}" for i in range(8)]
    blamed, systemic, steps = _search(requests, culprits)
    assert sorted(blamed) == sorted(culprits) and not systemic
    assert steps <= 2 + 4 * len(culprits) * 3  # about log2(8) halvings per culprit


def test_a_step_that_always_fails_is_nobodys_fault() -> None:
    blamed, systemic, _ = _search([f"r{i}" for i in range(8)], set(), always_fail=True)
    assert systemic and len(blamed) <= 1  # at most the first lone failure was blamed before the pattern showed


def test_newcomers_wait_for_the_search_and_are_not_suspects() -> None:
    iso = FaultIsolation()
    verdict = iso.failed(["a", "b", "c", "d"])
    assert verdict.hold == ("c", "d") and iso.active
    assert iso.arrived("new")  # held by the caller
    verdict = iso.landed({"a": 1, "b": 1}, ())  # a and b are fine: test c
    assert verdict.release == ("c",)
    verdict = iso.failed(["a", "b", "c"])  # c breaks it alone
    assert verdict.blame == ("c",) and verdict.release == ("d",)
    iso.forget("c")
    verdict = iso.landed({"a": 1, "b": 1, "d": 1}, ())
    assert verdict.release == ("new",) and not iso.active


POISON = 7  # a prompt holding this token id breaks the step it is in


class PoisonedEngine:
    """A real engine whose step raises when a poisoned prompt is in it (or always)."""

    def __init__(self, engine: LLMEngine, always: bool = False) -> None:
        self._engine = engine
        self.always = always
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def launch(self, batch: Any) -> Any:
        if self.always or any(POISON in s.seq.request.prompt_token_ids for s in batch.scheduled.seqs):
            self.failures += 1
            raise ValueError("Overflow when unpacking long long")  # what top_k: 10**20 raised once
        return self._engine.launch(batch)


@pytest.fixture(scope="module")
def reference(demo_model_dir: Path) -> Reference:
    return Reference(demo_model_dir)


@pytest.mark.parametrize("pipelined", [False, True], ids=["serial", "pipelined"])
async def test_a_poisonous_request_fails_alone_and_the_others_finish_exact(
    demo_model_dir: Path, reference: Reference, pipelined: bool
) -> None:
    engine = build_engine(demo_model_dir)
    engine.async_scheduling = pipelined
    poisoned = PoisonedEngine(engine)
    innocent = [[5, 9, 11, 13, 17][: i + 1] + [20 + i] for i in range(5)]
    results: dict[int, Any] = {}
    started = trio.Semaphore(0)
    async with open_service([poisoned]) as service:  # type: ignore[list-item]

        async def one(i: int, prompt: list[int]) -> None:
            out = None
            async for delta in service.generate(prompt, **greedy(max_tokens=24)):
                if out is None:
                    out = Collected()
                    started.release()
                out.token_ids.extend(t for s in delta.samples for t in s.token_ids)
                out.finish_reason = next((s.finish_reason for s in delta.samples if s.finish_reason), None)
            results[i] = out

        with trio.fail_after(90):
            async with trio.open_nursery() as nursery:
                for i, prompt in enumerate(innocent):
                    nursery.start_soon(one, i, prompt)
                for _ in innocent:  # every innocent one is decoding: the poison joins their steps
                    await started.acquire()
                nursery.start_soon(one, len(innocent), [3, POISON, 4])
            await wait_blocks_released(service)
            # The model serves on: a request after the search is fine.
            after = await collect(service.generate([30, 31], **greedy(max_tokens=4)))
    assert poisoned.failures >= 1
    bad = results[len(innocent)]
    assert bad.finish_reason == "error" and bad.token_ids == []
    for i, prompt in enumerate(innocent):  # rolled back mid-stream, recomputed, and still exact
        want = reference(prompt, **greedy(max_tokens=24))
        assert (tuple(results[i].token_ids), results[i].finish_reason) == (want.token_ids, "length"), i
    assert after.finish_reason == "length" and len(after.token_ids) == 4


async def test_steps_that_always_fail_fail_everyone_and_say_so(demo_model_dir: Path) -> None:
    poisoned = PoisonedEngine(build_engine(demo_model_dir), always=True)
    errors: list[Any] = []
    async with open_service([poisoned]) as service:  # type: ignore[list-item]

        async def one(prompt: list[int]) -> None:
            async for delta in service.generate(prompt, **greedy(max_tokens=6)):
                if delta.finished:
                    errors.append(delta.error)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(one, [10 + i, 11])
            await wait_blocks_released(service)
    assert len(errors) == 4 and all(e is not None and e.code == "model_error" for e in errors)
    assert any("fail whatever they hold" in e.message for e in errors)
    assert sum("the others go on" in e.message for e in errors) <= 1
