"""Embed mini-vllm in a trio program: no server, no sockets, the same actors.

    python examples/embed.py            # the built-in demo model
    python examples/embed.py PATH       # a Hugging Face model directory (config.json + *.safetensors)

``open_service`` loads the models, starts a scheduler and an executor thread per model in a
nursery, and hands back a ``Service``. Leaving the ``async with`` stops everything.
"""

from __future__ import annotations

import sys

import trio

from mini_vllm import EngineArgs, ServiceConfig, open_service


async def main(model: str | None) -> None:
    args = EngineArgs(model=model)
    async with open_service([args], ServiceConfig(max_pending_per_model=64)) as service:
        (info,) = service.models()
        print(f"loaded {info.name} (max {info.max_model_len} tokens)")

        # One request: deltas as they come; the last one carries the finish reason and usage.
        async for delta in service.generate("The capital of France is", max_tokens=24, temperature=0):
            print(delta.samples[0].text if delta.samples else "", end="", flush=True)
            if delta.finished:
                print(f"\n[{delta.samples[-1].finish_reason}; usage {delta.usage}]")

        # Several at once from different tasks: the scheduler batches them together.
        async def ask(i: int) -> None:
            text = []
            async for delta in service.generate(f"Question {i}:", max_tokens=12, temperature=0.7, seed=i):
                text.extend(s.text for s in delta.samples)
            print(f"{i}: {''.join(text)!r}")

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(ask, i)

        # Cancellation is ordinary trio cancellation: the request is aborted, its blocks freed.
        with trio.move_on_after(0.2):
            async for _ in service.generate("An endless story", max_tokens=4000, ignore_eos=True):
                pass
        await service.wait_idle()
        blocks = service.statistics().blocks.of(info.name)
        print(f"after the timeout: {blocks.used_blocks} KV blocks in use, {blocks.free_blocks} free")


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else None)
