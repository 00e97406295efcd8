"""The engine core in a process of its own: the same streams as in-process, cancellation reaching
the core's blocks, a killed core ending its requests without taking the other models down, and no
core outliving its server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest_serving import SMALL_KV_BLOCKS, Reference, greedy, raw_client, running_server, wait_blocks_released

from mini_vllm.actors import ServiceConfig
from mini_vllm.engine import EngineArgs
from mini_vllm.transport.client import GenerationFailed, RequestRejected, connect

pytestmark = pytest.mark.timeout(180)
IN_A_PROCESS = ServiceConfig(core_process=True, loop_lag_interval=None)
PROMPTS = ["Hello", "The capital of France is", "abc abc abc"]


@pytest.fixture(scope="module")
def reference(demo_model_dir: Path) -> Reference:
    return Reference(demo_model_dir)


def _args(model_dir: Path, name: str = "demo") -> EngineArgs:
    return EngineArgs(model=str(model_dir), model_name=name, num_kv_blocks=SMALL_KV_BLOCKS, device="cpu")


async def test_greedy_streams_equal_the_offline_engine_with_the_core_in_its_own_process(
    demo_model_dir: Path, reference: Reference
) -> None:
    async with running_server([_args(demo_model_dir)], config=IN_A_PROCESS) as (service, server):
        (pid,) = service.core_pids().values()
        assert pid is not None and pid != os.getpid()
        results: dict[str, tuple[str, list[int]]] = {}
        async with connect(server.url) as client:

            async def one(prompt: str) -> None:
                text, ids = "", []
                async for delta in client.generate(prompt, **greedy(10)):
                    text += delta.text
                    ids.extend(delta.token_ids)
                results[prompt] = (text, ids)

            async with trio.open_nursery() as nursery:
                for prompt in PROMPTS:
                    nursery.start_soon(one, prompt)
        for prompt in PROMPTS:
            want = reference(prompt, **greedy(10))
            assert results[prompt] == (want.text, list(want.token_ids)), prompt
        await wait_blocks_released(service)
        assert service.statistics().scheduler("demo").engine.generation_tokens == 30


async def test_cancel_and_disconnect_free_every_block_in_the_core(demo_model_dir: Path) -> None:
    long = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}
    async with running_server([_args(demo_model_dir)], config=IN_A_PROCESS) as (service, server):
        async with connect(server.url) as client:
            async with client.generate("Hello there", **long) as stream:
                async for _ in stream:
                    break  # leaving early sends cancel
        async with raw_client(server.url) as raw:
            await raw.send({"type": "generate", "id": "x", "prompt": "Hi", **long})
            await raw.until(lambda f: f["type"] == "token")
        # the socket closed: the server aborts the request; the core frees its blocks
        await wait_blocks_released(service)
        assert service.statistics().scheduler("demo").engine.num_requests == 0


async def test_a_killed_core_ends_its_requests_and_the_other_model_keeps_serving(demo_model_dir: Path) -> None:
    models = [_args(demo_model_dir, "a"), _args(demo_model_dir, "b")]
    async with running_server(models, config=IN_A_PROCESS) as (service, server):
        async with connect(server.url) as client:
            stream = client.generate("Hello", model="a", max_tokens=400, ignore_eos=True, temperature=0)
            with pytest.raises(GenerationFailed) as failed:
                async for _ in stream:
                    os.kill(service.core_pids()["a"], signal.SIGKILL)  # mid-stream
            assert failed.value.code == "engine_core_exited"
            assert "killed by signal 9" in str(failed.value)
            with pytest.raises(RequestRejected) as rejected:
                await client.complete("Hello", model="a", max_tokens=2)
            assert rejected.value.code == "engine_core_exited"
            done = await client.complete("Hello", model="b", **greedy(4))
            assert len(done.token_ids) == 4
            assert {m.name: m.available for m in await client.models()} == {"a": False, "b": True}
            stats = await client.stats()
            assert {s["model"]: s["available"] for s in stats["service"]["schedulers"]} == {"a": False, "b": True}


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_no_core_outlives_a_server_killed_with_sigkill(demo_model_dir: Path) -> None:
    server = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mini_vllm", "serve", "--port", "0", "--model", f"demo={demo_model_dir}",
         "--num-kv-blocks", str(SMALL_KV_BLOCKS)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        out = b""
        with trio.fail_after(120):
            while b"\n" not in out:
                out += await server.stdout.receive_some()
        assert b"serving demo on ws://" in out, out
        (core,) = _children(server.pid)
        assert _alive(core)
        server.kill()
        await server.wait()
        with trio.fail_after(30):
            while _alive(core):  # noqa: ASYNC110 (another process dying: no event to wait on)
                await trio.sleep(0.05)
    finally:
        server.kill()
        await server.wait()


async def _answers(url: str) -> list[object]:
    """Samples with seeds, logprobs and a stop string, and a prompt too long for the model."""
    got: list[object] = []
    async with connect(url) as client:
        # Per sample, the whole of it: how deltas are merged depends on timing, not on the boundary.
        text: dict[int, str] = {}
        ids: dict[int, list[int]] = {}
        logprobs: dict[int, list[object]] = {}
        reasons: dict[int, str | None] = {}
        async for d in client.generate("Hello", n=2, seed=7, temperature=0.9, max_tokens=12, logprobs=2):
            text[d.index] = text.get(d.index, "") + d.text
            ids.setdefault(d.index, []).extend(d.token_ids)
            logprobs.setdefault(d.index, []).extend(d.logprobs or ())
            reasons[d.index] = d.finish_reason or reasons.get(d.index)
        got.append([(i, text[i], ids[i], logprobs[i], reasons[i]) for i in sorted(text)])
        full = (await client.complete("abc abc abc", max_tokens=30, temperature=0)).text
        stop = next(c for c in full[5:] if c.isascii() and c.isalnum())  # a stop string that will occur
        cut, reason = "", None
        async for d in client.generate("abc abc abc", stop=[stop], max_tokens=30, temperature=0):
            cut += d.text
            reason = d.finish_reason or reason
        got.append((cut, reason, full.index(stop)))
        with pytest.raises(RequestRejected) as rejected:
            await client.complete([3] * 5000, max_tokens=2)
        got.append((rejected.value.code, str(rejected.value)))
    return got


async def test_sampling_logprobs_stops_and_rejections_cross_the_process_boundary_unchanged(
    demo_model_dir: Path,
) -> None:
    async with running_server([_args(demo_model_dir)], config=IN_A_PROCESS) as (_, server):
        across = await _answers(server.url)
    in_process = ServiceConfig(core_process=False, loop_lag_interval=None)
    async with running_server([_args(demo_model_dir)], config=in_process) as (_, server):
        here = await _answers(server.url)
    assert across == here
    assert [len(sample[2]) for sample in across[0]] == [12, 12]  # type: ignore[index]
    text, reason, at = across[1]  # type: ignore[misc]
    assert reason == "stop" and len(text) == at  # the text ends where the stop string begins
    assert across[2][0] == "invalid_request"


@pytest.mark.parametrize("core_process", [False, True], ids=["in-process", "own-process"])
async def test_stop_strings_made_in_the_frontend_equal_the_offline_engine(
    demo_model_dir: Path, reference: Reference, core_process: bool
) -> None:
    """The frontend detokenizes and ends a sample at its stop string (the core only sees ids and
    an abort): text, ids and reasons as the offline engine, which checks stop strings itself."""
    config = ServiceConfig(core_process=core_process, loop_lag_interval=None)
    cases = []
    for prompt in PROMPTS:
        full = reference(prompt, **greedy(24))
        picks = [c for c in full.text[3:] if c.isascii() and c.isalnum()]
        cases.append((prompt, [picks[0], "never-there"] if picks else ["never-there"]))
    async with running_server([_args(demo_model_dir)], config=config) as (service, server):
        async with connect(server.url) as client:
            for prompt, stop in cases:
                done = await client.complete(prompt, stop=stop, **greedy(24))
                want = reference(prompt, stop=stop, **greedy(24))
                assert (done.text, list(done.token_ids), done.finish_reason) == (
                    want.text, list(want.token_ids), want.finish_reason), (prompt, stop)
                assert done.usage.completion_tokens == len(want.token_ids)
            # n > 1: each sample stops on its own; the request ends when the last one does
            samples: dict[int, str] = {}
            reasons: dict[int, str] = {}
            async for d in client.generate("Hello", n=3, seed=3, temperature=1.0, max_tokens=40, stop=["a", "e"]):
                samples[d.index] = samples.get(d.index, "") + d.text
                if d.finish_reason is not None:
                    reasons[d.index] = d.finish_reason
        assert set(reasons) == {0, 1, 2}
        assert all("a" not in t and "e" not in t for t in samples.values())
        await wait_blocks_released(service)


@pytest.mark.parametrize("core_process", [False, True], ids=["in-process", "own-process"])
async def test_a_model_that_fails_to_load_is_reported_at_once(tmp_path: Path, core_process: bool) -> None:
    from mini_vllm.engine import ModelLoadError

    config = ServiceConfig(core_process=core_process, loop_lag_interval=None)
    # Within less than the 10 s grace a running core gets to stop: a core that never served has
    # nothing to end, so the error comes at once (a process needs a few seconds to import torch).
    with trio.fail_after(8 if core_process else 5):
        with pytest.raises(ModelLoadError, match="no such directory"):
            async with running_server([EngineArgs(model=str(tmp_path / "missing"))], config=config):
                pass
