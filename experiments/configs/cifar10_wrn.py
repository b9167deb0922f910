"""CIFAR-10, WideResNet-34-10 (46.2M parameters), the default training settings.

Command (one run per preset):
    python -m experiments.train --config=experiments/configs/cifar10_wrn.py:apart \
        --config.npz_path=cifar10.npz --workdir=runs/cifar10_wrn/apart
    python -m experiments.train --config=experiments/configs/cifar10_wrn.py:pgd10 \
        --config.npz_path=cifar10.npz --workdir=runs/cifar10_wrn/pgd10
Presets: fgsm, fgsm_rs, fgsm_plus, apart (the default), pgd10. With TFDS:
--config.dataset=cifar10 instead of --config.npz_path (see experiments/configs/cifar10.py).
Mixed precision (bfloat16 convolutions, float32 parameters) halves the activations'
memory: --config.dtype=bfloat16.
Expected runtime: GPU only; roughly 12 times the PreAct-ResNet-18 run of
experiments/configs/cifar10.py, by arithmetic (a forward pass of a 32x32 image is 6.66 G
multiply-adds for WRN-34-10, 0.56 G for PreAct-ResNet-18); not measured, see
docs/benchmarks.md.
Expected result: no WideResNet number from the paper is quoted here; not measured here.

The model (apart_jax.models.wide_resnet34_10): stem 16 channels, three stages of 5
pre-activation blocks at 160, 320, 640 channels (width=160 is the first stage's), 15 blocks
and so 15 layer-wise alphas for APART. Its 1x1 projection shortcuts see the pre-activated
input (shortcut_input="preact"), as in the WideResNet of Madry et al. and TRADES; the APART
release's PreAct-ResNet-18 uses "raw" (--config.shortcut_input=raw). Training settings
are the default CIFAR-10 ones (lr 0.2 triangle over 30 epochs, weight decay 2e-4, batch 128),
not the WRN literature's (piecewise lr 0.1, decay 5e-4, 100+ epochs).
"""

import ml_collections

from experiments.configs import METHOD_PRESETS, preset_config

PRESETS = METHOD_PRESETS


def get_config(preset: str = "apart") -> ml_collections.ConfigDict:
    return preset_config(
        PRESETS,
        preset,
        dataset="npz",
        model="wide_resnet34_10",
        width=160,
        shortcut_input="preact",
    )
