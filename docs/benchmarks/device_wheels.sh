#!/usr/bin/env bash
# Run here, from the repository root, before a GPU lease: downloads into .whl/ (ignored by git) the
# pure-Python wheels the GPU machine lacks for its Python 3.12: the trio stack and prometheus_client. That machine has
# torch, triton, transformers, tokenizers, safetensors, attrs and pytest, and reaches no index.
# Add others with EXTRA="name==version ...". There, `source docs/benchmarks/device_env.sh`.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
  trio==0.35.0 trio-websocket==0.12.2 wsproto==1.3.2 h11==0.16.0 outcome==1.3.0.post0 sniffio==1.3.1 \
  sortedcontainers==2.4.0 idna==3.20 pytest-trio==0.8.0 pytest-timeout==2.4.0 prometheus_client==0.26.0 ${EXTRA:-}
ls -1 .whl
