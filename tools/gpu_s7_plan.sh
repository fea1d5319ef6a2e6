#!/usr/bin/env bash
# Next session's first H200 run (carry .whl and scratch/head: `git archive HEAD | gzip -1 >
# scratch/head/head.tar`; gzip keeps the carry under 64 MiB), what session 6 could not measure
# (no device was lent after its closing run):
#   PART=1: issue 9's bench serve three times: the in-process reference now runs the engine in
#           its own process as the server does, bodies up to 1 MiB parse on the event loop
#           (resolve 9 only if every run meets its three targets)
#   PART=2: issue 8: text x32/x64 and video8 x32 (engine process; the combined builds), the
#           encoder interference, then prefill_cap_scope each_request on the same three
#   PART=3: why the first step of a text burst takes 25-38 ms (SM clock per step; WARM=1 keeps
#           the GPU busy just before the release)
STEP_S=${STEP_S:-170}
source tools/gpu_setup.sh
LOAD="bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0 --engine-process"
INTERFERENCE="bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 --interference-tokens 128 --interference-frames 64"
case "${PART:-1}" in
1)
  for i in 1 2 3; do
    run bench serve --model-config 3b --device cuda --clients 32 --new-tokens 64 --json $OUT/serve_$i.json
  done ;;
2)
  for scope in per_request each_request; do
    run $LOAD --mix text --clients 32,64 --context-tokens 1024 --prefill-cap-scope $scope --json $OUT/text_$scope.json
    run $LOAD --mix video8 --clients 32 --prefill-cap-scope $scope --json $OUT/video8_$scope.json
    run $INTERFERENCE --prefill-cap-scope $scope --json $OUT/interference_$scope.json
  done ;;
3)
  for warm in 0 1; do
    echo "### WARM=$warm gpu_step_timeline text 32" | tee -a $OUT/log.txt
    WARM=$warm timeout 200 python3 tools/gpu_step_timeline.py text 32 2>&1 | grep -v -i warn | tee -a $OUT/log.txt
  done ;;
esac
