#!/usr/bin/env bash
# Session 7, second run: sliced encode-ahead with the pixel upload in pieces and one share per
# waiting request: issue 8's interference (twice at the default chunk cap, once with 128-token
# chunks while decoding), 32 concurrent 8-frame questions with and without it, and the steps
# over 6 ms of a timeline. Carry .whl and scratch/head.
STEP_S=${STEP_S:-150}
source tools/gpu_setup.sh
INTERFERENCE="bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64"
VIDEO8="bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0 --engine-process --mix video8 --clients 32"
run $INTERFERENCE --vision-slice-rows 16384 --json $OUT/interference_16384_a.json
run $INTERFERENCE --vision-slice-rows 16384 --json $OUT/interference_16384_b.json
run $INTERFERENCE --vision-slice-rows 16384 --max-step-tokens-while-decoding 128 --json $OUT/interference_16384_cap128.json
run $VIDEO8 --vision-slice-rows 16384 --json $OUT/video8_16384.json
run $VIDEO8 --json $OUT/video8_off.json
echo "### SLICE=16384 tools/gpu_interference_timeline.py (steps over 6 ms)" | tee -a $OUT/log.txt
SLICE=16384 timeout 150 python3 tools/gpu_interference_timeline.py 2>&1 | grep -v -i warn > $OUT/timeline.txt
head -1 $OUT/timeline.txt | tee -a $OUT/log.txt
awk '/^  step/ && $6+0 > 6.0' $OUT/timeline.txt | head -40 | tee -a $OUT/log.txt
tail -1 $OUT/timeline.txt | tee -a $OUT/log.txt
