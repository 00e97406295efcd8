"""On a GPU: two models served at once, each on its own streams (and in its own engine core process),
their KV shares within budget."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import trio

from mini_vllm.actors import ServiceConfig, open_service
from mini_vllm.engine import LLM, EngineArgs, ModelConfig, SamplingParams
from mini_vllm.engine.kv_cache import bytes_per_block

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = [[5, 6, 7], [9] * 40, list(range(3, 200)), [42] * 17]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("core_process", [False, True], ids=["core-in-process", "core-processes"])
async def test_two_models_on_one_gpu_stream_like_each_alone(tiny_model: Callable[..., Path], core_process: bool) -> None:
    paths = {"llama": tiny_model("LlamaForCausalLM"), "qwen3": tiny_model("Qwen3ForCausalLM")}
    params = SamplingParams(temperature=0, max_tokens=24)
    # One sequence per step on both sides: a sequence's fp32 logits depend on the batch it runs in
    # (cuBLAS picks kernels by batch size, decode attention its split count), and concurrent
    # arrivals make the served batches timing-dependent. Isolation is what is tested here.
    alone = {}
    for name, path in paths.items():
        llm = LLM(str(path), dtype="float32", num_kv_blocks=256, max_num_seqs=1)
        alone[name] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        del llm
    torch.cuda.empty_cache()

    util = 0.5
    args = [
        EngineArgs(model=str(p), model_name=n, dtype="float32", gpu_memory_utilization=util, max_num_seqs=1)
        for n, p in paths.items()
    ]
    got: dict[tuple[str, int], list[int]] = {}
    # With core processes each model's core is a process of its own on the one GPU; the second
    # measures its KV share after the first took its own, as in one process.
    async with open_service(args, ServiceConfig(core_process=core_process)) as service:

        async def one(name: str, i: int) -> None:
            ids: list[int] = []
            async for delta in service.generate(PROMPTS[i], model=name, params=params):
                for s in delta.samples:
                    ids.extend(s.token_ids)
            got[(name, i)] = ids

        async with trio.open_nursery() as nursery:
            for name in paths:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(one, name, i)
        kv_bytes = 0
        for sched in service.statistics().schedulers:
            config = ModelConfig.from_file(paths[sched.model] / "config.json")
            kv_bytes += sched.engine.num_kv_blocks * bytes_per_block(config, sched.engine.block_size, torch.float32)
        assert kv_bytes <= util * torch.cuda.get_device_properties(0).total_memory
    for name in paths:
        assert [got[(name, i)] for i in range(len(PROMPTS))] == alone[name]
