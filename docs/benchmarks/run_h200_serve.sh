#!/usr/bin/env bash
# The serving study on one GPU: a server process per configuration (mini-vllm serve) and the load
# generator in another process (mini-vllm bench serve --url), so that neither's event loop slows
# the other. Run from the repository root:
#
#   bash docs/benchmarks/run_h200_serve.sh OUT PART
#
# PART: floor   one stream of llama3-8b: TPOT, and TTFT of a 1024-token prompt
#       floor-cublas  the same with --no-skinny-kernels (cuBLAS for every projection)
#       floor-no-pdl  the same with --no-programmatic-dependent-launch
#       llama   ONLINE-1000 sweep of llama3-8b
#       qwen    ONLINE-1000 sweep of qwen3-0.6b
#       knobs   qwen3-0.6b, each knob varied alone from the defaults (ONLINE-1000[:KNOB_PROMPTS])
#       protocols  qwen3-0.6b, ONLINE-1000 over WebSocket and over OpenAI HTTP+SSE, the same requests
#               in one run (256 connections, at most 256 in flight: one request per HTTP connection)
# Several parts may be given in one call: bash run_h200_serve.sh OUT floor llama
# Environment: PY (python), RATES_LLAMA, RATES_QWEN, RATES_KNOBS, KNOB_PROMPTS, SMOKE=1 (a CPU check
# of this script with the demo model and a few requests).
set -u
OUT=${1:?output directory}
shift
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
mkdir -p "$OUT"
GOODPUT="ttft:500 tpot:50"
MAXLEN=2048
if [ "${SMOKE:-0}" = 1 ]; then
  LLAMA=demo; QWEN=demo; N=12; KNOB_PROMPTS=${KNOB_PROMPTS:-8}
  RATES_LLAMA=${RATES_LLAMA:-"4 inf"}; RATES_QWEN=${RATES_QWEN:-"4 inf"}; RATES_KNOBS=${RATES_KNOBS:-"inf"}
  RATES_PROTOCOLS=${RATES_PROTOCOLS:-"inf"}
  FLOOR_N=2; FLOOR_OUT=16; FLOOR_VOCAB=259
else
  LLAMA=llama3-8b; QWEN=qwen3-0.6b; N=1000; KNOB_PROMPTS=${KNOB_PROMPTS:-300}
  RATES_LLAMA=${RATES_LLAMA:-"10 15 20 25 30 inf"}; RATES_QWEN=${RATES_QWEN:-"20 30 40 50 60 inf"}
  RATES_KNOBS=${RATES_KNOBS:-"25 50 inf"}
  RATES_PROTOCOLS=${RATES_PROTOCOLS:-"40 inf"}
  FLOOR_N=10; FLOOR_OUT=256; FLOOR_VOCAB=128256
fi

SERVER_PID=""
URL=""
start_server() {  # NAME MODEL [serve flags...]: start, wait for its URL (or fail)
  local name=$1 model=$2; shift 2
  local log="$OUT/server-$name.log"
  local load=()
  [ "$model" != demo ] && load=(--load-format dummy)
  # No prefix caching: every rate replays the same random prompts, so a cache would serve later
  # runs' prompts from earlier runs' KV and flatter their TTFT.
  $PY -m mini_vllm serve --model "$model" "${load[@]}" --port 0 --max-model-len $MAXLEN --no-enable-prefix-caching \
    --max-pending-requests 2048 --max-requests-per-connection 256 --client-key off "$@" < /dev/null > "$log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    URL=$(grep -o 'ws://[0-9.:]*' "$log" | head -1)
    [ -n "$URL" ] && { echo "server $name: $URL ($*)"; return 0; }
    kill -0 $SERVER_PID 2>/dev/null || { echo "server $name died:"; tail -20 "$log"; return 1; }
    sleep 0.5
  done
  echo "server $name did not come up"; tail -20 "$log"; kill $SERVER_PID; return 1
}
stop_server() {
  [ -n "$SERVER_PID" ] && kill -INT $SERVER_PID 2>/dev/null && wait $SERVER_PID 2>/dev/null
  SERVER_PID=""
}
trap stop_server EXIT
rate_flags() { for r in $1; do printf -- "--request-rate %s " "$r"; done; }
bench() {  # LABEL OUTFILE [bench flags...]
  local label=$1 file=$2; shift 2
  $PY -m mini_vllm bench serve --url "$URL" --label "$label" --goodput $GOODPUT --connections 32 \
    --output "$OUT/$file.json" "$@" < /dev/null 2>&1 | tee "$OUT/$file.log" | grep -vE '^\[(r[0-9]+|bench serve)\]'
}

for part in "$@"; do
  case $part in
  floor|floor-cublas|floor-no-pdl)
    # 1024-token prompts of random ids, one at a time (floor-cublas: with --no-skinny-kernels,
    # floor-no-pdl: with --no-programmatic-dependent-launch).
    flags=(); file="serve-floor-$LLAMA"
    [ "$part" = floor-cublas ] && flags=(--no-skinny-kernels) && file="serve-floor-cublas-$LLAMA"
    [ "$part" = floor-no-pdl ] && flags=(--no-programmatic-dependent-launch) && file="serve-floor-no-pdl-$LLAMA"
    $PY - "$OUT/floor-prompts.jsonl" $FLOOR_N $FLOOR_OUT $FLOOR_VOCAB <<'EOF'
import json, random, sys
path, n, out, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(3)
with open(path, "w") as f:
    for _ in range(n):
        f.write(json.dumps({"prompt_token_ids": [rng.randrange(vocab) for _ in range(1024)], "max_tokens": out}) + "\n")
EOF
    start_server llama-$part $LLAMA "${flags[@]}" || exit 1
    bench "$LLAMA one stream${flags:+ (${flags[0]})}" "$file" --dataset "$OUT/floor-prompts.jsonl" --max-concurrency 1 --connections 1
    stop_server
    ;;
  llama)
    start_server llama $LLAMA || exit 1
    bench "$LLAMA" "serve-sweep-$LLAMA" --num-prompts $N --sweep $(rate_flags "$RATES_LLAMA")
    stop_server
    ;;
  qwen)
    start_server qwen $QWEN || exit 1
    bench "$QWEN" "serve-sweep-$QWEN" --num-prompts $N --sweep $(rate_flags "$RATES_QWEN")
    stop_server
    ;;
  protocols)
    start_server protocols $QWEN || exit 1
    bench "$QWEN websocket vs openai" "serve-protocols-$QWEN" --num-prompts $N $(rate_flags "$RATES_PROTOCOLS") \
      --backend websocket,openai --connections 256 --max-concurrency 256
    stop_server
    ;;
  knobs)
    # name|serve flags (each varied alone from the defaults)
    while IFS='|' read -r name flags; do
      [ -z "$name" ] && continue
      # shellcheck disable=SC2086
      start_server "knob-$name" $QWEN $flags || continue
      bench "$name" "serve-knob-$QWEN-$name" --num-prompts $KNOB_PROMPTS --sweep $(rate_flags "$RATES_KNOBS")
      stop_server
    done <<EOF
${KNOBS:-defaults|
mnbt-512|--max-num-batched-tokens 512
mnbt-2048|--max-num-batched-tokens 2048
max-seqs-32|--max-num-seqs 32
max-seqs-64|--max-num-seqs 64
no-chunked-prefill|--no-enable-chunked-prefill
eager|--enforce-eager
no-async-scheduling|--no-async-scheduling
block-32|--block-size 32}
EOF
    ;;
  *) echo "unknown part $part"; exit 2 ;;
  esac
done
