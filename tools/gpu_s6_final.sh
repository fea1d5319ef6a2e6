#!/usr/bin/env bash
# Session-6 closing measurements on the H200 (carry .whl and scratch/head: `git archive HEAD -o
# scratch/head/head.tar`): issue 8's text bursts (engine process and in-thread: the combined
# builds) and video8 x32, bench multiturn (sessions' follow-ups through the build queue), and
# issue 9's bench serve twice (the aiohttp client).
STEP_S=${STEP_S:-160}
source tools/gpu_setup.sh
LOAD="bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0"
run $LOAD --mix text --clients 32,64 --context-tokens 1024 --engine-process --json $OUT/concurrency_text_process.json
run $LOAD --mix text --clients 32,64 --context-tokens 1024 --json $OUT/concurrency_text.json
run $LOAD --mix video8 --clients 32 --engine-process --json $OUT/concurrency_video8_process.json
run bench multiturn --model-config 3b --device cuda --frames 64 --size 448 --turns 10 --new-tokens 16 --json $OUT/multiturn.json
for i in 1 2; do
  run bench serve --model-config 3b --device cuda --clients 32 --new-tokens 64 --json $OUT/serve_$i.json
done
