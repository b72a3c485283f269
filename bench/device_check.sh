#!/usr/bin/env bash
# The GPU checks in one prepared run, for a lent GPU machine (about 8 minutes on one GPU):
# the two CUDA tests, bench/gpu_train_step.py (every setting, GPO and max pooling) and
# bench/pooling_speed.py on CUDA (whole grid). Each step's output goes to $OUT/<step>.txt and a
# line per step (its exit status) to $OUT/summary.txt; a failing step does not stop the others.
#
#   make device-wheels             # here: the wheels the tests need that a GPU image may lack
#   bash bench/device_check.sh     # there, from the repository root (carry .device_wheels)
#   DEVICE=cpu bash bench/device_check.sh   # the same steps in their tiny CPU forms (tested)
#
# Nothing is downloaded there: missing packages come from .device_wheels/ only.
set -uo pipefail
OUT=${OUT:-device_check}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=src HF_HUB_OFFLINE=1 WANDB_MODE=offline
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, record its status
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.txt"
}

step environment 60 "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
if ! "$PY" -c "import hydra, omegaconf" 2> /dev/null; then
    step wheels 120 "$PY" -m pip install --no-index --find-links .device_wheels \
        hydra-core omegaconf antlr4-python3-runtime
fi
step cuda_tests 120 "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_metrics.py::test_cuda_matches_naive \
    tests/test_errors.py::test_loss_watch_does_not_sync_per_step
if [ "$DEVICE" = cuda ]; then
    step gpu_train_step 270 "$PY" bench/gpu_train_step.py
    step pooling_speed 150 "$PY" bench/pooling_speed.py --device cuda --threads 1 --full
else
    step gpu_train_step 270 "$PY" bench/gpu_train_step.py --device cpu --tiny
    step pooling_speed 150 "$PY" bench/pooling_speed.py --smoke
fi
! grep -qv " rc=0$" "$OUT/summary.txt"
