#!/usr/bin/env bash
# Session-5 probe on the H200 (carry .whl and scratch/head: the committed tree as a tar): the
# prefill cap per request in prefill (prefill_cap_scope) against one cap per step, and CUDA
# graphs for steps of up to 1024 rows (engine/graph_limits.FULL.rows) against 256, on the text bursts
# (32, 64 clients), 32 video8 clients and the encoder interference; then a step timeline.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/head && tar -xf scratch/head/head.tar -C /tmp/head && cd /tmp/head || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
# ROWS=N: graphs up to N rows (graph_limits.FULL patched: in-thread engine only)
run() { echo "### ROWS=${ROWS:-default} $*" | tee -a $OUT/log.txt; local t0=$SECONDS
  timeout -k 10 ${STEP_S:-150} python3 -c "import sys, dataclasses, omnistream.engine.graph_limits as g; g.FULL = dataclasses.replace(g.FULL, rows=int('${ROWS:-0}') or g.FULL.rows); from omnistream.entrypoints.cli import main; sys.exit(main())" "$@" 2>&1 \
    | grep -v -i "warn" | grep -E "^\[|TTFT ms|target|interference|ITL|took|rror|raceback" | tee -a $OUT/log.txt
  echo "### took $((SECONDS - t0)) s" | tee -a $OUT/log.txt; }
LOAD="bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0"
case "${PART:-1}" in
1)
  run $LOAD --mix text --clients 32,64 --prefill-cap-scope per_step --json $OUT/text_per_step.json
  run $LOAD --mix text --clients 32,64 --json $OUT/text_per_request.json
  ROWS=1024 run $LOAD --mix text --clients 32,64 --json $OUT/text_per_request_rows1024.json
  run $LOAD --mix video8 --clients 32 --json $OUT/video8_per_request.json
  ROWS=1024 run $LOAD --mix video8 --clients 32 --json $OUT/video8_per_request_rows1024.json
  run bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64 --json $OUT/interference.json
  run $LOAD --mix text --clients 32,64 --engine-process --json $OUT/text_per_request_process.json ;;
esac
# PART=2: step timelines of the bursts, then the new defaults on the bursts
if [ "${PART:-1}" = 2 ]; then
  run $LOAD --mix text --clients 32,64 --json $OUT/text_default.json
  run $LOAD --mix video8 --clients 32 --json $OUT/video8_default.json
fi
# PART=2: step timelines of the bursts (tools/gpu_step_timeline.py)
if [ "${PART:-1}" = 2 ]; then
  for args in "text 64" "text 64 prefill_cap_scope=per_step" "video8 32"; do
    echo "### timeline $args" | tee -a $OUT/log.txt
    timeout 150 python3 tools/gpu_step_timeline.py $args 2>&1 | grep -v -i warn | tee -a $OUT/timeline.txt | grep -E "^rep|steps:" | tee -a $OUT/log.txt
  done
fi
# PART=3: with the submit lock: the bursts in-thread and in an engine process, a larger prefill
# ceiling, the interference, bench serve
if [ "${PART:-1}" = 3 ]; then
  run $LOAD --mix text --clients 32,64 --json $OUT/text.json
  run $LOAD --mix text --clients 32,64 --engine-process --json $OUT/text_process.json
  run $LOAD --mix video8 --clients 32 --json $OUT/video8.json
  run $LOAD --mix video8 --clients 32 --max-prefill-tokens-while-decoding 4096 --json $OUT/video8_ceiling4096.json
  run $LOAD --mix text --clients 32,64 --max-prefill-tokens-while-decoding 4096 --json $OUT/text_ceiling4096.json
  run bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64 --json $OUT/interference.json
  echo "### bench serve" | tee -a $OUT/log.txt
  timeout -k 10 200 python3 -m omnistream.entrypoints.cli bench serve --model-config 3b --device cuda --clients 32 --new-tokens 64 --json $OUT/serve.json 2>&1 | grep -v -i warn | tail -32 | tee -a $OUT/log.txt
fi

# PART=4: vision graphs for short clips (grid (4, 32, 32)): bit-identical check, video8 burst
if [ "${PART:-1}" = 4 ]; then
  echo "### vision graph check" | tee -a $OUT/log.txt
  timeout 120 python3 tools/gpu_vision_graph_check.py 2>&1 | grep -v -i warn | tail -5 | tee -a $OUT/log.txt
  run $LOAD --mix video8 --clients 32 --json $OUT/video8.json
  run $LOAD --mix video8 --clients 32 --engine-process --json $OUT/video8_process.json
fi
