#!/usr/bin/env bash
# The real-data study of docs/results.md, end to end, on the CIFAR-10 JPEG q75 copy.
#
#   bash experiments/cifar10_subset_study.sh SRC.npz [RUNS_DIR]
#
# SRC.npz is either the decoded x_train/y_train/x_test/y_test layout or the JPEG copy
# (../shared/data/cifar10_jpeg_q75.npz), which is decoded first with
# ../shared/tools/cifar10_jpeg_to_npz.py. Every step is skipped or resumed when its output
# exists, so rerunning the command after an interruption continues where it stopped.
set -euo pipefail
src=${1:?usage: cifar10_subset_study.sh SRC.npz [RUNS_DIR]}
runs=${2:-runs/subset}
python=${PYTHON:-python}
mkdir -p "$runs"
data="$src"
if "$python" -c "import numpy, sys; sys.exit('x_train' in numpy.load(sys.argv[1]).files)" "$src"; then
  data="$runs/cifar10_q75.npz"
  [ -f "$data" ] || "$python" "$(dirname "$0")/../../shared/tools/cifar10_jpeg_to_npz.py" "$src" "$data"
fi
config=experiments/configs/cifar10_subset.py
for preset in fgsm fgsm_plus pgd10 apart fgsm_rs fgsm16; do
  echo "== training $preset"
  "$python" -m experiments.train --config="$config:$preset" --config.npz_path="$data" \
    --config.progress=False --workdir="$runs/$preset"
done
