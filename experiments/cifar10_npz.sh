#!/usr/bin/env bash
# Prints the path of a decoded CIFAR-10 npz (x_train, y_train, x_test, y_test), decoding the
# JPEG q75 copy first if SRC is that copy:
#   data=$(bash experiments/cifar10_npz.sh SRC.npz DIR)
# A decoded SRC is printed as it is; the JPEG copy is decoded once into DIR/cifar10_q75.npz
# with $DECODER, the decoding script that comes with the JPEG copy (not part of this repository):
#   DECODER=/path/to/cifar10_jpeg_to_npz.py bash experiments/cifar10_npz.sh SRC.npz DIR
set -euo pipefail
src=${1:?usage: cifar10_npz.sh SRC.npz DIR}
dir=${2:?usage: cifar10_npz.sh SRC.npz DIR}
python=${PYTHON:-python}
if "$python" -c "import numpy, sys; sys.exit('x_train' not in numpy.load(sys.argv[1]).files)" "$src"; then
  echo "$src"
  exit 0
fi
mkdir -p "$dir"
out="$dir/cifar10_q75.npz"
if [ ! -f "$out" ]; then
  decoder=${DECODER:?$src is the JPEG copy: set DECODER to its decoding script (cifar10_jpeg_to_npz.py)}
  "$python" "$decoder" "$src" "$out" >&2
fi
echo "$out"
