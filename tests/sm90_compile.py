"""Kernels compiled ahead of time for the H200 (sm_90) on a machine without a GPU, through the ptxas
that ships with triton (tests/test_triton_skinny_aot.py, tests/test_dependent_launch_aot.py).

The compiles run in a child process without ``TRITON_INTERPRET``: the test session sets it on a
machine without CUDA, and interpreted kernels cannot be compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest


def triton_bin() -> Path:
    """Where triton keeps its ptxas and cuobjdump."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_in_child(test_module: str, what: str) -> Any:
    """``test_module.compile_all()`` run in a child process, into a fresh Triton cache (a compile,
    not a cache hit); its JSON. ``what`` names the kernels in the failure message."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sm90-aot-")
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); " \
           f"from {test_module} import compile_all; print(json.dumps(compile_all()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    if done.returncode:
        pytest.fail(f"compiling {what} for sm_90 failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])
