#!/usr/bin/env bash
# perf_analyzer, Triton's own load tool, against this server's Triton APIs (or any Triton server).
#
#   bash bench/perf_analyzer.sh fetch                 # into .venv/perf_analyzer, once
#   bash bench/perf_analyzer.sh input AUDIO OUT.json  # perf_analyzer's --input-data for one clip
#   bash bench/perf_analyzer.sh run ARGS...           # perf_analyzer ARGS, its libraries found
#
# For example, against `halkspeech serve --grpc-port 8001` (add -H 'Authorization:Bearer KEY' with keys):
#   bash bench/perf_analyzer.sh input tests/data/jfk.flac /tmp/jfk.json
#   bash bench/perf_analyzer.sh run -m whisper -u localhost:8000 --input-data /tmp/jfk.json --concurrency-range 8
#   bash bench/perf_analyzer.sh run -m whisper -u localhost:8001 -i grpc --streaming --input-data /tmp/jfk.json
#
# PyPI's perf-analyzer package is a placeholder. tritonclient 2.41.0's wheel carries the binary (the last
# tritonclient wheels to do so). It needs libb64 (Debian's libb64-0d) and libcudart.so.12 (PyPI's
# nvidia-cuda-runtime-cu12), which it loads even against a CPU server. All three come from the registries
# this project installs from; nothing else is installed, and nothing outside .venv/perf_analyzer changes.
set -euo pipefail
cd "$(dirname "$0")/.."
HOME_DIR=.venv/perf_analyzer
PY=${PYTHON:-.venv/bin/python}  # the interpreter with halkspeech (PYTHON overrides)
PIP="$PY -m pip"
LIBB64_URL=https://deb.debian.org/debian/pool/main/libb/libb64/libb64-0d_1.2-5+b1_amd64.deb

fetch() {
  if [[ -x $HOME_DIR/bin/perf_analyzer ]]; then return; fi
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  $PIP download -q --no-deps --only-binary=:all: -d "$tmp" tritonclient==2.41.0 nvidia-cuda-runtime-cu12==12.9.79
  (cd "$tmp" && apt-get download -q libb64-0d >/dev/null 2>&1) || curl -fsSL -o "$tmp/libb64.deb" "$LIBB64_URL"
  mkdir -p "$tmp/x" "$HOME_DIR/bin" "$HOME_DIR/lib"
  unzip -q -o "$tmp"/tritonclient-2.41.0-*.whl 'tritonclient-2.41.0.data/data/bin/perf_analyzer' -d "$tmp/x"
  unzip -q -o "$tmp"/nvidia_cuda_runtime_cu12-*.whl -d "$tmp/x"
  dpkg-deb -x "$tmp"/libb64*.deb "$tmp/x"
  find "$tmp/x" \( -name 'libb64.so*' -o -name 'libcudart.so.12' \) -exec cp -a {} "$HOME_DIR/lib/" \;
  install -m 755 "$tmp/x/tritonclient-2.41.0.data/data/bin/perf_analyzer" "$HOME_DIR/bin/perf_analyzer"
  echo "perf_analyzer: $HOME_DIR/bin/perf_analyzer"
}

case "${1:-}" in
  fetch) fetch ;;
  input)
    [[ $# -eq 3 ]] || { echo "usage: $0 input AUDIO OUT.json" >&2; exit 2; }
    $PY - "$2" "$3" <<'EOF'
import json, sys
from halkspeech.audio import decode_audio
audio = decode_audio(sys.argv[1])  # 16 kHz mono float32
prefix = "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"
row = {"WAV": {"content": audio.tolist(), "shape": [len(audio)]}, "WAV_LENS": [len(audio)], "TEXT_PREFIX": [prefix]}
with open(sys.argv[2], "w") as out:
    json.dump({"data": [row]}, out)
EOF
    ;;
  run)
    shift
    fetch
    LD_LIBRARY_PATH="$PWD/$HOME_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$HOME_DIR/bin/perf_analyzer" "$@"
    ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
