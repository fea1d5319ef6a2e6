# Sourced by the GPU session scripts (run from the repository root on the device, with .whl and
# scratch/head carried): installs the carried wheels, unpacks the committed tree into /tmp/head
# and enters it, sets the environment and OUT, and defines run CLI-ARGS... (logged to $OUT/log.txt,
# each command under a timeout of $STEP_S seconds, default 150).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/head && tar -xf scratch/head/head.tar -C /tmp/head && cd /tmp/head || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
run() { echo "### $*" | tee -a $OUT/log.txt; local t0=$SECONDS; timeout -k 10 ${STEP_S:-150} python3 -m omnistream.entrypoints.cli "$@" 2>&1 | grep -v -i "warn" | tee -a $OUT/log.txt; echo "### took $((SECONDS - t0)) s" | tee -a $OUT/log.txt; }
