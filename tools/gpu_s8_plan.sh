#!/usr/bin/env bash
# Next session's first H200 run (carry .whl and scratch/head: `git archive HEAD | gzip -1 >
# scratch/head/head.tar`), what session 7 could not measure with its closing defaults (sliced
# encode-ahead on a GPU, 128-token prefill chunks while decoding):
#   PART=1: single-stream figures of issue 8 / 11 with the new defaults: bench latency,
#           bench multiturn, bench stream (live frames arriving during an answer now go
#           through the sliced encode)
#   PART=2: issue 8's load at the defaults: interference twice, video8 x32 twice, text x32/x64;
#           then interference and video8 with --prefill-context-tokens-while-decoding 4096 and
#           2048 (opt-in: chunks past that context shrink; make it the default if it brings the
#           interference p99 ratio under 2x and video8 stays <= 1.5 s)
#   PART=3: issue 9's bench serve three times
STEP_S=${STEP_S:-170}
source tools/gpu_setup.sh
INTERFERENCE="bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64"
LOAD="bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0 --engine-process"
case "${PART:-1}" in
1)
  run bench latency --model-config 3b --frames 64 --size 448 --json $OUT/latency.json
  run bench multiturn --model-config 3b --device cuda --frames 64 --size 448 --turns 10 --new-tokens 16 --json $OUT/multiturn.json
  run bench stream --model-config 3b --size 448 --minutes 1,10,60 --json $OUT/stream.json ;;
2)
  for i in 1 2; do
    run $INTERFERENCE --json $OUT/interference_$i.json
    run $LOAD --mix video8 --clients 32 --json $OUT/video8_$i.json
  done
  run $LOAD --mix text --clients 32,64 --context-tokens 1024 --json $OUT/text.json
  for ctx in 4096 2048; do
    run $INTERFERENCE --prefill-context-tokens-while-decoding $ctx --json $OUT/interference_ctx$ctx.json
    run $LOAD --mix video8 --clients 32 --prefill-context-tokens-while-decoding $ctx --json $OUT/video8_ctx$ctx.json
  done ;;
3)
  for i in 1 2 3; do
    run bench serve --model-config 3b --device cuda --clients 32 --new-tokens 64 --json $OUT/serve_$i.json
  done ;;
esac
