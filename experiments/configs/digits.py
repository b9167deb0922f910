"""The quickstart's setting: the embedded scikit-learn digits (real 8x8 images), a small CNN.

Command (one method):
    python -m experiments.train --config=experiments/configs/digits.py --workdir=runs/digits_apart
    (add --config.method=fgsm | fgsm_rs | fgsm_plus | apart | pgd)
All three quickstart methods: python -m experiments.quickstart
Expected runtime on 2 CPU cores: about 10 s per method for FGSM and APART, 40 s for PGD-10.
Expected result (measured, see README.md): clean accuracy 95-98% for every method, PGD-20
accuracy at eps 32/255 about 79% for FGSM and APART and 80% for PGD-10.

Departures from the CIFAR-10 defaults, all for the 8x8x1 inputs (17 grey levels):
* eps 32/255 (about two grey levels) for training and evaluation; PGD steps of eps/4;
* one pixel of padding and no flips (a mirrored digit is another symbol);
* psi: its objective L1 - (decay/2) ||psi||^2 weighs a loss whose slope in alpha grows with
  the input dimension, so the decay is scaled by 64/3072 and the rate by 3072/64 (then
  auto-scaled by 11,730 / 360 steps). With the CIFAR-10 values alpha ended near 0.002 and
  APART's PGD-20 accuracy at 29%, close to clean training.
"""

from apart_jax.config import default_config

CIFAR10_INPUT_SIZE = 32 * 32 * 3
DIGITS_INPUT_SIZE = 8 * 8 * 1


def get_config():
    c = default_config()
    c.dataset = "digits"
    c.model = "small_cnn"
    c.width = 16
    c.method = "apart"
    c.epochs = 30
    c.batch_size = 128
    c.eval_every = 5
    # An epoch is 12 steps and 0.15 s; a save holds training up for about 0.07 s, so save
    # every 10 epochs (and at the end) instead of every epoch.
    c.checkpoint_every = 120

    c.eps = 32 / 255
    c.pgd_step_size = c.eps / 4
    c.eval_eps = c.eps
    c.eval_pgd_step_size = c.eps / 4

    ratio = CIFAR10_INPUT_SIZE / DIGITS_INPUT_SIZE
    c.psi_weight_decay = c.psi_weight_decay / ratio
    c.psi_lr_scale = ratio
    c.psi_lr_autoscale = True
    return c
