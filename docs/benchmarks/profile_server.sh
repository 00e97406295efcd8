#!/usr/bin/env bash
# Where the server's processes spend their time at saturation: py-spy samples the frontend and its
# engine core while `bench throughput --path server` runs. Run from the repository root:
#
#   bash docs/benchmarks/profile_server.sh OUT [bench throughput flags, e.g. --model qwen3-0.6b --workload ONLINE-1000]
#
# Writes OUT/frontend.txt and OUT/core.txt (py-spy's collapsed stacks, idle samples included, so
# the share of samples in the event loop's wait is the share of time the process had nothing to do),
# and the benchmark's JSON and log. Needs py-spy (pip install py-spy) and permission to ptrace.
set -u
OUT=${1:?output directory}
shift
mkdir -p "$OUT"
PY=${PY:-python3}
SPY=${SPY:-py-spy}
$PY -m mini_vllm bench throughput --path server --output-dir "$OUT" "$@" > "$OUT/bench.log" 2>&1 &
BENCH=$!
for _ in $(seq 1 1200); do  # the timed run starts after the server's start-up and the warm-up
  grep -q "client processes" "$OUT/bench.log" && break
  kill -0 $BENCH 2>/dev/null || break
  sleep 0.25
done
sleep "${DELAY_S:-12}"  # the client processes start (they import torch) and connect first
FRONT=$(pgrep -f "mini_vllm serve" | head -1)
CORE=$(pgrep -f "mini_vllm.actors.core_process" | head -1)
echo "frontend pid ${FRONT:-?}, core pid ${CORE:-?}"
[ -n "$FRONT" ] && $SPY record -p "$FRONT" -r 200 -d "${SAMPLE_S:-10}" --idle --nonblocking -f raw -o "$OUT/frontend.txt" > "$OUT/spy-frontend.log" 2>&1 &
[ -n "$CORE" ] && $SPY record -p "$CORE" -r 200 -d "${SAMPLE_S:-10}" --idle --nonblocking -f raw -o "$OUT/core.txt" > "$OUT/spy-core.log" 2>&1 &
wait
tail -12 "$OUT/bench.log"
