#!/usr/bin/env bash
# bench serve on one GPU with the server's engine core in its own process (serve's default) and,
# for comparison, in a thread of the server's process (--no-engine-process; the in-process
# reference then runs its engine in a thread too: both phases take the same engine options)
# (issue 9's HTTP-overhead targets: TTFT p50 within 3 ms, p99 within 1.2x, tokens/s >= 0.9x). Carry .whl as for tools/gpu_serve_and_load.sh. Logs: $OUT/log.txt, JSON under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { echo "### $*" | tee -a $OUT/log.txt; local t0=$SECONDS; timeout -k 10 ${STEP_S:-300} python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $OUT/log.txt; echo "### took $((SECONDS - t0)) s" | tee -a $OUT/log.txt; }
SERVE="bench serve --model-config 3b --device cuda --clients ${CLIENTS:-32} --new-tokens 64"
run $SERVE --engine-process --json $OUT/serve_engine_process.json
[ -n "${SKIP_THREAD:-}" ] || run $SERVE --no-engine-process --json $OUT/serve_engine_thread.json
