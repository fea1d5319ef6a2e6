#!/usr/bin/env bash
# Session-5 closing measurements on the H200 (carry .whl and scratch/head: the committed tree as
# a tar, made with `git archive HEAD -o scratch/head/head.tar`): issue 8's bursts (text 32/64 with
# the engine in its own process and in-thread, video8 x32 in its own process), the encoder
# interference, bench latency / multiturn / stream, and issue 9's bench serve.
source tools/gpu_setup.sh
LOAD="bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0"
run $LOAD --mix text --clients 32,64 --context-tokens 1024 --engine-process --json $OUT/concurrency_text_process.json
run $LOAD --mix text --clients 32,64 --context-tokens 1024 --json $OUT/concurrency_text.json
run $LOAD --mix video8 --clients 32 --engine-process --json $OUT/concurrency_video8_process.json
run bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64 --json $OUT/concurrency_interference.json
run bench latency --model-config 3b --frames 64 --size 448 --json $OUT/latency.json
run bench multiturn --model-config 3b --device cuda --frames 64 --size 448 --turns 10 --new-tokens 16 --json $OUT/multiturn.json
run bench stream --model-config 3b --size 448 --minutes 1,10,60 --json $OUT/stream.json
STEP_S=160 run bench serve --model-config 3b --device cuda --clients 32 --new-tokens 64 --json $OUT/serve.json
