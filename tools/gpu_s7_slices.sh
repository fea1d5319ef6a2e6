#!/usr/bin/env bash
# Session 7: sliced encode-ahead (EngineConfig.vision_slice_rows) on the H200, 3B: its
# embeddings against the usual encode, issue 8's encoder interference without it and at three
# slice sizes, a step timeline at 16384, and 32 concurrent 8-frame questions with it.
# Carry .whl and scratch/head (git archive HEAD | gzip -1 > scratch/head/head.tar).
STEP_S=${STEP_S:-150}
source tools/gpu_setup.sh
echo "### tools/gpu_slices_check.py" | tee -a $OUT/log.txt
timeout 150 python3 tools/gpu_slices_check.py 2>&1 | grep -v -i warn | tee -a $OUT/log.txt
INTERFERENCE="bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64"
run $INTERFERENCE --json $OUT/interference_off.json
for rows in ${ROWS:-16384 32768 8192}; do
  run $INTERFERENCE --vision-slice-rows $rows --json $OUT/interference_$rows.json
done
echo "### SLICE=16384 tools/gpu_interference_timeline.py" | tee -a $OUT/log.txt
SLICE=16384 timeout 150 python3 tools/gpu_interference_timeline.py 2>&1 | grep -v -i warn | tail -70 | tee -a $OUT/log.txt
run bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0 --engine-process --mix video8 --clients 32 --vision-slice-rows 16384 --json $OUT/video8_16384.json
