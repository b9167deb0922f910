"""CIFAR-10, PreAct-ResNet-18, the spec's defaults (APART, eps 8/255, 30 epochs, batch 128).

Command:
    python -m experiments.train --config=experiments/configs/cifar10.py \
        --config.npz_path=cifar10.npz --workdir=runs/cifar10_apart
    (--config.method=fgsm | fgsm_rs | fgsm_plus | apart | pgd for the other methods)
The npz holds x_train, y_train, x_test, y_test (uint8 NHWC, integer labels).
Expected runtime: GPU only (about 45 images/s per training step on a 2-core CPU).
Expected result (paper, PGD-20 at epoch 30): APART 49.30%, PGD-10 47.43%, FGSM 0%.
"""

from apart_jax.config import default_config


def get_config():
    c = default_config()
    c.dataset = "npz"
    return c
