"""Orbax checkpoints of the training state."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
    """Where a run keeps its checkpoints: ``WORKDIR/checkpoints`` (absolute)."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def save_checkpoint(workdir: str, state: Any, step: int, max_to_keep: int = 3) -> str:
    """Saves ``state`` (a pytree of arrays) as checkpoint ``step`` and waits for the write.

    Returns:
      The checkpoint's directory.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    with ocp.CheckpointManager(checkpoint_dir(workdir), options=options) as manager:
        manager.save(step, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    return os.path.join(checkpoint_dir(workdir), str(step))


def restore_checkpoint(workdir: str, template: Any, step: int | None = None) -> Any:
    """Restores checkpoint ``step`` (default: the latest) shaped like ``template``.

    Raises:
      FileNotFoundError: if ``workdir`` holds no checkpoint.
    """
    with ocp.CheckpointManager(checkpoint_dir(workdir)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
