"""Every kernel that programmatic dependent launch covers (``--programmatic-dependent-launch``),
compiled ahead of time for the H200 (sm_90) on this machine, no GPU needed: with ``USE_PDL`` its
PTX holds the wait for the kernel before it, ahead of its first global load or store, and the
signal to the next one (``griddepcontrol``), and its launch is marked for it; without, neither. (The skinny kernel's variants are in
tests/test_triton_skinny_aot.py.) Compiled in a child process, as there (tests/sm90_compile.py)."""

from __future__ import annotations

from typing import Any

import pytest

triton = pytest.importorskip("triton")

from sm90_compile import compile_in_child, triton_bin  # noqa: E402

pytestmark = pytest.mark.skipif(not (triton_bin() / "ptxas").exists(), reason="triton without its ptxas")

# qwen3-0.6b's shapes: hidden 1024, 16 heads and 8 KV heads of 128, intermediate 3072, blocks of 16.
# kernel: (module, pointer arguments and their types, constexprs, num_warps); the other
# arguments are i32 but for the ones named in FLOATS.
KERNELS: dict[str, tuple[str, dict[str, str], dict[str, Any], int]] = {
    "_rms_norm_kernel": ("triton_norm", dict.fromkeys(("x", "residual", "weight", "out", "res_out"), "*bf16"),
                         {"HAS_RESIDUAL": True, "BLOCK": 1024, "PAIRWISE": False}, 4),
    "_silu_mul_kernel": ("triton_norm", dict.fromkeys(("gate_up", "out"), "*bf16"), {"BLOCK": 1024}, 4),
    "_qkv_prologue_kernel": (
        "triton_qkv",
        {"qkv": "*bf16", "positions": "*i64", "cos": "*fp32", "sin": "*fp32", "q_weight": "*bf16",
         "k_weight": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "slot_mapping": "*i64"},
        {"NUM_HEADS": 16, "NUM_KV_HEADS": 8, "HALF": 64, "BLOCK_HALF": 64, "BLOCK_D": 128, "BLOCK_T": 16,
         "BLOCK_SIZE": 16, "HAS_NORM": True, "IS_BF16": True}, 4),
    "_decode_split_kernel": (
        "triton_attention",
        {"query": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "part_out": "*fp32", "part_lse": "*fp32",
         "out": "*bf16", "seq_lens": "*i32", "block_tables": "*i32", "order": "*i32"},
        {"NUM_HEADS": 16, "GROUP": 2, "BLOCK_G": 16, "BLOCK_N": 64, "HEAD_DIM": 128, "BLOCK_D": 128,
         "BLOCK_SIZE": 16, "DOT_PRECISION": "tf32", "UPCAST_DOT": False, "DIRECT": False, "ORDERED": True}, 4),
    "_decode_reduce_kernel": (
        "triton_attention", {"part_out": "*fp32", "part_lse": "*fp32", "out": "*bf16"},
        {"NUM_HEADS": 16, "BLOCK_S": 8, "HEAD_DIM": 128, "BLOCK_D": 128}, 4),
}
FLOATS = ("eps", "scale_log2")


def compile_one(name: str, pdl: bool) -> dict[str, int]:
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, pointers, constexprs, warps = KERNELS[name]
    fn = getattr(importlib.import_module(f"mini_vllm.engine.{module}"), name)
    constexprs = {**constexprs, "USE_PDL": pdl}
    signature = {a: "constexpr" if a in constexprs else pointers.get(a, "fp32" if a in FLOATS else "i32")
                 for a in fn.arg_names}
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items() if t.startswith("*")}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "launch_pdl": pdl})
    ptx = compiled.asm["ptx"].splitlines()
    memory = [i for i, line in enumerate(ptx) if "ld.global" in line or "st.global" in line]
    waits = [i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line]
    return {"griddepcontrol": sum("griddepcontrol." in line for line in ptx), "launch_pdl": int(compiled.metadata.launch_pdl),
            # the wait before the kernel's first global load or store: nothing it reads can be stale
            "waits_first": int(bool(waits) and waits[0] < memory[0])}


def compile_all() -> dict[str, dict[str, int]]:
    return {f"{name} {pdl}": compile_one(name, pdl) for name in KERNELS for pdl in (False, True)}


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, int]]:
    return compile_in_child("test_dependent_launch_aot", "the dependent-launch kernels")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "dependent-launch"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_the_kernel_waits_and_signals_only_when_launched_for_it(
    compiled: dict[str, dict[str, int]], name: str, pdl: bool
) -> None:
    assert compiled[f"{name} {pdl}"] == ({"griddepcontrol": 2, "launch_pdl": 1, "waits_first": 1} if pdl else
                                        {"griddepcontrol": 0, "launch_pdl": 0, "waits_first": 0})
