"""CIFAR-10 robustness drop: 200 epochs of repeated 30-epoch cycles, APART against PGD-10.

Command (the two runs of the paper's robustness-drop figure):
    python -m experiments.train --config=experiments/configs/cifar10_200.py:apart \
        --config.npz_path=cifar10.npz --workdir=runs/cifar10_200/apart
    python -m experiments.train --config=experiments/configs/cifar10_200.py:pgd10 \
        --config.npz_path=cifar10.npz --workdir=runs/cifar10_200/pgd10
Presets: apart (the default), pgd10. With TFDS: --config.dataset=cifar10 instead of
--config.npz_path (see experiments/configs/cifar10.py).
Expected runtime: GPU only; about 200 / 30 = 6.7 times the 30-epoch run of the same
method in experiments/configs/cifar10.py (see docs/benchmarks.md; no GPU timing yet).
Expected result (the paper's, read off the authors' figure; PGD-20 at eps 8/255):
APART best about 0.49, last (epoch 200) about 0.42; PGD-10 best about 0.47, last about
0.31. Not measured here.

The schedule: schedule_epochs=30 makes the triangle 0 -> lr_max -> 0 repeat every 30
epochs (30 x 391 = 11,730 steps): the rate is 0 at epochs 0, 30, ..., 180 and peaks
(0.2) at epochs 15, 45, ..., 195; the momentum cycles inversely and psi's rate (5e-8,
not auto-scaled, as in the release) follows the same repeated triangle. 200 is not a
multiple of 30: the last 20 epochs are the first two thirds of a seventh cycle, so the
rate rises to 0.2 at epoch 195 and the run stops on the way down at 2/3 of the peak
(about 0.133) instead of at 0. This is what repeating the release's per-iteration cycle
for 200 epochs does.

Checkpoints: one at the end of every epoch, all 200 kept, for the per-epoch robustness
analysis (experiments.evaluate on any of them). A checkpoint holds the whole training
state: about 90 MB for PGD-10 (weights and momentum), but about 1.05 GB for APART, whose
Omega (50,000 x 40 x 40 x 3 float32) is 0.96 GB, so about 210 GB for all of APART's.
checkpoint_keep is an execution setting: lower it (--config.checkpoint_keep=N, also on a
resumed run) if the disk is smaller, and evaluate the epochs as they are written.
"""

import ml_collections

from experiments.configs import METHOD_PRESETS, preset_config

PRESETS = {name: METHOD_PRESETS[name] for name in ("apart", "pgd10")}

EPOCHS = 200
CYCLE_EPOCHS = 30


def get_config(preset: str = "apart") -> ml_collections.ConfigDict:
    return preset_config(
        PRESETS,
        preset,
        dataset="npz",
        epochs=EPOCHS,
        schedule_epochs=CYCLE_EPOCHS,
        checkpoint_every=0,  # at the end of every epoch
        checkpoint_keep=EPOCHS,
    )
