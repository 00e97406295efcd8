"""The prefill kernel, with its one-token branch for a mixed step's decode rows, compiled ahead of
time for the H200 (sm_90) on this machine, no GPU needed: at the served models' shapes (bf16,
heads of 128, kv groups of 2 and 4, the 128 x 32 tiles at 8 warps and 2 stages) it fits an SM's
shared memory and keeps its tiles in registers (no stack, no local memory: a spill would slow
every prefill). Compiled in a child process (tests/sm90_compile.py)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

triton = pytest.importorskip("triton")

from sm90_compile import compile_in_child, triton_bin  # noqa: E402

pytestmark = pytest.mark.skipif(not (triton_bin() / "ptxas").exists(), reason="triton without its ptxas")

SHARED_MEMORY_PER_BLOCK = 232_448  # sm_90's opt-in maximum, bytes
GROUPS = {"qwen3-0.6b": 2, "llama3-8b": 4}  # query heads per kv head


def resources(group: int) -> dict[str, int]:
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mini_vllm.engine.triton_attention import _prefill_kernel, decode_block_n, tile_sizes

    block_m, block_n = tile_sizes(128, torch.bfloat16)
    fn = _prefill_kernel
    pointers = dict.fromkeys(("query", "k_cache", "v_cache", "out"), "*bf16")
    pointers.update(dict.fromkeys(("tile_map", "query_start_loc", "seq_lens", "block_tables", "tile_count"), "*i32"))
    constexprs: dict[str, Any] = {
        "GROUP": group, "TOKENS_PER_TILE": block_m // group, "BLOCK_M": block_m, "BLOCK_N": block_n, "HEAD_DIM": 128,
        "BLOCK_D": 128, "BLOCK_SIZE": 16, "DOT_PRECISION": "tf32", "UPCAST_DOT": False, "COUNT_ON_DEVICE": True,
        "ONE_BLOCK_G": 16, "ONE_BLOCK_N": decode_block_n(128, torch.bfloat16),
    }
    signature = {a: "constexpr" if a in constexprs else pointers.get(a, "fp32" if a == "scale_log2" else "i32")
                 for a in fn.arg_names}
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items() if t.startswith("*")}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run([str(triton_bin() / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    line = next(line for line in dump.splitlines() if "REG:" in line)
    used = {key: int(value) for key, value in (f.split(":") for f in line.split() if ":" in f) if value.isdigit()}
    return {**used, "shared_bytes": compiled.metadata.shared}


def compile_all() -> dict[str, dict[str, int]]:
    return {name: resources(group) for name, group in GROUPS.items()}


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, int]]:
    return compile_in_child("test_triton_attention_aot", "the prefill kernel")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(GROUPS))
def test_prefill_kernel_compiles_for_sm90_without_spills(compiled: dict[str, dict[str, int]], name: str) -> None:
    used = compiled[name]
    assert 0 < used["REG"] <= 255 and used["STACK"] == 0 and used["LOCAL"] == 0, used
    assert 0 < used["shared_bytes"] <= SHARED_MEMORY_PER_BLOCK, used
