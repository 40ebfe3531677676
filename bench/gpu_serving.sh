#!/usr/bin/env bash
# The serving benchmarks on a GPU machine, each bounded in time (a hang costs one step, not the call).
#   bench/gpu_serving.sh syncs-and-server OUT_DIR   the engine's host waits; encoder ms a window by run size; the
#                                                   server with encoder runs of 16 at once, and of 32 (≤ 250 ms wait)
#   bench/gpu_serving.sh encoder-graphs OUT_DIR     the runner's CUDA tests; the server with encoder graphs, without,
#                                                   and with again
#   bench/gpu_serving.sh timeline OUT_DIR           the server with its GPU timeline recorded after the timed run;
#                                                   then encoder runs held ≤ 50 / 100 ms for company, and as is
#   bench/gpu_serving.sh gil OUT_DIR                the server's GPU timeline; switch interval 0.1 against 0.5 ms
#   bench/gpu_serving.sh ab OUT_DIR OLD_SRC         the server on this tree and on OLD_SRC (an older src/), A/B/A/B
#   bench/gpu_serving.sh cuda-tests OUT_DIR         the tests that need a GPU, without pytest's model downloads
#   bench/gpu_serving.sh two-gpus OUT_DIR           the CUDA tests; the HTTP server on one GPU, then on two
#   bench/gpu_serving.sh pipelined OUT_DIR          the CUDA tests; the server twice; continuous against static
#   bench/gpu_serving.sh mixed-and-server OUT_DIR   continuous vs static batching; the HTTP server at 256 clients
#   bench/gpu_serving.sh server-and-longform OUT_DIR  the HTTP server at 256 clients; one hour through the server
#   bench/gpu_serving.sh ws OUT_DIR                 WebSocket turns (1 and 200 users) with file requests alongside
#   bench/gpu_serving.sh ws-protocols OUT_DIR       the same over /v1/realtime (20 and 100 ms appends), then /ws
#   bench/gpu_serving.sh triton OUT_DIR             the HTTP server at 256 clients over Triton's HTTP API and the
#                                                   OpenAI API, alternating (engine figure from one run each)
#   bench/gpu_serving.sh triton-grpc OUT_DIR        the same over Triton's gRPC API, unary and streamed (needs the
#                                                   grpc extra)
#   bench/gpu_serving.sh one-client-process OUT_DIR KEEP_ALIVE_S   one client process, 256 uploads in flight,
#                                                   against a server with that keep-alive: read errors or none
#   bench/gpu_serving.sh mixed-and-words OUT_DIR    continuous vs both static baselines, with the engine's phase
#                                                   times; the cost of word timestamps on 8 concurrent files
#   bench/gpu_serving.sh engine-and-rates OUT_DIR   large-v3 against HF at all four batches; turbo's mixed workload
#                                                   at several arrival rates (continuous against padded static,
#                                                   two alternating runs), then encoder runs held 20 / 50 ms
#   bench/gpu_serving.sh moves-and-warmup OUT_DIR OLD_SRC  the CUDA tests; turbo's mixed workload twice a mode (is the
#                                                   first continuous run still slower than the second?); the
#                                                   server on this tree and on OLD_SRC (an older src/, e.g. one
#                                                   from before compaction's batched moves), A/B/A/B
#   bench/gpu_serving.sh closed-loop OUT_DIR        the server's load from in-process clients (no HTTP) between the
#                                                   engine figure and the server's, twice: the closed loop's cost
#                                                   told from the HTTP layer's
#   bench/gpu_serving.sh http-path OUT_DIR OLD_SRC   the server on this tree and on OLD_SRC (an older src/), with
#                                                   the default 16 kHz WAV clip, A/B/A/B: a request's stages in each
#   bench/gpu_serving.sh three-trees OUT_DIR OLD_SRC MID_SRC [ROUND]  the server on this tree, then on OLD_SRC and
#                                                   MID_SRC (older src/ folders), one round (one lease's call
#                                                   each); round 1 runs the CUDA tests before MID_SRC's
#   bench/gpu_serving.sh perf-analyzer OUT_DIR CONC  perf_analyzer (Triton's load tool, .venv/perf_analyzer) at
#                                                   concurrency CONC over Triton's HTTP API (its asynchronous and
#                                                   synchronous clients), gRPC, gRPC streaming
# Needs: python3 with torch; the package importable (PYTHONPATH=src works).
set -uo pipefail
out=${2:?OUT_DIR}
mkdir -p "$out"
py=python3
clip="$PWD/tests/data/jfk.flac"  # the recording the clip is made from: an older src/ looks for it beside itself
server_bench() {  # OUT_JSON [more flags]: the HTTP server at 256 clients against the engine's batch-256 figure
  timeout 300 $py -m halkspeech bench server --model large-v3-turbo --tokens 80 --concurrency 256 \
    --requests 1024 --warmup-requests 512 --slots 256 --encoder-batch 64 --client-processes 4 \
    --json "$@" 2>&1 | tail -11
}
case "${1:?what}" in
cuda-tests)  # the tests that need a GPU (pytest's session fixtures fetch models: no network here)
  timeout 120 $py -c "
