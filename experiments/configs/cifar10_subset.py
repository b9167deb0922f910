"""The real-data study: a width-16 PreAct-ResNet-18 on 5,000 CIFAR-10 training images, 15 epochs.

Command (all six runs, the analysis, the evaluations, the table and the figures; about 3.5
hours on 2 CPU cores):
    bash experiments/cifar10_subset_study.sh SRC.npz
One run:
    python -m experiments.train --config=experiments/configs/cifar10_subset.py:fgsm16 \
        --config.npz_path=cifar10.npz --workdir=runs/subset/fgsm16
Presets (the text after the colon): fgsm, fgsm_rs, fgsm_plus, apart, pgd10 (eps 8/255) and
fgsm16 (FGSM at eps 16/255, where single-step training collapses more readily).
Expected runtime on 2 CPU cores: 10-16 minutes of training for a single-step method, 40 for
PGD-10 (measured while sharing the cores with other jobs), plus about 15 s of evaluation per
epoch.
Expected result (measured, docs/results.md): FGSM collapses (PGD-20 accuracy below 5% from
epoch 7, 3.9% at the end) and so does fgsm16; FGSM-RS, FGSM+, APART and PGD-10 end at
25-27% PGD-20 and 39-44% clean accuracy on the 256 test images.

Departures from the CIFAR-10 defaults, all for the CPU budget:
* width 16 (a quarter of the channels), the first 5,000 training images, 15 epochs;
* clean and PGD-20 accuracy every epoch on the first 256 test images (the study script
  evaluates the best and last epochs under C&W and AutoAttack on the first 100);
* a checkpoint every epoch, all kept, for experiments.robustness_drop;
* psi's rate auto-scaled by 11,730 / 600 steps (docs/algorithm.md#optimizers-and-schedules),
  used by FGSM+ and APART.
Evaluation is always at eps 8/255, also for fgsm16.
"""

import ml_collections

from experiments.configs import METHOD_PRESETS, preset_config

PRESETS = {**METHOD_PRESETS, "fgsm16": dict(method="fgsm", eps=16 / 255)}
EPOCHS = 15


def get_config(preset: str = "apart") -> ml_collections.ConfigDict:
    return preset_config(
        PRESETS,
        preset,
        dataset="npz",
        width=16,
        train_size=5000,
        test_size=256,
        epochs=EPOCHS,
        eval_every=1,
        eval_batch_size=256,
        checkpoint_every=0,
        checkpoint_keep=EPOCHS,
        psi_lr_autoscale=True,
    )
