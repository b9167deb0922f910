"""Orbax checkpoints of a training run: periodic saves, keep-last-K, restore the latest.

A checkpoint ``WORKDIR/checkpoints/STEP`` holds three items:

* ``state``: the whole :class:`apart_jax.state.TrainState` (weights, BN statistics, psi,
  both optimizer states, Omega, the RNG key and the step counter);
* ``totals``: the running sums of the current epoch's training loss and accuracy, so a
  run resumed mid-epoch reports the same epoch means;
* ``meta``: JSON with the run's config (to refuse resuming a different run) and the
  training seconds so far.

The data order needs nothing more: epoch ``e``'s permutation is a function of the seed
and ``e`` (:func:`apart_jax.train.epoch_order`), and the step counter says where in it the
run stopped. Orbax writes each checkpoint to a temporary directory and renames it when
complete, so an interrupted save never hides the previous checkpoint; the temporary
directories such a save leaves behind are removed when the run's checkpoints are next
opened. With several processes every process calls :meth:`RunCheckpoints.save`; Orbax
writes collectively.

A save that fails (a full disk, a lost bucket) raises :class:`CheckpointSaveError` naming
the step, at the save itself or, for an asynchronous save, at the next save or wait. A
checkpoint that cannot be restored is moved aside (:meth:`RunCheckpoints.set_aside`) into
``WORKDIR/checkpoints.unreadable``, never deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

PyTree = Any


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the message names its step and the newest intact one."""


def checkpoint_dir(workdir: str) -> str:
    """Where a run keeps its checkpoints: ``WORKDIR/checkpoints`` (absolute)."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def abstract_like(tree: PyTree) -> PyTree:
    """Shape, dtype and sharding of every array of ``tree`` (a restore target)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
    """The checkpoints of one run directory; use as a context manager.

    Args:
      workdir: the run's directory; checkpoints go to ``WORKDIR/checkpoints``.
      max_to_keep: how many of the newest checkpoints survive (older ones are deleted).
      async_save: return from :meth:`save` once the arrays are copied to host memory and
        write in the background (training continues meanwhile).
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = checkpoint_dir(workdir)
        self.unreadable_directory = self.directory + ".unreadable"
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._saved: list[int] = []  # steps saved by this object, the last one maybe pending
        self._closed = False

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: finish what can be finished, but keep the first error
            self.close()
        except Exception as error:
            logging.warning("closing the checkpoints of %s failed too: %s", self.directory, error)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """The steps of every complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: PyTree, totals: PyTree, meta: dict[str, Any]) -> str:
        """Saves checkpoint ``step`` (in the background when asynchronous); returns its path.

        Raises:
          CheckpointSaveError: if this save, or the pending previous one, failed.
        """
        self._saved.append(step)
        with self._failures():
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    totals=ocp.args.StandardSave(totals),
                    meta=ocp.args.JsonSave(meta),
                ),
            )
        return self.path(step)

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """Turns any failure of a save into :class:`CheckpointSaveError` naming the steps."""
        try:
            yield
        except Exception as error:
            self._manager.reload()
            intact = self._manager.latest_step()
            failed = [s for s in self._saved if s != intact and (intact is None or s > intact)]
            where = f"{self.path(intact)} is intact" if intact is not None else "none is saved"
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise CheckpointSaveError(
                f"could not write checkpoint {failed[0] if failed else '?'} in {self.directory} "
                f"({type(error).__name__}: {reason}); the newest complete checkpoint: {where}"
            ) from error

    def set_aside(self, step: int) -> str:
        """Moves checkpoint ``step`` into ``checkpoints.unreadable/`` (never deletes it).

        Returns its new path. With several processes, process 0 moves it and all wait.
        """
        target = os.path.join(self.unreadable_directory, str(step))
        if os.path.exists(target):
            target += f".{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            os.makedirs(self.unreadable_directory, exist_ok=True)
            shutil.move(self.path(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self._manager.reload()
        return target

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON ``meta`` item of checkpoint ``step``."""
        return self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta

    def saved_shapes(self, step: int) -> PyTree:
        """The stored ``state`` item's tree of array metadata (shapes and dtypes)."""
        return self._manager.item_metadata(step)["state"]

    def restore(self, step: int, **targets: PyTree) -> dict[str, PyTree]:
        """Restores the named items (``state``, ``totals``) of checkpoint ``step``.

        Each target (a tree of arrays or ``jax.ShapeDtypeStruct``) gives the shapes, dtypes
        and shardings to restore onto; items not named are not read.
        """
        args = {name: ocp.args.StandardRestore(abstract_like(t)) for name, t in targets.items()}
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return {name: restored[name] for name in targets}

    def wait(self) -> None:
        """Blocks until every pending save is on disk.

        Raises:
          CheckpointSaveError: if a pending save failed.
        """
        with self._failures():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (again: no-op)."""
        if not self._closed:
            self._closed = True
            self._manager.close()
