"""What a run reads back from its checkpoints: the resume point, a state by step, the parts
a trained model needs.

:func:`restore_resume_point` restores the newest checkpoint that restores. A checkpoint
that is demonstrably unreadable (:func:`apart_jax.checkpoint.damage_reason`) is moved aside
with a warning and the next newest is tried; any other failure raises
:class:`apart_jax.checkpoint.CheckpointRestoreError` and moves nothing. Omega's rows are
re-padded when the checkpoint was written on another number of devices.
:func:`restore_inference` reads only the weights, BN statistics and psi (and Omega).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from absl import logging

from apart_jax.checkpoint import (
    CheckpointRestoreError,
    PyTree,
    RunCheckpoints,
    checkpoint_dir,
    damage_reason,
    first_line,
)
from apart_jax.config import ConfigError, resume_conflicts
from apart_jax.parallel import batch_sharded, replicated
from apart_jax.state import EpochTotals, TrainState, zero_totals

if TYPE_CHECKING:
    from apart_jax.run import Run


@contextlib.contextmanager
def open_checkpoints(workdir: str) -> Iterator[RunCheckpoints]:
    """The checkpoints of an existing run, for reading.

    Raises:
      FileNotFoundError: if ``workdir`` has no checkpoint directory.
    """
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
    with RunCheckpoints(workdir) as checkpoints:
        yield checkpoints


def saved_step(checkpoints: RunCheckpoints, step: int | None) -> int:
    """``step`` if it is saved, or the newest saved step if ``step`` is None.

    Raises:
      FileNotFoundError: if nothing is saved, or not ``step`` (the message lists the steps).
    """
    steps = checkpoints.steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise FileNotFoundError(
            f"no checkpoint at step {step} in {checkpoints.directory} (it holds {steps})"
        )
    return step


def restore_run_state(
    checkpoints: RunCheckpoints, step: int, run: Run, meta: dict[str, Any]
) -> tuple[TrainState, EpochTotals]:
    """Restores checkpoint ``step`` onto ``run``'s state shardings.

    Omega's rows are padded to a multiple of the device count; a checkpoint written on a
    different number of devices is restored with its own padding and re-padded here.
    """
    template, totals = run.state, zero_totals(run.mesh)
    saved_rows = meta["omega_rows"]
    if template.omega is None or saved_rows == template.omega.shape[0]:
        restored = checkpoints.restore(step, state=template, totals=totals)
        return restored["state"], restored["totals"]
    mesh, num_train = run.mesh, meta["num_train"]
    sharding = batch_sharded(mesh) if saved_rows % mesh.size == 0 else replicated(mesh)
    omega = jax.ShapeDtypeStruct(
        (saved_rows, *template.omega.shape[1:]), template.omega.dtype, sharding=sharding
    )
    restored = checkpoints.restore(step, state=template.replace(omega=omega), totals=totals)
    state = restored["state"]
    rows = template.omega.shape[0] - num_train
    omega = jax.jit(
        lambda omega: repad_rows(omega, num_train, rows), out_shardings=batch_sharded(mesh)
    )(state.omega)
    return state.replace(omega=omega), restored["totals"]


def repad_rows(omega: jax.Array, num_train: int, padding: int) -> jax.Array:
    """Omega's first ``num_train`` rows followed by ``padding`` rows of zeros."""
    return jnp.pad(omega[:num_train], [(0, padding)] + [(0, 0)] * (omega.ndim - 1))


def restore_checkpoint(workdir: str, run: Run, step: int | None = None) -> TrainState:
    """The training state of ``workdir``'s checkpoint ``step`` (default: the newest).

    The state is placed on ``run``'s devices.

    Raises:
      FileNotFoundError: if ``workdir`` holds no checkpoint, or none at ``step`` (the
        message lists the steps it holds).
    """
    with open_checkpoints(workdir) as checkpoints:
        step = saved_step(checkpoints, step)
        state, _ = restore_run_state(checkpoints, step, run, checkpoints.read_meta(step))
    return state


INFERENCE_FIELDS = ("params", "batch_stats", "psi")


def restore_inference(checkpoints: RunCheckpoints, step: int, *, omega: bool) -> dict[str, PyTree]:
    """The weights, BN statistics and psi of checkpoint ``step`` (and Omega if ``omega`` and
    the state holds one), each a tree of arrays on the default device keyed by its
    :class:`TrainState` field. Nothing else of the state is read from disk."""
    saved = checkpoints.saved_shapes(step)
    fields = INFERENCE_FIELDS + (("omega",) if omega and saved.get("omega") is not None else ())
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = {
        name: jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved[name]
        )
        for name in fields
    }
    return checkpoints.restore_fields(step, targets)


def restore_resume_point(
    checkpoints: RunCheckpoints | None, run: Run
) -> tuple[int | None, dict[str, Any], TrainState, EpochTotals]:
    """The newest checkpoint of the workdir that restores: ``(step, meta, state, totals)``.

    A checkpoint that is demonstrably unreadable (:func:`damage_reason`) is moved to
    ``checkpoints.unreadable/`` with a warning and the next newest is tried; with none
    left the run starts afresh: ``(None, {}, run.state, zero totals)``.

    Raises:
      ConfigError: if a readable checkpoint belongs to a run with a different configuration.
      CheckpointRestoreError: if restoring failed for any other reason; nothing is moved.
    """
    for step in reversed([] if checkpoints is None else checkpoints.steps()):
        try:
            meta = checkpoints.read_meta(step)
            conflicts = resume_conflicts(meta["config"], run.config)
            if not conflicts:
                state, totals = restore_run_state(checkpoints, step, run, meta)
        except Exception as error:
            reason = damage_reason(error)
            if reason is None:
                raise CheckpointRestoreError(
                    f"could not restore {checkpoints.path(step)} ({type(error).__name__}: "
                    f"{first_line(error)}); its files look intact, so nothing was moved: fix "
                    "the cause and run the same command again"
                ) from error
            _set_aside(checkpoints, step, reason)
            continue
        if conflicts:
            raise ConfigError(
                f"{checkpoints.path(step)} was written by a different run "
                f"({'; '.join(conflicts)}): use another --workdir, or delete its checkpoints "
                "to start over"
            )
        return step, meta, state, totals
    return None, {}, run.state, zero_totals(run.mesh)


def _set_aside(checkpoints: RunCheckpoints, step: int, reason: str) -> None:
    path = checkpoints.path(step)
    moved = checkpoints.set_aside(step)
    logging.warning(
        "checkpoint %s is unreadable (%s); moved to %s, trying the next newest",
        path,
        reason,
        moved,
    )
