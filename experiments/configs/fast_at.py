"""The fast-adversarial-training study: when does a single-step method collapse?

PreAct-ResNet-18 width 16 on the first 5,000 CIFAR-10 training images, 10 epochs of 40 steps,
trained at eps 8/255 or 16/255 and evaluated at its own eps. Driven, over methods, radii and
seeds, by ``python -m experiments.fast_at_study`` (docs/results.md#fast-adversarial-training).

Command (one run; the study script runs them all):
    python -m experiments.train --config=experiments/configs/fast_at.py:nfgsm16 \
        --config.npz_path=cifar10.npz --config.seed=1 --workdir=runs/fast_at/nfgsm16_s1
Presets (the text after the colon): METHOD + 8 or 16, METHOD one of fgsm (the collapsing
control), fgsm_rs, nfgsm, grad_align, fgsm_plus, apart, pgd10 (for example ``apart16``).
Expected runtime on 2 CPU cores: 3-5 minutes of training for a single-step method (10-13
for GradAlign, 12-19 for PGD-10), plus 25-50 s of evaluation per epoch (1,000 points).
Expected result (measured, docs/results.md#fast-adversarial-training): see the table there;
at 16/255 FGSM-RS collapses.

Departures from the CIFAR-10 defaults, all for the CPU budget:
* width 16, the first 5,000 training images, 10 epochs (400 steps, the paper has 11,730);
* clean and PGD-20 accuracy after every epoch on the first 1,000 test images (one standard
  error is about 1.5 points at 30% accuracy), at the training eps with steps of eps / 4;
* a checkpoint every epoch, all kept, so that the best and the last epoch can be attacked;
* psi's rate auto-scaled by 11,730 / 400 (FGSM+ and APART).
N-FGSM uses k = 2 and alpha = eps; GradAlign the release's FGSM base and lambda schedule
(0.2 at 8/255, 2.0 at 16/255). Collapse is detected and logged, never acted on.
"""

import ml_collections

from experiments.configs import METHOD_PRESETS, preset_config

EPOCHS = 10
METHODS = ("fgsm", "fgsm_rs", "nfgsm", "grad_align", "fgsm_plus", "apart", "pgd10")
RADII = (8, 16)  # in 1/255
PRESETS = {
    f"{name}{radius}": {
        **METHOD_PRESETS[name],
        "eps": radius / 255,
        "eval_eps": radius / 255,
        "eval_pgd_step_size": radius / 4 / 255,
        "pgd_step_size": radius / 4 / 255,
    }
    for name in METHODS
    for radius in RADII
}


def get_config(preset: str = "apart8") -> ml_collections.ConfigDict:
    return preset_config(
        PRESETS,
        preset,
        dataset="npz",
        width=16,
        train_size=5000,
        test_size=1000,
        epochs=EPOCHS,
        eval_every=1,
        eval_batch_size=500,
        checkpoint_every=0,
        checkpoint_keep=EPOCHS,
        psi_lr_autoscale=True,
    )
