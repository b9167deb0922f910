#!/usr/bin/env bash
# The speed issue's GPU check, as one script: full-size PreAct-ResNet-18 (width 64), clean,
# APART and PGD-10, bfloat16 at batch 512 (the issue's setting) and float32 at batch 128
# (the paper's), then PGD-10 with unrolled attack loops; JSON and tables under $OUT.
# Expected runtime on one H100: about 6 minutes, mostly compilation. Goal: APART >= 15,000
# images/s in bfloat16 at batch 512.
#
# Run from the repository root on the GPU machine:   bash experiments/gpu/bench_speed.sh
# The GPU image lacks ml_collections: carry it as a wheel in .whl/ (see setup.sh).
# Sizes can be shrunk for a CPU rehearsal: WIDTH=4 BATCH=32 STEPS=2 EPOCH=64 EVAL=32
# PYTHON=.venv/bin/python.
set -euo pipefail
OUT=${OUT:-runs/gpu_bench}
PYTHON=${PYTHON:-python3}
WIDTH=${WIDTH:-64}
BATCH=${BATCH:-512}
STEPS=${STEPS:-30}
EPOCH=${EPOCH:-10240}
EVAL=${EVAL:-2000}
mkdir -p "$OUT"
source "$(dirname "$0")/setup.sh"

common=(--width="$WIDTH" --methods=clean,apart,pgd10 --steps="$STEPS" --warmup=5
        --epoch_examples="$EPOCH" --eval_points="$EVAL")
"$PYTHON" -m experiments.bench_speed "${common[@]}" --batch_size="$BATCH" --dtype=bfloat16 \
    --json="$OUT/bench_bf16_b$BATCH.json" 2>&1 | grep -v "^W" | tee "$OUT/bench_bf16_b$BATCH.txt"
"$PYTHON" -m experiments.bench_speed "${common[@]}" --batch_size=$((BATCH / 4)) --dtype=float32 \
    --json="$OUT/bench_f32_b$((BATCH / 4)).json" 2>&1 | grep -v "^W" \
    | tee "$OUT/bench_f32_b$((BATCH / 4)).txt"
# GPUs keep attack loops rolled by default; measure PGD-10 and PGD-20 evaluation unrolled too.
"$PYTHON" -m experiments.bench_speed --width="$WIDTH" --methods=pgd10 --steps="$STEPS" \
    --warmup=5 --epoch_examples=0 --eval_points="$EVAL" --batch_size="$BATCH" \
    --dtype=bfloat16 --unroll=true --json="$OUT/bench_bf16_b${BATCH}_unrolled.json" 2>&1 \
    | grep -v "^W" | tee "$OUT/bench_bf16_b${BATCH}_unrolled.txt"
