# The A/B of 2026-12-02 (tree df476cf against 7a02678, one lease), as run on the H200 from the
# repository root: `bash docs/benchmarks/order_ab_h200.sh` after `mkdir -p .ab/engine` and
# `git show 7a02678:engine/F > .ab/engine/F` for attention.py, cuda_runner.py, triton_attention.py
# (the files the change touched; .ab/ is not committed). B is the working tree, A the same tree
# with the old files; each model B then A, then decode_order_probe.py and the GPU tests.
source docs/benchmarks/device_env.sh; export MINI_VLLM_COMMIT=df476cf
S=$OUT/summary.log
rm -rf /tmp/a && mkdir /tmp/a && cp -a . /tmp/a/ && cp .ab/engine/*.py /tmp/a/engine/
bench() { timeout 150 python3 -m mini_vllm.cli bench throughput --model $1 --load-format dummy --path offline --output-dir $2 > /tmp/bench.log 2>&1; echo "$3 $1: $(grep -E 'output tok/s|fraction of floor|CPU ms per decode' /tmp/bench.log | tr -s ' ' | tr '\n' ';')" >> $S; }
for m in qwen3-0.6b llama3-8b; do
  bench $m $OUT/B B-df476cf
  (cd /tmp/a && source docs/benchmarks/device_env.sh && export MINI_VLLM_COMMIT=7a02678 && bench $m $OUT/A A-7a02678)
  source docs/benchmarks/device_env.sh
done
for m in qwen3-0.6b llama3-8b; do timeout 60 python3 docs/benchmarks/decode_order_probe.py $m $OUT/decode-order-$m-df476cf.json >> $S 2>&1; done
timeout 130 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_engine.py > $OUT/gpu_tests-df476cf.log 2>&1
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_attention_gpu.py >> $OUT/gpu_tests-df476cf.log 2>&1
grep -E "passed|failed" $OUT/gpu_tests-df476cf.log >> $S; cat $S
