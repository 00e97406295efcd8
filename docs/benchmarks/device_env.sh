# Source from the repository root on the GPU machine: `source docs/benchmarks/device_env.sh`.
# That machine has torch, triton and transformers but no trio stack and no package index: it
# installs the wheels carried in .whl/ (docs/benchmarks/device_wheels.sh makes them), and, since
# the source folders only become `mini_vllm.*` when installed, lays out the package in /tmp/src
# with links to this checkout's folders (edits here are what runs there).
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1
rm -rf /tmp/src && mkdir -p /tmp/src/mini_vllm && cp mini_vllm/*.py /tmp/src/mini_vllm/ || return 1
for d in engine actors transport bench; do ln -s "$PWD/$d" "/tmp/src/mini_vllm/$d"; done
export PYTHONPATH=/tmp/site:/tmp/src
export PYTHONSAFEPATH=1  # as python -P: the checkout's own mini_vllm/ (no engine/ inside) must not shadow /tmp/src
