#!/usr/bin/env bash
# Session-4 probes on the H200 (carry .whl). PART=1: bench serve with per-thread CPU of the
# server (tools/thread_cpu.py, 30 s from "listening"), bench latency, decode kernel profile.
# PART=2: small-GPU mode W1 under 6 GiB, weight-quant tests on the GPU, profile.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { echo "### $*" | tee -a $OUT/log.txt; local t0=$SECONDS; timeout -k 10 ${STEP_S:-300} python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $OUT/log.txt; echo "### took $((SECONDS - t0)) s" | tee -a $OUT/log.txt; }
case "${PART:-1}" in
1)
  ( for i in $(seq 120); do grep -q "listening on" $OUT/log.txt 2>/dev/null && break; sleep 0.5; done; sleep 3
    python3 tools/thread_cpu.py "omnistream" 25 > $OUT/threads.txt 2>&1 ) &
  run bench serve --model-config 3b --device cuda --clients 32 --new-tokens 64 --json $OUT/serve.json
  wait; cat $OUT/threads.txt | tee -a $OUT/log.txt
  run bench latency --model-config 3b --frames 64 --size 448 --json $OUT/latency.json
  echo "### decode profile" | tee -a $OUT/log.txt
  timeout 150 python3 tools/gpu_decode_profile.py 1 32 > $OUT/decode_profile.txt 2>&1; grep -A22 "=== B\|wall ms/step" $OUT/decode_profile.txt | tee -a $OUT/log.txt ;;
2)
  run bench multiturn --model-config 3b --device cuda --weight-quant int8 --memory-budget-gib 6 --frames 64 --size 448 --turns 10 --new-tokens 16 --json $OUT/multiturn_int8_6g.json
  echo "### pytest weight quant" | tee -a $OUT/log.txt
  timeout 200 python3 -m pytest -q tests/test_weight_quant.py 2>&1 | tail -15 | tee -a $OUT/log.txt
  echo "### engine loop CPU profile" | tee -a $OUT/log.txt
  timeout 200 python3 tools/gpu_engine_cpu_profile.py 32 > $OUT/engine_cpu.txt 2>&1; grep -v -i warn $OUT/engine_cpu.txt | head -100 | tee -a $OUT/log.txt ;;
esac
