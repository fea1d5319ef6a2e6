#!/usr/bin/env bash
# Issue 3 GPU measurements, one call: W1 multiturn, E4 repeat, W2 shared, budget runs.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { echo "### $*"; python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $OUT/log.txt; }
[ "${SKIP_W1:-0}" = 1 ] || run bench multiturn --model-config 3b --frames 64 --size 448 --turns 10 --repeats 3 --json $OUT/multiturn.json
[ "${SKIP_SH:-0}" = 1 ] || run bench shared --model-config 3b --frames 64 --size 448 --sessions 8 --json $OUT/shared.json
[ "${SKIP_REP:-0}" = 1 ] || run bench repeat --model-config 3b --frames 64 --size 448 --json $OUT/repeat.json
[ "${SKIP_BUD:-0}" = 1 ] || run bench multiturn --model-config 3b --frames 64 --size 448 --turns 10 --memory-budget-gib 10 --json $OUT/budget3b.json
[ "${SKIP_BUD:-0}" = 1 ] || run bench multiturn --model-config 3b --frames 64 --size 448 --turns 4 --memory-budget-gib 10 --offload-vision --json $OUT/offload3b.json
[ "${SKIP_7B:-0}" = 1 ] || run bench multiturn --model-config 7b --frames 64 --size 448 --turns 10 --memory-budget-gib 20 --json $OUT/budget7b.json
