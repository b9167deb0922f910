#!/usr/bin/env bash
# Paper-size APART and FGSM on one GPU: CIFAR-10, PreAct-ResNet-18 (width 64), 30 epochs at
# batch 128 with the default settings (experiments/configs/cifar10.py), clean and PGD-20
# accuracy every 2 epochs on 1,000 test images, then PGD-20 on the full 10,000 test images;
# a table (experiments.summarize) and the accuracy curves (experiments.plot) under $OUT.
#
#   bash experiments/gpu/paper_runs.sh SRC.npz
#
# SRC.npz: a decoded CIFAR-10 npz, or the JPEG q75 copy, decoded first by the script named by
# $DECODER (see experiments/cifar10_npz.sh). The decoded file (184 MB) is too large to carry to
# the GPU machine, the JPEG copy (56 MB) and the decoder are not: copy both into .data/
# (ignored by git) and run
#   DECODER=.data/cifar10_jpeg_to_npz.py bash experiments/gpu/paper_runs.sh .data/cifar10_jpeg_q75.npz
# The GPU image lacks ml_collections: carry it as a wheel in .whl/ (see setup.sh).
# Expected runtime on one H100 in bfloat16: about 10 minutes (an estimate from the speed
# benchmark's design, not yet measured). Expected result (the paper's, float32):
# APART 49.30% PGD-20 accuracy at epoch 30, FGSM 44.36% at epoch 20 and 0% at epoch 30.
# Sizes can be shrunk for a CPU rehearsal: EPOCHS=2 WIDTH=4 TRAIN_SIZE=512 EVAL_POINTS=64
# DTYPE=float32 (PYTHON=PATH picks the interpreter, for example a virtual environment's).
set -euo pipefail
src=${1:?usage: paper_runs.sh SRC.npz}
OUT=${OUT:-runs/gpu_paper}
PYTHON=${PYTHON:-python3}
EPOCHS=${EPOCHS:-30}
WIDTH=${WIDTH:-64}
DTYPE=${DTYPE:-bfloat16}
TRAIN_SIZE=${TRAIN_SIZE:-0}
EVAL_POINTS=${EVAL_POINTS:-10000}
mkdir -p "$OUT"
source "$(dirname "$0")/setup.sh"
data=$(PYTHON="$PYTHON" bash experiments/cifar10_npz.sh "$src" "$OUT")

runs=()
for preset in apart fgsm; do
  workdir="$OUT/$preset"
  runs+=(--workdir="$workdir")
  "$PYTHON" -m experiments.train \
      --config="experiments/configs/cifar10.py:$preset" --config.npz_path="$data" \
      --config.dtype="$DTYPE" --config.epochs="$EPOCHS" --config.width="$WIDTH" \
      --config.train_size="$TRAIN_SIZE" --config.test_size=$((EVAL_POINTS < 1000 ? EVAL_POINTS : 1000)) \
      --config.eval_every=2 --config.progress=False --workdir="$workdir" 2>&1 | grep -v "^W" \
      | tee "$OUT/$preset.txt"
  "$PYTHON" -m experiments.evaluate --workdir="$workdir" --suite=pgd20 --npz="$data" \
      --num_points="$EVAL_POINTS" --count_passes=False 2>&1 | grep -v "^W" | tee -a "$OUT/$preset.txt"
done
"$PYTHON" -m experiments.summarize "${runs[@]}" --out="$OUT/table.md" \
    --title="CIFAR-10 (JPEG q75 copy), PreAct-ResNet-18 width $WIDTH, $DTYPE, $EPOCHS epochs"
"$PYTHON" -m experiments.plot "${runs[@]}" --out="$OUT/accuracy.png"
