"""Talk to a running mini-vllm server with the bundled async client.

    mini-vllm serve                      # in one terminal (prints ws://127.0.0.1:8000)
    python examples/client.py            # in another; or: python examples/client.py ws://HOST:PORT

Shows the model list, one streamed answer, several requests at once over the same connection,
and a request cancelled halfway (by leaving the ``async for`` early).
"""

from __future__ import annotations

import sys

import trio

from mini_vllm import ClientError, connect


async def main(url: str) -> None:
    async with connect(url) as client:
        models = await client.models()
        print("models:", ", ".join(f"{m.name} (max {m.max_model_len} tokens)" for m in models))
        model = models[0].name

        print("\n-- one request, streamed --")
        async for delta in client.generate("Once upon a time", model=model, max_tokens=32, temperature=0):
            print(delta.text, end="", flush=True)
            if delta.finish_reason:
                print(f"\n[{delta.finish_reason}; {delta.usage.completion_tokens} tokens]")

        print("\n-- four requests at once on one connection --")
        results: dict[int, str] = {}

        async def one(i: int) -> None:
            done = await client.complete(f"Story number {i}:", model=model, max_tokens=16, temperature=0.8, seed=i)
            results[i] = f"{done.finish_reason}, {done.usage.completion_tokens} tokens: {done.text!r}"

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
        for i in sorted(results):
            print(f"{i}: {results[i]}")

        print("\n-- leaving early cancels on the server --")
        received = 0
        async for delta in client.generate("A very long story", model=model, max_tokens=1000, ignore_eos=True):
            received += len(delta.token_ids)
            if received >= 8:
                break  # the client sends {"type": "cancel"}; the server frees the request's KV blocks
        print(f"stopped after {received} tokens")

        print("\n-- errors are typed exceptions --")
        try:
            await client.complete("Hi", model=model, temperature=-1)
        except ClientError as exc:
            print(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8000")
