# Sourced by the GPU scripts: installs carried wheels (.whl/*.whl, e.g. ml_collections, which
# the GPU image lacks) into /tmp/site, sets PYTHONPATH, and records the devices in $OUT.
# Fetch the wheel here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl ml_collections
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
"$PYTHON" -c "import jax; print(jax.__version__, jax.devices())" | tee "$OUT/devices.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/devices.txt" || true