import torch, traceback, tests.engine.test_runner_cuda as r, tests.engine.test_transfer as t
import tests.engine.test_replicas_cuda as g
for m in (r, t, *([g] if torch.cuda.device_count() > 1 else [])):
    for name in dir(m):
        if name.startswith('test_') and 'cpu' not in name:
            try:
                getattr(m, name)(); print('passed', name)
            except Exception as exc:
                traceback.print_exc(limit=1); print('FAILED', name, exc)
" 2>&1 | tail -12
  ;;
timeline)  # where the server's GPU idles; encoder runs held for company (A/B)
  server_bench "$out/server_timeline.json" --profile-s 2
  HALKSPEECH_ENGINE__DECODING_ENCODER_WAIT_MS=50 server_bench "$out/server_wait50.json"
  HALKSPEECH_ENGINE__DECODING_ENCODER_WAIT_MS=100 server_bench "$out/server_wait100.json"
  server_bench "$out/server_wait0.json"
  ;;
gil)  # the server's GPU timeline; then Python's switch interval 0.1 ms against the default 0.5 ms
  server_bench "$out/server_timeline.json" --profile-s 2
  HALKSPEECH_ENGINE__GIL_SWITCH_MS=0.1 server_bench "$out/server_gil01.json"
  server_bench "$out/server_gil05.json"
  ;;
moves-and-warmup)  # OLD_SRC: session 33's two changes not yet run on a GPU
  bash "$0" cuda-tests "$out"
  old=${3:?OLD_SRC}
  timeout 200 $py -m halkspeech bench mixed --models large-v3-turbo --modes continuous-ahead,static-padded \
    --repeats 2 --json "$out/mixed_turbo_warm.json" 2>&1 | tail -4
  for run in 1 2; do
    server_bench "$out/server_new_$run.json" --engine-repeats 1 --audio "$clip"
    PYTHONPATH="$old:$PYTHONPATH" server_bench "$out/server_old_$run.json" --engine-repeats 1 \
      --audio "$clip"
  done
  ;;
http-path)  # OLD_SRC: the HTTP path without its thread hops, and the frozen heap, against the tree before them
  old=${3:?OLD_SRC}
  for run in 1 2; do
    server_bench "$out/server_new_$run.json" --engine-repeats 1
    PYTHONPATH="$old:$PYTHONPATH" server_bench "$out/server_old_$run.json" --engine-repeats 1 --audio "$clip"
  done
  ;;
three-trees)  # OLD_SRC MID_SRC [ROUND]: this tree, OLD_SRC and MID_SRC in turn (two rounds: two calls of a lease)
  old=${3:?OLD_SRC}
  mid=${4:?MID_SRC}
  run=${5:-1}
  server_bench "$out/server_new_$run.json" --engine-repeats 1
  PYTHONPATH="$old:$PYTHONPATH" server_bench "$out/server_old_$run.json" --engine-repeats 1 --audio "$clip"
  [ "$run" = 1 ] && bash "$0" cuda-tests "$out"  # after the first pair: a lease cut short keeps that pair
  PYTHONPATH="$mid:$PYTHONPATH" server_bench "$out/server_mid_$run.json" --engine-repeats 1 --audio "$clip"
  ;;
ab)  # OLD_SRC: the CUDA tests; the server on this tree (GPU timeline recorded after its timed run) and on OLD_SRC, A/B/A/B
  bash "$0" cuda-tests "$out"
  old=${3:?OLD_SRC}
  server_bench "$out/server_new_1.json" --profile-s 2
  PYTHONPATH="$old:$PYTHONPATH" server_bench "$out/server_old_1.json" --audio "$clip"
  server_bench "$out/server_new_2.json"
  PYTHONPATH="$old:$PYTHONPATH" server_bench "$out/server_old_2.json" --audio "$clip"
  ;;
