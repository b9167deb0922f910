"""experiments.train with a scripted evaluation, so that a run in a subprocess (or several
processes of one run) collapses at a known epoch:

    python -m tests.scripted_train --config=... --workdir=... [--num_processes=2 ...]

The run's evaluation returns :data:`CLEAN` and the :data:`PGD` accuracy of the state's epoch
(:func:`scripted_accuracies`), whatever its weights; the rest is the real command.
"""

from __future__ import annotations

from typing import Any

# Runs of 2 steps per epoch (64 examples in batches of 32). The scripted PGD-20 accuracy of
# each epoch: the best is epoch 2 (0.5); epoch 3 (0.375) stays above half of it, epoch 4
# (0.125) falls below: the collapse, at step 8.
STEPS_PER_EPOCH = 2
PGD = {1: 0.25, 2: 0.5, 3: 0.375, 4: 0.125, 5: 0.5}
CLEAN = 0.75


def scripted_accuracies(state: Any) -> dict[str, float]:
    """The evaluation's accuracies for ``state`` (a TrainState), from its step alone."""
    return {"clean_acc": CLEAN, "pgd20_acc": PGD[int(state.step) // STEPS_PER_EPOCH]}


if __name__ == "__main__":
    from absl import app

    from apart_jax import trainer
    from experiments import train
    from experiments.cli import parse_flags_or_exit

    trainer.run_evaluation = lambda run: scripted_accuracies
    app.run(train.main, flags_parser=parse_flags_or_exit)
