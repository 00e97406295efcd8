"""The skinny kernel compiled ahead of time for the H200 (sm_90) on this machine, no GPU needed:
every variant the served models launch compiles through ptxas, its pipeline stages fit an SM's
shared memory (else the launch fails), and its tiles stay in registers (no stack: a spill would
send each thread's tiles through local memory). Compiled in a child process (tests/sm90_compile.py)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

triton = pytest.importorskip("triton")

from sm90_compile import compile_in_child, triton_bin  # noqa: E402

BIN = triton_bin()
pytestmark = pytest.mark.skipif(not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
                                reason="triton without its ptxas and cuobjdump")

# name: (N, K, silu, dtype, dependent launch); N is the intermediate size for SiLU
VARIANTS = {
    "llama3-8b o": (4096, 4096, False, "bf16", False),
    "llama3-8b gate_up": (14336, 4096, True, "bf16", False),
    "llama3-8b down": (4096, 14336, False, "bf16", False),
    "qwen3-0.6b o": (1024, 2048, False, "bf16", False),
    "qwen3-0.6b gate_up": (3072, 1024, True, "bf16", False),
    "qwen3-0.6b down": (1024, 3072, False, "bf16", False),
    "llama3-8b o, fp32": (4096, 4096, False, "fp32", False),  # the tests' exactness dtype; 512-long K tiles would not fit
    "llama3-8b gate_up, fp32": (14336, 4096, True, "fp32", False),
    "llama3-8b down, fp32": (4096, 14336, False, "fp32", False),
    # With programmatic dependent launch (--programmatic-dependent-launch): it waits for the kernel
    # before it and lets the next one start, in two griddepcontrol instructions.
    "llama3-8b down, dependent launch": (4096, 14336, False, "bf16", True),
    "qwen3-0.6b gate_up, dependent launch": (3072, 1024, True, "bf16", True),
}


SHARED_MEMORY_PER_BLOCK = 232_448  # sm_90's opt-in maximum, bytes


def resources(variant: tuple[int, int, bool, str, bool]) -> dict[str, int]:
    """Compile one variant for sm_90 (in a process whose kernels are not interpreted): its
    registers, stack and local memory per thread from the cubin, and its shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mini_vllm.engine.triton_skinny import MAX_ROWS, _skinny_kernel, skinny_tiles

    n, k, silu, dtype, pdl = variant
    pointer = f"*{dtype}"
    signature: dict[str, str] = dict.fromkeys(("x", "w", "y"), pointer)
    signature.update(dict.fromkeys(("M", "stride_x", "stride_w", "stride_y"), "i32"))
    block_n, block_k, stages = skinny_tiles(n, k, silu=silu, element_size=4 if dtype == "fp32" else 2)
    constexprs: dict[str, Any] = {"N": n, "K": k, "SILU": silu, "IS_BF16": dtype == "bf16",
                                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST_DOT": False,
                                  "BLOCK_M": MAX_ROWS, "BLOCK_N": block_n, "BLOCK_K": block_k, "USE_PDL": pdl}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    # What the launcher tells the compiler at run time: torch's allocations are 16-byte aligned and
    # these shapes' row strides are multiples of 16 (so loads can be vectorized).
    names = list(_skinny_kernel.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items()
             if t in (pointer, "i32") and a != "M"}
    compiled = triton.compile(ASTSource(fn=_skinny_kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": stages, "launch_pdl": pdl})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    line = next(line for line in dump.splitlines() if "REG:" in line)
    used = {key: int(value) for key, value in (f.split(":") for f in line.split() if ":" in f) if value.isdigit()}
    return {**used, "shared_bytes": compiled.metadata.shared, "griddepcontrol": compiled.asm["ptx"].count("griddepcontrol."),
            "launch_pdl": int(compiled.metadata.launch_pdl)}


def compile_all() -> dict[str, dict[str, int]]:
    return {name: resources(v) for name, v in VARIANTS.items()}


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, int]]:
    return compile_in_child("test_triton_skinny_aot", "the skinny kernels")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiles_for_sm90_fits_an_sm_and_keeps_its_tiles_in_registers(
    compiled: dict[str, dict[str, int]], name: str
) -> None:
    used = compiled[name]
    assert 0 < used["REG"] <= 255 and used["STACK"] == 0 and used["LOCAL"] == 0, used
    assert 0 < used["shared_bytes"] <= SHARED_MEMORY_PER_BLOCK, used
    pdl = VARIANTS[name][4]
    assert (used["griddepcontrol"], used["launch_pdl"]) == ((2, 1) if pdl else (0, 0)), used
