#!/usr/bin/env bash
# Session 7, closing run (sliced encode-ahead on by default on the GPU): issue 8's interference
# (default; and with 128-token chunks while decoding), 32 concurrent 8-frame questions (both),
# text x32/x64, and issue 9's bench serve once. Carry .whl and scratch/head.
STEP_S=${STEP_S:-150}
source tools/gpu_setup.sh
INTERFERENCE="bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64"
LOAD="bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0 --engine-process"
run $INTERFERENCE --json $OUT/interference.json
run $LOAD --mix video8 --clients 32 --json $OUT/video8.json
run $LOAD --mix video8 --clients 32 --max-step-tokens-while-decoding 128 --json $OUT/video8_cap128.json
run $LOAD --mix text --clients 32,64 --context-tokens 1024 --json $OUT/text.json
run bench serve --model-config 3b --device cuda --clients 32 --new-tokens 64 --json $OUT/serve.json
