#!/usr/bin/env bash
# The GPU checks in one run (planned for under 8 minutes on one H100/H200; never run yet,
# see README "Speed").
#
#   bash benchmarks/gpu.sh                      # on the GPU machine, from the repository root
#   QUICK=1 DEVICE=cpu bash benchmarks/gpu.sh   # the same steps, smaller, on the CPU (checks
#                                               # the script; step 2 is ResNet-50 either way)
#
# 1. the CUDA tests (GPU results equal the CPU's: augmentation, Hessians, the solvers of one
#    layer and of several at once, trace);
# 2. FastOBC solver, batched against column by column: ResNet-50's 53 layers at 0.9, one
#    sample and a batch of 16 (operations and seconds)   -> results/solver-DEVICE.json;
# 3. one SPADE trace of torchvision ResNet-50 at 224 px with 1024 augmentations, everything
#    included (augmentation on the device, Hessians, solve), and trace_batch of 16: the batched
#    throughput                                         -> results/trace-DEVICE.json;
# 4. the cost benchmark on ResNet-50 (trace phases, exact OBC's solver time from a subset of
#    rows per layer shape)                               -> results/cost-gpu.json (chapter F).
#
# Targets (issue 14): FastOBC trace <= 1 s per sample, OBC <= 2 min, batched >= 5 samples/s.
# Each step runs whatever the previous one gave (a device is rarely lent); the timeouts add up
# to 9 minutes, and the last line lists every step's exit status (124: it ran out of time).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -n "${QUICK:-}" ]; then
    AUG=8; SAMPLES=2; BATCH=2; ARCH=resnet18; SIZE=32; CLASSES=10; MODELS=cpu; OUT=${OUT}/quick
    mkdir -p "$OUT"
else
    AUG=1024; SAMPLES=16; BATCH=16; ARCH=tv_resnet50; SIZE=224; CLASSES=1000; MODELS=tv_resnet50
fi
COST_OUT=$OUT/cost-gpu.json
[ "$DEVICE" = cuda ] || COST_OUT=$OUT/cost-$DEVICE.json

$PY -c "import torch; d = '$DEVICE'; print('device:', torch.cuda.get_device_name() if d == 'cuda' else d, '| torch', torch.__version__)"

STATUS=""
step() {  # step NAME SECONDS COMMAND...: run, record the exit status, go on
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@"
    STATUS="$STATUS $name=$?"
}

if [ "$DEVICE" = cuda ]; then
    step 1-cuda-tests 90 $PY -m pytest -q -rs -p no:cacheprovider -k gpu \
        tests/test_augment.py tests/test_hessians.py tests/test_pruning.py tests/test_trace.py
fi
step 2-solver 150 $PY benchmarks/bench_solver.py --device "$DEVICE" --batch "$BATCH" \
    --out "$OUT/solver-$DEVICE.json"
step 3-trace 150 $PY benchmarks/bench_trace.py --arch "$ARCH" --num-classes "$CLASSES" \
    --image-size "$SIZE" --n-augmentations "$AUG" --device "$DEVICE" --samples "$SAMPLES" \
    --skip-baseline --out "$OUT/trace-$DEVICE.json"
step 4-cost 150 $PY benchmarks/bench_cost.py --device "$DEVICE" --models "$MODELS" \
    --n-augmentations "$AUG" --obc-max-columns 5000 --out "$COST_OUT"
echo "steps:$STATUS (results in $OUT)"
case "$STATUS" in *=[1-9]*) exit 1 ;; esac
