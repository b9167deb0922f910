"""Non-finite training steps: a per-step code computed on the device, accumulated without
reading anything back, and checked on the host when the trainer syncs anyway.

Every step reports :func:`nonfinite_code` in its metrics; :func:`record_health` folds it
into a :class:`StepHealth` (device scalars); :func:`check_health` reads that back every
``log_every`` steps and before every checkpoint, and stops the run with a one-line
:class:`NonFiniteError` naming the step and the quantity.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apart_jax.state import TrainState

NONFINITE_QUANTITIES = ("loss", "weights", "psi", "BN statistics")


def nonfinite_code(loss: jax.Array, state: TrainState) -> jax.Array:
    """0 if the step's loss and the new state are finite, else 1 + the index in
    :data:`NONFINITE_QUANTITIES` of the first quantity that is not (int32 scalar).

    Omega is not scanned (a pass over all of it per step would cost more than the check is
    worth); a non-finite Omega row makes the loss of the next step that reads it non-finite.
    """
    checks = [jnp.isfinite(loss)] + [
        jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))
        if jax.tree.leaves(tree)
        else jnp.bool_(True)
        for tree in (state.params, state.psi, state.batch_stats)
    ]
    failed = ~jnp.stack(checks)
    return jnp.where(jnp.any(failed), jnp.argmax(failed) + 1, 0).astype(jnp.int32)


class StepHealth(NamedTuple):
    """What went non-finite since the run (re)started; int32 scalars on the device.

    bad_step: the first step (1-based, as checkpoints count) whose loss or new state was
      not finite, -1 if none; bad_code: its :func:`nonfinite_code`; skipped: steps discarded
      under ``skip_nonfinite``. Not checkpointed: a checkpoint is never written after a
      non-finite step unless it was skipped.
    """

    bad_step: jax.Array
    bad_code: jax.Array
    skipped: jax.Array


def healthy(sharding: jax.sharding.Sharding) -> StepHealth:
    """A :class:`StepHealth` with nothing bad yet, placed with ``sharding``."""
    put = functools.partial(jax.device_put, device=sharding)
    return StepHealth(put(np.int32(-1)), put(np.int32(0)), put(np.int32(0)))


def record_health(health: StepHealth, code: jax.Array, step: jax.Array) -> StepHealth:
    """``health`` after a step numbered ``step`` (1-based) whose non-finite code is ``code``."""
    first = (health.bad_step < 0) & (code > 0)
    return StepHealth(
        jnp.where(first, step, health.bad_step),
        jnp.where(first, code, health.bad_code),
        health.skipped + (code > 0),
    )


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or state; the message names the step and quantity."""


def check_health(health: StepHealth, skip_nonfinite: bool, newest_checkpoint: str | None) -> None:
    """Raises :class:`NonFiniteError` if a step was not finite and was not skipped."""
    if skip_nonfinite:
        return
    bad_step, code = (int(v) for v in jax.device_get((health.bad_step, health.bad_code)))
    if bad_step < 0:
        return
    kept = (
        f"the newest checkpoint, {newest_checkpoint}, was saved before it"
        if newest_checkpoint
        else "no checkpoint was saved before it"
    )
    raise NonFiniteError(
        f"non-finite {NONFINITE_QUANTITIES[code - 1]} at step {bad_step}; stopped without "
        f"saving it ({kept}): lower lr_max, or rerun with --config.skip_nonfinite=True to "
        "skip such batches"
    )
