"""The actors through the embedding API: exact outputs, cancellation, admission, failures, shutdown."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio
from conftest_serving import (
    PROMPTS,
    GatedEngine,
    Reference,
    build_engine,
    collect,
    greedy,
    released,
    wait_blocks_released,
    wait_thread_event,
)

from mini_vllm.actors import (
    DuplicateRequest,
    ModelRequired,
    Overloaded,
    ServiceConfig,
    ShuttingDown,
    UnknownModel,
    open_service,
    plan_kv_budget,
)
from mini_vllm.actors.executor import ExecutorThread
from mini_vllm.engine import ConfigError, EngineArgs, InvalidRequest, LLMEngine, SamplingParams

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=[False, True], ids=["serial", "pipelined"])
def config(request: pytest.FixtureRequest, engine: LLMEngine) -> ServiceConfig:
    """Both ways of the step loop: serial (the CPU default) and one step ahead (the GPU default)."""
    engine.async_scheduling = request.param
    return ServiceConfig()


async def test_streamed_output_equals_the_offline_engine(
    engine: LLMEngine, reference: Reference, config: ServiceConfig
) -> None:
    async with open_service([engine], config) as service:
        for prompt in PROMPTS[:4]:
            got = await collect(service.generate(prompt, **greedy()))
            want = reference(prompt, **greedy())
            assert (got.text, tuple(got.token_ids), got.finish_reason) == (want.text, want.token_ids, "length")
            assert got.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
            assert got.usage.completion_tokens == 12
        await wait_blocks_released(service)


async def test_concurrent_requests_each_equal_running_alone(
    engine: LLMEngine, reference: Reference, config: ServiceConfig
) -> None:
    async with open_service([engine], config) as service:
        results: dict[int, tuple[str, tuple[int, ...]]] = {}

        async def one(i: int) -> None:
            got = await collect(service.generate(PROMPTS[i % len(PROMPTS)], **greedy(8 + i % 5)))
            results[i] = (got.text, tuple(got.token_ids))

        async with trio.open_nursery() as nursery:
            for i in range(24):
                nursery.start_soon(one, i)
        for i, got in results.items():
            want = reference(PROMPTS[i % len(PROMPTS)], **greedy(8 + i % 5))
            assert got == (want.text, want.token_ids)
        assert len(results) == 24
        stats = service.statistics().scheduler("demo")
        assert stats.engine.generation_tokens == sum(8 + i % 5 for i in range(24))
        await wait_blocks_released(service)


async def test_prompt_token_ids_chat_and_n(engine: LLMEngine, reference: Reference, config: ServiceConfig) -> None:
    async with open_service([engine], config) as service:
        ids = reference.tokenizer.encode("Hello")
        got = await collect(service.generate(ids, **greedy()))
        assert tuple(got.token_ids) == reference("Hello", **greedy()).token_ids
        chat = await collect(service.chat([{"role": "user", "content": "hi"}], **greedy(5)))
        assert len(chat.token_ids) == 5 and chat.finish_reason == "length"
        samples: dict[int, list[int]] = {0: [], 1: []}
        finals = {}
        async for delta in service.generate("Hi", n=2, max_tokens=6, temperature=1.0, seed=1, ignore_eos=True):
            for s in delta.samples:
                samples[s.index].extend(s.token_ids)
                if s.finish_reason:
                    finals[s.index] = (s.finish_reason, s.completion_tokens)
        assert finals == {0: ("length", 6), 1: ("length", 6)}
        assert delta.finished and delta.usage.completion_tokens == 12


async def test_leaving_the_loop_early_aborts_and_frees_blocks(engine: LLMEngine, config: ServiceConfig) -> None:
    async with open_service([engine], config) as service:
        async for delta in service.generate("Hello", **greedy(500)):
            assert delta.samples
            break
        await wait_blocks_released(service)
        assert service.statistics().ingress.cancelled == 1
        assert service.statistics().ingress.in_flight == 0


async def test_cancelling_the_iterating_task_aborts(engine: LLMEngine, config: ServiceConfig) -> None:
    async with open_service([engine], config) as service:
        got_one = trio.Event()

        async def consume() -> None:
            async for _ in service.generate("Hello", **greedy(800)):
                got_one.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await got_one.wait()
            assert service.statistics().blocks.used_blocks > 0
            nursery.cancel_scope.cancel()
        await wait_blocks_released(service)


async def test_abort_by_id_ends_with_cancelled_and_usage(engine: LLMEngine, config: ServiceConfig) -> None:
    async with open_service([engine], config) as service:
        finals = []
        async for delta in service.generate("Hello", request_id="mine", **greedy(800)):
            if not finals:
                assert service.abort("mine") is True
                assert service.abort("mine") is False  # already cancelling
            finals.append(delta)
        last = finals[-1]
        assert last.finished and last.samples[-1].finish_reason == "cancelled"
        assert 0 < last.usage.completion_tokens < 800
        assert service.abort("mine") is False and service.abort("never") is False
        await wait_blocks_released(service)


async def test_abort_during_a_step_drops_that_steps_output(engine: LLMEngine, config: ServiceConfig) -> None:
    gated = GatedEngine(engine)
    async with open_service([gated], config) as service:  # type: ignore[list-item]
        generation = service.generate("Hello", request_id="r", **greedy(50))
        with released(gated):
            async with trio.open_nursery() as nursery:
                first = trio.Event()
                deltas = []

                async def consume() -> None:
                    async for d in generation:
                        deltas.append(d)
                        first.set()

                nursery.start_soon(consume)
                await wait_thread_event(gated.entered)  # the prefill step is running in the executor
                assert service.abort("r")
                gated.release.set()
        # The step that was running when the abort came produced a token; it must not be shown.
        assert len(deltas) == 1 and deltas[0].finished
        assert deltas[0].samples[0].finish_reason == "cancelled" and deltas[0].samples[0].token_ids == ()
        await wait_blocks_released(service)


async def test_admission_control_answers_overloaded_at_once(engine: LLMEngine) -> None:
    gated = GatedEngine(engine)
    config = ServiceConfig(max_pending_per_model=2)
    async with open_service([gated], config) as service:  # type: ignore[list-item]
        with released(gated):
            a = service.generate("a", **greedy(3))
            b = service.generate("b", **greedy(3))
            c = service.generate("c", **greedy(3))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, a)
                nursery.start_soon(collect, b)
                await wait_thread_event(gated.entered)
                with pytest.raises(Overloaded, match="queued or running"):
                    await collect(c)
                gated.release.set()
        assert dict(service.statistics().ingress.rejections_by_code) == {"overloaded": 1}
        got = await collect(service.generate("d", **greedy(3)))  # room again
        assert got.finish_reason == "length"


async def test_routing_and_rejections(demo_model_dir: Path, reference: Reference) -> None:
    a = build_engine(demo_model_dir, name="a")
    b = build_engine(demo_model_dir, name="b")
    async with open_service([a, b]) as service:
        assert [m.name for m in service.models()] == ["a", "b"]
        with pytest.raises(ModelRequired, match="several models"):
            await collect(service.generate("x", **greedy()))
        with pytest.raises(UnknownModel, match="'c'"):
            await collect(service.generate("x", model="c", **greedy()))
        with pytest.raises(InvalidRequest, match="max_model_len"):
            await collect(service.generate("x" * 2000, model="a", **greedy()))
        with pytest.raises(InvalidRequest, match="token ids"):
            await collect(service.generate([10**6], model="a", **greedy()))
        got = await collect(service.generate("Hello", model="b", **greedy()))
        assert tuple(got.token_ids) == reference("Hello", **greedy()).token_ids
        assert service.statistics().scheduler("b").engine.generation_tokens == 12
        assert service.statistics().scheduler("a").engine.generation_tokens == 0


async def test_duplicate_request_id(engine: LLMEngine) -> None:
    async with open_service([engine]) as service:
        first = service.generate("x", request_id="same", **greedy(400))
        async for _ in first:
            with pytest.raises(DuplicateRequest):
                await collect(service.generate("y", request_id="same", **greedy()))
            break
        del first
        await wait_blocks_released(service)


async def test_a_failing_step_fails_its_requests_and_the_model_keeps_serving(
    engine: LLMEngine, config: ServiceConfig
) -> None:
    gated = GatedEngine(engine)
    gated.release.set()
    gated.fail_next = RuntimeError("device on fire")
    async with open_service([gated], config) as service:  # type: ignore[list-item]
        failed = await collect(service.generate("Hello", **greedy()))
        assert failed.finish_reason == "error"
        await wait_blocks_released(service)
        ok = await collect(service.generate("Hello", **greedy()))
        assert ok.finish_reason == "length"
        assert service.statistics().scheduler("demo").step_errors == 1


async def test_step_failure_reports_the_error(engine: LLMEngine) -> None:
    gated = GatedEngine(engine)
    gated.release.set()
    gated.fail_next = RuntimeError("device on fire")
    async with open_service([gated]) as service:  # type: ignore[list-item]
        deltas = [d async for d in service.generate("Hello", **greedy())]
        assert deltas[-1].error is not None
        assert deltas[-1].error.code == "model_error" and "device on fire" in deltas[-1].error.message


async def test_shutdown_ends_running_requests_with_a_reason_and_refuses_new(
    engine: LLMEngine, config: ServiceConfig
) -> None:
    async with open_service([engine], config) as service:
        deltas = []
        async for delta in service.generate("Hello", **greedy(800)):
            deltas.append(delta)
            if len(deltas) == 1:
                service.shutdown("maintenance")
        assert deltas[-1].samples[0].finish_reason == "error"
        assert deltas[-1].error is not None and deltas[-1].error.message == "maintenance"
        assert deltas[-1].error.code == "shutting_down"
        with pytest.raises(ShuttingDown):
            await collect(service.generate("x", **greedy()))
        await wait_blocks_released(service)


async def test_leaving_open_service_ends_waiting_consumers(engine: LLMEngine) -> None:
    results = []

    async def consume(generation: object) -> None:
        results.append(await collect(generation))

    async with trio.open_nursery() as outer:
        async with open_service([engine]) as service:
            started = trio.Event()
            generation = service.generate("Hello", **greedy(800))

            async def consume_and_signal() -> None:
                async for _ in generation:
                    started.set()
                    break
                started.set()

            outer.start_soon(consume, service.generate("Hi", **greedy(800)))
            await consume_and_signal()
            await started.wait()
    assert results and results[0].finish_reason == "error"


async def test_statistics_records(engine: LLMEngine) -> None:
    async with open_service([engine]) as service:
        await collect(service.generate("Hello", **greedy(4)))
        stats = service.statistics()
        (sched,) = stats.schedulers
        assert sched.steps >= 4 and sched.pending == 0 and sched.inbox == 0
        (executor,) = stats.executors
        assert executor.alive and executor.jobs == sched.steps and not executor.running
        assert stats.blocks.of("demo").num_blocks == 96
        assert stats.ingress.submitted == 1
        assert stats.loop_lag is not None


async def test_open_service_loads_engine_args_and_reports_progress(demo_model_dir: Path) -> None:
    events = []
    args = [EngineArgs(model=str(demo_model_dir), model_name=n, cpu_kv_cache_bytes=1 << 20, device="cpu") for n in "xy"]
    async with open_service(args, on_progress=events.append) as service:
        stats = service.statistics().blocks
        # Each model got half of the CPU KV budget.
        one_model = LLMEngine.from_engine_args(attrs_evolve(args[0], cpu_kv_cache_bytes=1 << 19))
        assert [m.blocks.num_blocks for m in stats.models] == [one_model.block_manager.num_blocks] * 2
        assert all("1/2" in m.rule for m in stats.models)
    assert [(e.index, e.phase) for e in events] == [(0, "loading"), (0, "loaded"), (1, "loading"), (1, "loaded")]


def attrs_evolve(args: EngineArgs, **changes: object) -> EngineArgs:
    import attrs

    return attrs.evolve(args, **changes)


def test_plan_kv_budget_keeps_explicit_sizes_and_splits_the_cpu_budget() -> None:
    shares = plan_kv_budget(
        [EngineArgs(num_kv_blocks=10, device="cpu"), EngineArgs(device="cpu", cpu_kv_cache_bytes=900)]
    )
    assert shares[0].args.num_kv_blocks == 10 and "given" in shares[0].rule
    assert shares[1].args.cpu_kv_cache_bytes == 450


async def test_duplicate_model_names_are_a_config_error(demo_model_dir: Path) -> None:
    from mini_vllm.engine import ConfigError

    with pytest.raises(ConfigError, match="share the name"):
        async with open_service([build_engine(demo_model_dir), build_engine(demo_model_dir)]):
            pass


async def test_executor_runs_every_job_on_one_dedicated_thread() -> None:
    executor = ExecutorThread("t")
    executor.start()
    try:
        names = {await executor.run(lambda: threading.current_thread().name) for _ in range(3)}
        assert names == {"mini-vllm-executor[t]"}
        with pytest.raises(ZeroDivisionError):
            await executor.run(lambda: 1 / 0)
        assert await executor.run(lambda x: x + 1, 1) == 2
        assert executor.statistics().jobs == 5
    finally:
        await executor.aclose()
    assert not executor.statistics().alive


async def test_sampling_params_and_keywords_are_exclusive(engine: LLMEngine) -> None:
    from mini_vllm.engine import ConfigError

    async with open_service([engine]) as service:
        with pytest.raises(ConfigError, match="not both"):
            service.generate("x", params=SamplingParams(), max_tokens=3)
        with pytest.raises(ConfigError, match="temperature"):
            service.generate("x", temperature=-1)


async def test_cpu_threads_leave_the_event_loop_a_core(engine: LLMEngine) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        async with open_service([engine], ServiceConfig(cpu_threads=2)):
            assert torch.get_num_threads() == 2
        with pytest.raises(ConfigError, match="cpu_threads must be an integer >= 1"):
            ServiceConfig(cpu_threads=0)
    finally:
        torch.set_num_threads(before)
