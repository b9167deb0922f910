"""One epoch's training steps, dispatched without reading anything back.

:func:`compile_epoch_steps` compiles the run's in-epoch step once per batch size of an
epoch (the last batch may be smaller); :func:`train_epoch` runs them over the epoch's
batches in a device-side order, leaving to its ``after_step`` callback (the trainer's
progress, health checks and checkpoints; nothing in the speed benchmark) what to wait for.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from apart_jax.data import DeviceData
from apart_jax.health import StepHealth, healthy, record_health
from apart_jax.run import Run
from apart_jax.state import EpochTotals, TrainState
from apart_jax.step import device_order


def compile_epoch_steps(run: Run, state: TrainState) -> dict[int, Callable]:
    """The run's ``in_epoch`` step compiled ahead of time for each batch size of an epoch."""
    order = device_order(run.config.seed, 1, len(run.dataset.y_train), run.mesh)
    return {
        size: run.train_step.in_epoch.lower(
            state, run.data, order, np.int32(0), batch_size=size
        ).compile()
        for size in sorted(set(run.batch_sizes))
    }


def train_epoch(
    steps: dict[int, Callable],
    state: TrainState,
    totals: EpochTotals,
    data: DeviceData,
    order: jax.Array,
    batch_sizes: list[int],
    first: int = 0,
    after_step: Callable[[int, TrainState, EpochTotals, StepHealth], None] | None = None,
    health: StepHealth | None = None,
) -> tuple[TrainState, EpochTotals, StepHealth]:
    """Trains on the epoch's batches ``first``, ``first + 1``, ... in ``order``.

    ``steps`` maps each batch size to its compiled step (:func:`compile_epoch_steps`).
    Nothing is read back from the devices here: the steps are dispatched asynchronously and
    ``after_step(i, state, totals, health)`` (progress, checkpoints) decides what to wait
    for. ``health`` (default: none bad yet) accumulates non-finite steps.
    """
    starts = np.cumsum([0, *batch_sizes])
    if health is None:
        health = healthy(totals.loss_sum.sharding)
    for i in range(first, len(batch_sizes)):
        size = batch_sizes[i]
        state, metrics = steps[size](state, data, order, np.int32(starts[i]))
        totals = EpochTotals(
            totals.loss_sum + metrics["loss"] * size,
            totals.correct_sum + metrics["accuracy"] * size,
        )
        health = record_health(health, metrics["nonfinite"], state.step)
        if after_step is not None:
            after_step(i, state, totals, health)
    return state, totals, health
