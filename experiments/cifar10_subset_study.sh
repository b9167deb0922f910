#!/usr/bin/env bash
# The real-data study of docs/results.md, end to end, on the CIFAR-10 JPEG q75 copy.
#
#   bash experiments/cifar10_subset_study.sh SRC.npz [RUNS_DIR]
#
# SRC.npz is either the decoded x_train/y_train/x_test/y_test layout or the JPEG copy
# (cifar10_jpeg_q75.npz), decoded first by experiments/cifar10_npz.sh with $DECODER. Steps:
# 1. train the six presets of experiments/configs/cifar10_subset.py (a checkpoint per epoch);
# 2. the robustness-drop analysis of FGSM and FGSM+ against the PGD-10 reference
#    (experiments.robustness_drop) on the 256 test images and 256 training images;
# 3. C&W and AutoAttack on the first $POINTS test images (default 100) of the full test split,
#    for the best and the last epoch of every run (experiments.evaluate, the epochs that
#    experiments.summarize --missing lists; PGD-20 per epoch comes from training's own
#    evaluation);
# 4. the table (experiments.summarize) and the accuracy curves (experiments.plot);
# 5. the figures, CSVs and table copied to docs/results/, and the table between the
#    subset-table markers of docs/results.md replaced by the new one.
# Every step is skipped or resumed when its output exists, so rerunning the command after an
# interruption continues where it stopped. About 3.5 hours on 2 CPU cores: 1.7 hours of
# training, 20 minutes of analysis, 80 minutes of C&W and AutoAttack (12 checkpoints).
set -euo pipefail
src=${1:?usage: cifar10_subset_study.sh SRC.npz [RUNS_DIR]}
runs=${2:-runs/subset}
python=${PYTHON:-python}
points=${POINTS:-100}
docs=${DOCS:-docs/results}
presets=(fgsm fgsm_plus pgd10 apart fgsm_rs fgsm16)
mkdir -p "$runs" "$docs"
data=$(PYTHON="$python" bash "$(dirname "$0")/cifar10_npz.sh" "$src" "$runs")

config=experiments/configs/cifar10_subset.py
for preset in "${presets[@]}"; do
  echo "== training $preset"
  "$python" -m experiments.train --config="$config:$preset" --config.npz_path="$data" \
    --config.progress=False --workdir="$runs/$preset"
done

echo "== robustness-drop analysis"
[ -f "$runs/analysis/robustness_drop.csv" ] || "$python" -m experiments.robustness_drop \
  --fgsm="$runs/fgsm" --fgsm_plus="$runs/fgsm_plus" --reference="$runs/pgd10" \
  --train_points=256 --out="$runs/analysis"

echo "== evaluation on $points test images"
workdirs=()
for preset in "${presets[@]}"; do workdirs+=(--workdir="$runs/$preset"); done
"$python" -m experiments.summarize "${workdirs[@]}" --missing > "$runs/missing.txt"
while read -r workdir step; do
  echo "-- $workdir, step $step"
  "$python" -m experiments.evaluate --workdir="$workdir" --step="$step" \
    --suite=cw,autoattack --npz="$data" --num_points="$points" --count_passes=False < /dev/null
done < "$runs/missing.txt"

echo "== table and figures"
title="CIFAR-10 (JPEG q75 copy), 5,000 training images, PreAct-ResNet-18 width 16, 15 epochs"
"$python" -m experiments.summarize "${workdirs[@]}" --title="$title" --out="$runs/table.md" \
  --csv="$runs/table.csv"
"$python" -m experiments.plot "${workdirs[@]}" --out="$runs/accuracy.png" \
  --title="CIFAR-10 JPEG q75 subset: clean (dashed), PGD-20 (solid), 256 test images"
cp "$runs/table.md" "$runs/table.csv" "$runs/accuracy.png" "$docs/"
for file in robustness_drop.csv robustness_drop.png perturbations.png; do
  cp "$runs/analysis/$file" "$docs/"
done
"$python" - "$runs/table.md" docs/results.md <<'PY'
import re, sys
table, results = sys.argv[1], sys.argv[2]
block = open(table).read().strip()
text = open(results).read()
begin, end = "<!-- subset-table -->", "<!-- /subset-table -->"
if begin not in text or end not in text:
    sys.exit(f"{results} lacks the {begin} ... {end} markers")
text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: f"{begin}\n{block}\n{end}", text, flags=re.S)
open(results, "w").write(text)
print(f"updated {results}")
PY
