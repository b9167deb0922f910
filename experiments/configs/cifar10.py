"""CIFAR-10, PreAct-ResNet-18, the default settings: eps 8/255, 30 epochs, batch 128, lr 0.2.

Command (one run per preset; the text after the colon picks the method):
    python -m experiments.train --config=experiments/configs/cifar10.py:apart \
        --config.npz_path=cifar10.npz --workdir=runs/cifar10/apart
    python -m experiments.train --config=experiments/configs/cifar10.py:pgd10 \
        --config.npz_path=cifar10.npz --workdir=runs/cifar10/pgd10
Presets: fgsm, fgsm_rs, fgsm_plus, apart (the default), pgd10. The npz holds x_train,
y_train, x_test, y_test (uint8 NHWC, integer labels). To read CIFAR-10 through TFDS instead,
prepare it once (python -m apart_jax.data prepare cifar10) and replace --config.npz_path
with --config.dataset=cifar10 (same images, same defaults: grey padding of 4, flips).
Expected runtime: GPU only; see docs/benchmarks.md (no GPU timing measured yet; on the
2-core CPU a width-16 model trains at about 190 images/s for APART, 48 for PGD-10).
Expected result (the paper's numbers; PGD-20 at eps 8/255 on the 10k test set):
APART 49.30%, PGD-10 47.43%, FGSM+ about 46% (read off a figure), FGSM 44.36% at epoch 20
then 0% by epoch 30 (catastrophic overfitting from about epoch 22); clean accuracy of the
robust models about 80-85%. No FGSM-RS number is quoted from the paper; not measured here.

Everything else is the release's: SGD with a triangular rate 0 -> 0.2 -> 0 over the 30
epochs, weight decay 2e-4, psi's rate 5e-8 unscaled (11,730 steps, the count it is tuned
for), PGD-20 evaluation every 2 epochs on the full test set (docs/algorithm.md).
"""

import ml_collections

from experiments.configs import METHOD_PRESETS, preset_config

PRESETS = METHOD_PRESETS


def get_config(preset: str = "apart") -> ml_collections.ConfigDict:
    return preset_config(
        PRESETS,
        preset,
        dataset="npz",
    )
