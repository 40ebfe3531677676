#!/usr/bin/env bash
# The serving benchmarks on a GPU machine, each bounded in time (a hang costs one step, not the call).
#   bench/gpu_serving.sh mixed-and-server OUT_DIR   continuous vs static batching; the HTTP server at 256 clients
#   bench/gpu_serving.sh server-and-longform OUT_DIR  the HTTP server at 256 clients; one hour through the server
#   bench/gpu_serving.sh ws OUT_DIR                 WebSocket turns (1 and 200 users) with file requests alongside
#   bench/gpu_serving.sh mixed-and-words OUT_DIR    continuous vs both static baselines, with the engine's phase
#                                                   times; the cost of word timestamps on 8 concurrent files
# Needs: python3 with torch; the package importable (PYTHONPATH=src works).
set -uo pipefail
out=${2:?OUT_DIR}
mkdir -p "$out"
py=python3
case "${1:?what}" in
mixed-and-server)
  timeout 240 $py -c "
from halkspeech.bench.mixed import MixedConfig, run_mixed_bench
run_mixed_bench(MixedConfig(json_path='$out/mixed.json', modes=('continuous', 'continuous-inline', 'static')))
" 2>&1 | tail -9
  timeout 330 $py -m halkspeech bench server --model large-v3-turbo --tokens 80 --concurrency 256 \
    --requests 1024 --warmup-requests 512 --slots 256 --encoder-batch 64 --client-processes 4 \
    --json "$out/server.json" 2>&1 | tail -25
  ;;
mixed-and-words)
  timeout 300 $py -m halkspeech bench mixed --json "$out/mixed.json" 2>&1 | tail -12
  timeout 200 $py -m halkspeech bench longform --model random:large-v3-turbo --force-tokens-per-second 4 \
    --minutes 5 --repeats 2 --compare-files 8 --compare-minutes 5 --json "$out/longform_words.json" 2>&1 | tail -14
  ;;
ws)
  timeout 400 $py -m halkspeech bench ws --model random:large-v3-turbo --tokens 20 --users 200 \
    --turns-per-user 3 --file-clients 4 --json "$out/ws.json" 2>&1 | tail -20
  ;;
server-and-longform)
  timeout 300 $py -m halkspeech bench server --model large-v3-turbo --tokens 80 --concurrency 256 \
    --requests 1024 --warmup-requests 512 --slots 256 --encoder-batch 64 --client-processes 4 \
    --json "$out/server.json" 2>&1 | tail -8
  $py -m halkspeech serve --model random:large-v3-turbo --device cuda --preload --force-decode-tokens 100 \
    --port 8123 --no-access-log > "$out/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 120); do curl -sf http://127.0.0.1:8123/health > /dev/null && break; sleep 1; done
  timeout 240 $py -m halkspeech bench longform --model random:large-v3-turbo --force-tokens-per-second 4 \
    --repeats 1 --compare-minutes 5 --url http://127.0.0.1:8123 --json "$out/longform.json" 2>&1 | tail -25
  kill $server 2>/dev/null
  ;;
final)  # the server again, the cost of word timestamps, then WebSocket turns
  timeout 200 $py -m halkspeech bench server --model large-v3-turbo --tokens 80 --concurrency 256 \
    --requests 1024 --warmup-requests 512 --slots 256 --encoder-batch 64 --client-processes 4 \
    --json "$out/server.json" 2>&1 | tail -6
  timeout 150 $py -m halkspeech bench longform --model random:large-v3-turbo --force-tokens-per-second 4 \
    --minutes 5 --repeats 1 --compare-files 8 --compare-minutes 5 --json "$out/longform_words.json" 2>&1 | tail -8
  timeout 330 $py -m halkspeech bench ws --model random:large-v3-turbo --tokens 20 --users 200 \
    --turns-per-user 2 --file-clients 4 --json "$out/ws.json" 2>&1 | tail -16
  ;;
server-and-ws)
  timeout 200 $py -m halkspeech bench server --model large-v3-turbo --tokens 80 --concurrency 256 \
    --requests 1024 --warmup-requests 512 --slots 256 --encoder-batch 64 --client-processes 4 \
    --json "$out/server.json" 2>&1 | tail -6
  timeout 300 $py -m halkspeech bench ws --model random:large-v3-turbo --tokens 20 --users 200 \
    --turns-per-user 2 --file-clients 4 --json "$out/ws.json" 2>&1 | tail -6
  ;;
ws-only)
  timeout 300 $py -m halkspeech bench ws --model random:large-v3-turbo --tokens 20 --users 200 \
    --turns-per-user 2 --file-clients 4 --json "$out/ws.json" 2>&1 | tail -6
  ;;
*) echo "unknown: $1" >&2; exit 2 ;;
esac
