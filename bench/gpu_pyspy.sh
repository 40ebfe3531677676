#!/usr/bin/env bash
# Where the server's threads spend their time under the benchmark's load (py-spy, sampled without pausing the
# process): the server on random large-v3-turbo weights with 80 forced tokens, 4 × 64 HTTP clients posting a
# 30 s clip, then py-spy for S seconds twice: every thread's stacks (--idle), and the GIL holder's only (--gil).
#   bench/gpu_pyspy.sh OUT_DIR [SECONDS]     (py-spy on PATH)
# Read them with bench/pyspy_summary.py (each thread's share; a thread's stack tails and frames with --thread).
set -uo pipefail
out=${1:?OUT_DIR}; s=${2:-3}
mkdir -p "$out"
py=python3
clip="$out/clip.wav"
$py - "$clip" <<'PY'
import sys, wave, numpy as np
from halkspeech.audio import decode_audio
a = decode_audio("tests/data/jfk.flac"); n = 30 * 16000
x = np.tile(a, -(-n // len(a)))[:n]
with wave.open(sys.argv[1], "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
    w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
PY
$py -m halkspeech --log-level warning serve --host 127.0.0.1 --port 8123 --model random:large-v3-turbo --preload \
  --device cuda --dtype float16 --max-slots 256 --encoder-batch 64 --force-decode-tokens 80 \
  --max-concurrent-requests 512 --max-queue-size 8192 --request-timeout 900 --no-access-log > "$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 300); do $py -c "import httpx,sys; sys.exit(not httpx.get('http://127.0.0.1:8123/health').json().get('models'))" 2>/dev/null && break; sleep 1; done
clients=()
load() { clients=(); for _ in 1 2 3 4; do timeout 120 $py -m halkspeech loadtest http --url http://127.0.0.1:8123 \
  --audio "$clip" --concurrency 64 --requests "$1" --language en > /dev/null 2>&1 & clients+=($!); done; }
load 128; wait "${clients[@]}"   # warm-up
load 1000; sleep 6
py-spy record --pid $server --duration "$s" --rate 1000 --nonblocking --idle --threads --format raw \
  --output "$out/pyspy_idle.txt" 2>&1 | tail -2
py-spy record --pid $server --duration "$s" --rate 1000 --nonblocking --gil --threads --format raw \
  --output "$out/pyspy_gil.txt" 2>&1 | tail -2
kill $server "${clients[@]}"; wait 2>/dev/null
tail -3 "$out/serve.log"