two-gpus)  # the CUDA tests (two GPUs: the replicas test too); the server on GPU 0, then on GPUs 0 and 1
  bash "$0" cuda-tests "$out"
  HALKSPEECH_ENGINE__DEVICE_INDEX=0 server_bench "$out/server_1gpu.json"
  HALKSPEECH_ENGINE__DEVICE_INDEX=0,1 server_bench "$out/server_2gpu_256.json"
  HALKSPEECH_ENGINE__DEVICE_INDEX=0,1 server_bench "$out/server_2gpu_512.json" --concurrency 512 --requests 2048
  ;;
pipelined)  # the CUDA tests; the server twice; continuous against static batching
  bash "$0" cuda-tests "$out"
  server_bench "$out/server.json"
  server_bench "$out/server_2.json"
  timeout 200 $py -m halkspeech bench mixed --json "$out/mixed.json" 2>&1 | tail -12
  ;;
encoder-graphs)  # the CUDA tests, then the server with encoder graphs, without, and with again (A/B/A)
  bash "$0" cuda-tests "$out"
  server_bench "$out/server_graphs.json"
  HALKSPEECH_ENGINE__ENCODER_GRAPHS=false server_bench "$out/server_eager.json"
  server_bench "$out/server_graphs_2.json"
  ;;
syncs-and-server)  # the engine's host waits (CUDA test), encoder cost by run size, server with two encoder policies
  timeout 120 $py -m pytest -q -p no:cacheprovider tests/engine/test_transfer.py 2>&1 | tail -4
  timeout 120 $py bench/gpu_encoder.py "$out" --scan 8,12,16,24,32,64 2>&1 | tail -10
  server_bench "$out/server.json"
  HALKSPEECH_ENGINE__DECODING_ENCODER_BATCH=32 HALKSPEECH_ENGINE__DECODING_ENCODER_WAIT_MS=250 \
    server_bench "$out/server_encoder32.json"
  timeout 200 $py -m halkspeech bench mixed --json "$out/mixed.json" 2>&1 | tail -12
  ;;
mixed-and-server)
  timeout 240 $py -c "
from halkspeech.bench.mixed import MixedConfig, run_mixed_bench
run_mixed_bench(MixedConfig(json_path='$out/mixed.json', modes=('continuous', 'continuous-ahead', 'static')))
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
ws-protocols)  # WebSocket turns over /v1/realtime (20 and 100 ms appends), then over /ws, in one lease
  for run in "realtime 20" "realtime 100" "ws 20"; do
    set -- $run
    timeout 190 $py -m halkspeech bench ws --protocol $1 --frame-ms $2 --model random:large-v3-turbo --tokens 20 \
      --single-turns 5 --users 200 --turns-per-user 3 --file-clients 4 --json "$out/ws_$1_$2ms.json" 2>&1 | tail -4
  done
  ;;
triton)  # Triton's HTTP API against the OpenAI API through the same server and clients, alternating
  for run in "triton 1" "openai 1" "triton 2"; do
    set -- $run
    server_bench "$out/server_$1_$2.json" --api $1 --engine-repeats 1
  done
  ;;
triton-grpc)  # Triton's gRPC API, unary and streamed, against the OpenAI API: same server and clients, alternating
  for run in "triton-grpc 1" "triton-grpc-stream 1" "openai 1" "triton-grpc-stream 2"; do
    set -- $run
    server_bench "$out/server_$1_$2.json" --api $1 --engine-repeats 1
  done
  ;;
one-client-process)  # KEEP_ALIVE_S: 256 uploads in flight from ONE client process (its event loop lags for
  # seconds), OpenAI and Triton's HTTP API alternating, against a server with that keep-alive (the ReadError check)
  ka=${3:?KEEP_ALIVE_S}
  $py -c "
