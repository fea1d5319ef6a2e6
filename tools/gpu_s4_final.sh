#!/usr/bin/env bash
# Session-4 measurements on the H200 (carry .whl and scratch/head: the committed tree as a tar).
#   PART=A: encode-ahead check (GPU), interference, video8 x32, text x32/x64 (in-thread and with
#           the engine in its own process)
#   PART=B: bench serve 32 clients, bench latency, bench stream, bench multiturn, small-GPU W1 under 6 GiB
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/head && tar -xf scratch/head/head.tar -C /tmp/head && cd /tmp/head || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { echo "### $*" | tee -a $OUT/log.txt; local t0=$SECONDS; timeout -k 10 ${STEP_S:-240} python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $OUT/log.txt; echo "### took $((SECONDS - t0)) s" | tee -a $OUT/log.txt; }
LOAD="bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0"
case "${PART:-A}" in
A)
  echo "### encode-ahead check" | tee -a $OUT/log.txt
  timeout 150 python3 tools/gpu_encode_ahead_check.py 2>&1 | grep -v -i warn | tee -a $OUT/log.txt
  run bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64 --json $OUT/concurrency_interference.json
  run $LOAD --mix video8 --clients 32 --json $OUT/concurrency_video8.json
  run $LOAD --mix text --clients 32,64 --context-tokens 1024 --json $OUT/concurrency_text.json
  run $LOAD --mix text --clients 32,64 --context-tokens 1024 --engine-process --json $OUT/concurrency_text_process.json ;;
B)
  run bench serve --model-config 3b --device cuda --clients 32 --new-tokens 64 --json $OUT/serve.json
  run bench latency --model-config 3b --frames 64 --size 448 --json $OUT/latency.json
  run bench stream --model-config 3b --size 448 --minutes 1,10,60 --json $OUT/stream.json
  run bench multiturn --model-config 3b --device cuda --frames 64 --size 448 --turns 10 --new-tokens 16 --json $OUT/multiturn.json
  run bench multiturn --model-config 3b --device cuda --weight-quant int8 --memory-budget-gib 6 --frames 64 --size 448 --turns 10 --new-tokens 16 --json $OUT/multiturn_int8_6g.json ;;
esac
