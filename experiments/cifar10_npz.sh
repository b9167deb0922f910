#!/usr/bin/env bash
# Prints the path of a decoded CIFAR-10 npz (x_train, y_train, x_test, y_test), decoding the
# JPEG q75 copy first if SRC is that copy:
#   data=$(bash experiments/cifar10_npz.sh SRC.npz DIR)
# A decoded SRC is printed as it is; the JPEG copy is decoded once into DIR/cifar10_q75.npz
# with $DECODER (default ../shared/tools/cifar10_jpeg_to_npz.py, beside this repository).
set -euo pipefail
src=${1:?usage: cifar10_npz.sh SRC.npz DIR}
dir=${2:?usage: cifar10_npz.sh SRC.npz DIR}
python=${PYTHON:-python}
decoder=${DECODER:-$(dirname "$0")/../../shared/tools/cifar10_jpeg_to_npz.py}
if "$python" -c "import numpy, sys; sys.exit('x_train' not in numpy.load(sys.argv[1]).files)" "$src"; then
  echo "$src"
  exit 0
fi
mkdir -p "$dir"
out="$dir/cifar10_q75.npz"
[ -f "$out" ] || "$python" "$decoder" "$src" "$out" >&2
echo "$out"