from pathlib import Path; from halkspeech.bench.server_bench import ServerBenchConfig, _write_clip
_write_clip(ServerBenchConfig(device='cpu'), Path('$out/clip30.wav'))"
  HALKSPEECH_SERVER__KEEP_ALIVE_TIMEOUT_S=$ka $py -m halkspeech serve --model random:large-v3-turbo --device cuda \
    --preload --force-decode-tokens 80 --max-slots 256 --encoder-batch 64 --max-concurrent-requests 512 \
    --max-queue-size 8192 --request-timeout 900 --port 8123 --no-access-log > "$out/serve_ka$ka.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do curl -sf http://127.0.0.1:8123/health > /dev/null && break; sleep 1; done
  for run in "openai 1" "triton 1" "openai 2" "triton 2"; do
    set -- $run
    timeout 120 $py -m halkspeech loadtest http --url http://127.0.0.1:8123 --api $1 --audio "$out/clip30.wav" \
      --concurrency 256 --requests 1536 --json "$out/loadtest_1proc_$1_$2_ka$ka.json" 2>&1 | tail -2
  done
  kill $server 2>/dev/null; wait $server 2>/dev/null; tail -5 "$out/serve_ka$ka.log"
  ;;
closed-loop)  # the engine figure, in-process clients in a closed loop, the server: twice
  for run in 1 2; do
    server_bench "$out/server_closed_loop_$run.json" --engine-repeats 1 --closed-loop
  done
  ;;
perf-analyzer)  # CONC: perf_analyzer against the server's Triton APIs, a 30 s clip a request, 80 tokens forced;
  # HTTP with perf_analyzer's asynchronous client and its synchronous one (a thread a request in flight)
  conc=${3:?CONC}
  $py -c "
from pathlib import Path; from halkspeech.bench.server_bench import ServerBenchConfig, _write_clip
_write_clip(ServerBenchConfig(device='cpu'), Path('$out/clip30.wav'))"
  PYTHON=$py bash bench/perf_analyzer.sh input "$out/clip30.wav" "$out/clip30.json"
  $py -m halkspeech serve --model random:large-v3-turbo --device cuda --preload --force-decode-tokens 80 \
    --max-slots 256 --encoder-batch 64 --max-concurrent-requests 1024 --max-queue-size 8192 --request-timeout 900 \
    --port 8123 --grpc-port 8124 --no-access-log > "$out/serve_pa.log" 2>&1 &
  server=$!
  for _ in $(seq 240); do curl -sf http://127.0.0.1:8123/v2/health/ready > /dev/null && break; sleep 1; done
  for run in "http 8123 --async" "http 8123 --sync" "grpc 8124 --async" "grpc 8124 --async --streaming"; do
    set -- $run
    name=$1${4:+_stream}${3/--async/}
    name=${name/--/_}
    timeout 150 bash bench/perf_analyzer.sh run -m whisper -u 127.0.0.1:$2 -i $1 ${3/--sync/} ${4:-} \
      --input-data "$out/clip30.json" --concurrency-range "$conc" --measurement-interval 10000 --max-trials 6 -s 15 \
      --percentile 95 -f "$out/perf_analyzer_${name}_c$conc.csv" > "$out/perf_analyzer_${name}_c$conc.txt" 2>&1
    echo "== $name (exit $?)"; grep -E "Concurrency|Throughput|p95|Server:|Inference count|queue|compute" \
      "$out/perf_analyzer_${name}_c$conc.txt" | tail -8
  done
  rm -f "$out/clip30.json" "$out/clip30.wav"
  kill $server 2>/dev/null; wait $server 2>/dev/null; grep -v "^$" "$out/serve_pa.log" | tail -3
  ;;
engine-and-rates)
  timeout 200 $py -m halkspeech bench engine --models large-v3 --json "$out/engine_large_v3.json" 2>&1 | tail -12
  timeout 220 $py -m halkspeech bench mixed --models large-v3-turbo --rate 0,120,150,180 \
    --modes continuous-ahead,static-padded --repeats 2 --json "$out/mixed_rates.json" 2>&1 | tail -12
  for wait in 20 50; do
    timeout 60 $py -m halkspeech bench mixed --models large-v3-turbo --rate 150,180 --modes continuous-ahead \
      --encoder-wait-ms $wait --json "$out/mixed_rates_wait$wait.json" 2>&1 | tail -5
  done
  ;;
ws-only)
  timeout 300 $py -m halkspeech bench ws --model random:large-v3-turbo --tokens 20 --users 200 \
    --turns-per-user 2 --file-clients 4 --json "$out/ws.json" 2>&1 | tail -6
  ;;
*) echo "unknown: $1" >&2; exit 2 ;;
esac
