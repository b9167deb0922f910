"""CIFAR-100, PreAct-ResNet-18, the CIFAR-10 settings (eps 8/255, 30 epochs, batch 128, lr 0.2).

Command (prepare the TFDS data once, then one run per preset):
    python -m apart_jax.data prepare cifar100
    python -m experiments.train --config=experiments/configs/cifar100.py:apart \
        --workdir=runs/cifar100/apart
    python -m experiments.train --config=experiments/configs/cifar100.py:pgd10 \
        --workdir=runs/cifar100/pgd10
Presets: fgsm, fgsm_rs, fgsm_plus, apart (the default), pgd10. The data is read through
TFDS (dataset "cifar100"; --config.data_dir=DIR for a non-default TFDS directory); an npz
of CIFAR-100 works too: --config.dataset=npz --config.npz_path=cifar100.npz.
Expected runtime: GPU only; about the same as experiments/configs/cifar10.py (same image
count and model; only the head has 100 outputs); see docs/benchmarks.md.
Expected result: no CIFAR-100 number from the paper is quoted here; not measured here.
Robust accuracy is far below CIFAR-10's on this harder task.

Same augmentation as CIFAR-10 (grey padding of 4 pixels, random crops, flips). 50,000
training images at batch 128 give the 11,730 steps that psi's defaults are tuned for, so
psi's rate is the release's 5e-8, not scaled.
"""

import ml_collections

from experiments.configs import METHOD_PRESETS, preset_config

PRESETS = METHOD_PRESETS


def get_config(preset: str = "apart") -> ml_collections.ConfigDict:
    return preset_config(
        PRESETS,
        preset,
        dataset="cifar100",
    )
