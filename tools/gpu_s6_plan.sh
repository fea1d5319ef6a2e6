#!/usr/bin/env bash
# Next session's first H200 run (carry .whl and scratch/head: `git archive HEAD -o scratch/head/head.tar`),
# what session 5 could not measure (its device budget was spent):
#   PART=1: graph path vs eager numerics for chunks of 0-1000 new tokens (graphs now go to 1024
#           rows: review finding), then issue 9's bench serve three times back to back (resolve 9
#           only if every run meets its three targets)
#   PART=2: prefill_cap_scope each_request vs per_request (engine process): text x32/x64,
#           video8 x32, the encoder interference
STEP_S=${STEP_S:-170}
source tools/gpu_setup.sh
LOAD="bench concurrency --model-config 3b --size 448 --new-tokens 64 --baseline-requests 0 --interference-clients 0 --engine-process"
case "${PART:-1}" in
1)
  echo "### graph check" | tee -a $OUT/log.txt
  timeout 200 python3 tools/gpu_graph_check.py 0 69 200 600 1000 2>&1 | grep -v -i warn | grep "graph check\|vision" | tee -a $OUT/log.txt
  for i in 1 2 3; do
    run bench serve --model-config 3b --device cuda --clients 32 --new-tokens 64 --json $OUT/serve_$i.json
  done ;;
2)
  for scope in per_request each_request; do
    run $LOAD --mix text --clients 32,64 --context-tokens 1024 --prefill-cap-scope $scope --json $OUT/text_$scope.json
    run $LOAD --mix video8 --clients 32 --prefill-cap-scope $scope --json $OUT/video8_$scope.json
    run bench concurrency --model-config 3b --size 448 --new-tokens 64 --interference-only --interference-clients 16 \
        --interference-tokens 128 --interference-frames 64 --prefill-cap-scope $scope --json $OUT/interference_$scope.json
  done ;;
esac
