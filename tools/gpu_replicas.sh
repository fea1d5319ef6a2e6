#!/usr/bin/env bash
# Issue 12 on one H200: bench serve against 2 replicas sharing the card (half of it each), 1
# replica, and the single-process server, with sessions. Ray's wheel (76 MB) is over one call's
# carry, so it travels in two calls while the machine stays warm (< 30 s apart):
#   1. run(command="mkdir -p /tmp/carry && cp scratch/rayA/* /tmp/carry/", carry=["scratch/rayA"])
#   2. run(command="bash tools/gpu_replicas.sh", carry=["scratch/rayB"])
# scratch/rayA: ray.partaa (55 MB, with the ~4 MB tree under the 64 MiB carry);
# scratch/rayB: ray.partab, the server wheels of .whl (no PyAV: this workload has no video) + Ray Serve's dependencies missing from the image (made with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ...`, then
# `split -b 55M ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl ray.part`).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; L=$OUT/log.txt
cp scratch/rayB/* /tmp/carry/ && cat /tmp/carry/ray.partaa /tmp/carry/ray.partab > /tmp/carry/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/carry/*.whl 2>&1 | tail -3 | tee -a $L
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
python3 -c "import ray, ray.serve; print('ray', ray.__version__)" 2>&1 | tail -2 | tee -a $L
BENCH="bench serve --model-config 3b --device cuda --clients 32 --requests 96 --mix text=2,session=1 --new-tokens 64 --session-turns 4"
run() { echo "### $*" | tee -a $L; local t0=$SECONDS; timeout -k 10 ${STEP_S:-170} python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $L; echo "### took $((SECONDS - t0)) s" | tee -a $L; }
run $BENCH --serve-args "--replicas 2 --replica-gpus 0.5" --json $OUT/serve_2replicas.json
run $BENCH --serve-args "--replicas 1 --replica-gpus 1" --json $OUT/serve_1replica.json
run $BENCH --json $OUT/serve_single_process.json
