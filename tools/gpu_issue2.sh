#!/usr/bin/env bash
# Issue 2 GPU measurements, one call: accuracy (bf16 closeness), latency bench, profile.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { echo "### $*"; python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $OUT/log.txt; }
[ "${SKIP_ACC:-0}" = 1 ] || run bench accuracy --model-config 3b --frames 16 --size 448 --new-tokens 64 --json $OUT/accuracy.json
[ "${SKIP_LAT:-0}" = 1 ] || run bench latency --model-config 3b --frames 64 --size 448 --new-tokens 64 --repeats 3 --json $OUT/latency.json
[ "${SKIP_PROF:-0}" = 1 ] || run profile --model-config 3b --frames 64 --size 448 --json $OUT/profile.json
