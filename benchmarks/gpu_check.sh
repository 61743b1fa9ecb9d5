#!/usr/bin/env bash
# The GPU figures of docs/speed.md, in one go (about 3 minutes on an H200):
#   bash benchmarks/gpu_check.sh [OUT]        (default OUT: results/gpu)
# Speed and memory of ICE against the floor, SupCon and MultiSimilarity at D = 512 in
# float32 and bfloat16, a 4096 batch against a 1,048,576-entry memory bank, ICE's dense
# path at batch 65536, the loss tests on CUDA, and a short harness run on CUDA with
# bfloat16 autocast (the default dataset, 2 epochs, 1 seed).
# Each step's table or summary lands in OUT; a failing step does not stop the others.
set -u
OUT=${1:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SPEED="python3 -m benchmarks.speed --device cuda --dim 512 --out $OUT/speed"
LOSSES=floor,ice,supcon,multisimilarity
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
speed() {  # name, then benchmarks.speed options
    local name=$1
    shift
    $SPEED --name "$name" "$@" >/dev/null 2>&1
    tail -n +5 "$OUT/speed/$name.md" 2>/dev/null || echo "speed run $name failed"
}
speed float32 --batches 1024,4096,16384,65536 --losses $LOSSES
speed bank_1M --batches 4096 --ref-size 1048576 --losses floor,ice
PML_ICE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/library > "$OUT/pytest_cuda.txt" 2>&1
tail -n 1 "$OUT/pytest_cuda.txt"
speed bfloat16 --batches 1024,4096,16384,65536 --losses $LOSSES --dtype bfloat16
speed dense_65536 --batches 65536 --losses floor,ice,ice:memory_efficient=False
python3 -m benchmarks.run --device cuda --amp bf16 --epochs 2 --seeds 1 --out "$OUT/run" > "$OUT/run_log.txt" 2>&1
echo "harness run on cuda (--amp bf16): exit $?"
grep "^|" "$OUT/run/summary.md" 2>/dev/null | head -9
