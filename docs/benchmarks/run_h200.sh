#!/usr/bin/env bash
# One lease of the H200: GPU correctness tests, then OFFLINE-256 on both presets.
# Run from the repository root on the GPU machine: bash docs/benchmarks/run_h200.sh OUT_DIR [PEER]
# (PEER=transformers adds the peer runs; each takes minutes. MODELS, PATHS, WORKLOAD, SKIP_TESTS=1 narrow it.) That machine has no git: pass the
# commit along as MINI_VLLM_COMMIT=$(git rev-parse --short HEAD) so the JSON records it. Source
# docs/benchmarks/device_env.sh first (wheels, and the mini_vllm package laid out in /tmp/src).
set -u
OUT=${1:?output directory}
PEER=${2:-none}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  set -o pipefail
  timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_triton_attention_gpu.py tests/test_gpu_engine.py tests/test_gpu_mixed_graphs.py tests/test_gpu_head_sizes.py tests/test_gpu_serving.py tests/test_gpu_lifecycle.py -s \
    2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|Error|equal|tie" | tail -25 \
    || { echo "GPU tests failed: no benchmark on a wrong engine"; exit 1; }
fi
for model in ${MODELS:-qwen3-0.6b llama3-8b}; do
  trace=""
  [ "$model" = qwen3-0.6b ] && trace="--trace $OUT/trace"
  timeout ${BENCH_TIMEOUT:-400} python3 -m mini_vllm bench throughput --model "$model" --path ${PATHS:-offline,actors,server} --workload ${WORKLOAD:-OFFLINE-256} --peer "$PEER" \
    $trace --output-dir "$OUT" 2>&1 | tee "$OUT/bench-$model.log" | grep -vE "^\[(offline|actors|peer)\]" | tail -20
done
