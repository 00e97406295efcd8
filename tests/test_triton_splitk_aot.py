"""The split-K projection (engine/triton_splitk.py) compiled ahead of time for the H200 (sm_90) on
this machine, no GPU needed: each tile shape it launches compiles through ptxas, fits an SM's
shared memory and keeps its tiles in registers (no stack, no local memory). In a child process
(tests/sm90_compile.py)."""

from __future__ import annotations

import re
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

# name: (block_m, block_n, block_k, splits, dtype, dependent launch)
VARIANTS = {
    "32 x 64 x 64, 2 splits": (32, 64, 64, 2, "bf16", False),
    "32 x 64 x 64, 8 splits": (32, 64, 64, 8, "bf16", False),
    "32 x 64 x 64, unsplit": (32, 64, 64, 1, "bf16", False),
    "64 x 128 x 128, 4 splits": (64, 128, 128, 4, "bf16", False),
    "32 x 64 x 64, 4 splits, fp32": (32, 64, 64, 4, "fp32", False),
    "32 x 64 x 64, 4 splits, dependent launch": (32, 64, 64, 4, "bf16", True),
}
SHARED_MEMORY_PER_BLOCK = 232_448  # sm_90's opt-in maximum, bytes


def resources(variant: tuple[int, int, int, int, str, bool]) -> dict[str, int]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mini_vllm.engine.triton_splitk import _splitk_kernel

    block_m, block_n, block_k, splits, dtype, pdl = variant
    pointer = f"*{dtype}"
    signature: dict[str, str] = {"x": pointer, "w": pointer, "y": pointer, "partial": "*fp32", "counters": "*i32"}
    signature.update(dict.fromkeys(("M", "N", "K", "blocks_per_split", "stride_x", "stride_w", "stride_y"), "i32"))
    constexprs: dict[str, Any] = {"SPLITS": splits, "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
                                  "UPCAST_DOT": False, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                  "EVEN_K": True, "USE_PDL": pdl}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    names = list(_splitk_kernel.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, t in signature.items()
             if t not in ("constexpr",) and a not in ("M", "N", "K", "blocks_per_split")}  # as launched: not specialized
    compiled = triton.compile(ASTSource(fn=_splitk_kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 3, "launch_pdl": pdl})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    line = next(line for line in dump.splitlines() if "REG:" in line)
    used = {key: int(value) for key, value in (f.split(":") for f in line.split() if ":" in f) if value.isdigit()}
    ptx = compiled.asm["ptx"]
    return {**used, "shared_bytes": compiled.metadata.shared, "griddepcontrol": ptx.count("griddepcontrol."),
            "atomics": ptx.count("atom."),
            # Operands fetched 16 bytes at a time (into shared memory, for the pipeline) or one element at a time.
            "wide_copies": len(re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], 0x10", ptx)),
            "narrow_loads": len(re.findall(r"ld\.global(?:\.[a-z]+)*\.(?:b16|u16) ", ptx))}  # bf16 elements


def compile_all() -> dict[str, dict[str, int]]:
    return {name: resources(v) for name, v in VARIANTS.items()}


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, int]]:
    return compile_in_child("test_triton_splitk_aot", "the split-K kernels")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiles_for_sm90_fits_an_sm_and_keeps_its_tiles_in_registers(
    compiled: dict[str, dict[str, int]], name: str
) -> None:
    used = compiled[name]
    assert 0 < used["REG"] <= 255 and used["STACK"] == 0 and used["LOCAL"] == 0, used
    assert 0 < used["shared_bytes"] <= SHARED_MEMORY_PER_BLOCK, used
    splits, pdl = VARIANTS[name][3], VARIANTS[name][5]
    assert used["griddepcontrol"] == (2 if pdl else 0), used
    # Split: the tile's counter bumped, then zeroed by the last program; unsplit: no atomics at all.
    assert (used["atomics"] > 0) == (splits > 1), used
    # x and W in 16-byte copies: a slice start the compiler could not prove aligned once made every
    # load a 2-byte one, and the kernel 3-8x slower than cuBLAS on the H200 (splitk-sweep-20261203-b5312ec.json).
    assert used["wide_copies"] > 0 and used["narrow_loads"] == 0, used
