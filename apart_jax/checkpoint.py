"""Orbax checkpoints of a training run: periodic saves, keep-last-K, restore and resume.

A checkpoint ``WORKDIR/checkpoints/STEP`` holds three items:

* ``state``: the whole :class:`apart_jax.state.TrainState` (weights, BN statistics, psi,
  both optimizer states, Omega, the RNG key and the step counter);
* ``totals``: the running sums of the current epoch's training loss and accuracy, so a
  run resumed mid-epoch reports the same epoch means;
* ``meta``: JSON with the run's config (to refuse resuming a different run), the training
  examples and Omega's stored rows (to re-pad Omega for another device count), the
  training seconds so far, the accuracies of the epochs evaluated so far and, in the final
  checkpoint of a run that ended at a collapse, that collapse (:func:`checkpoint_meta`), and
  a digest of every saved array (:mod:`apart_jax.integrity`), verified by every restore.

The data order needs nothing more: epoch ``e``'s permutation is a function of the seed
and ``e`` (:func:`apart_jax.step.epoch_order`), and the step counter says where in it the
run stopped. Orbax writes each checkpoint to a temporary directory and renames it when
complete, so an interrupted save never hides the previous checkpoint; the temporary
directories such a save leaves behind are removed when the run's checkpoints are next
opened. With several processes every process calls :meth:`RunCheckpoints.save`; Orbax
writes collectively. The newest ``checkpoint_keep`` checkpoints are kept, and one more that
the trainer names (:meth:`RunCheckpoints.keep_step`: the best epoch's, for
``on_collapse="revert"``).

A save that fails (a full disk, a lost bucket) raises :class:`CheckpointSaveError` naming
the step, at the save itself or, for an asynchronous save, at the next save or wait. A
checkpoint that is demonstrably unreadable (:func:`damage_reason`: missing or truncated
files, bad metadata, a digest that does not match) is moved aside
(:meth:`RunCheckpoints.set_aside`) into ``WORKDIR/checkpoints.unreadable``, never deleted;
:func:`apart_jax.restore.restore_resume_point` then tries the next newest. Any other
failure to restore (a bug, ``MemoryError``, a transient I/O error) raises
:class:`CheckpointRestoreError` and moves nothing. What a run reads back (the resume point,
a state by step, a trained model's parts) is :mod:`apart_jax.restore`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from apart_jax.config import config_as_json
from apart_jax.integrity import digest_mismatches, tree_digests

if TYPE_CHECKING:
    from apart_jax.run import Run

PyTree = Any


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the message names its step and the newest intact one."""


class UnreadableCheckpoint(Exception):
    """A checkpoint's files are damaged: its digests do not match, or its metadata is bad."""


class CheckpointRestoreError(RuntimeError):
    """Restoring a checkpoint failed for a reason other than damage to its files (a bug,
    ``MemoryError``, a transient I/O error); nothing was moved. The message names the
    checkpoint and the error."""


# Statuses TensorStore reports when a checkpoint's bytes are missing, cut short or do not
# decode; others (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ...) may pass.
DAMAGE_STATUSES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")


def first_line(error: BaseException) -> str:
    """``error``'s message up to its first line break, at most 200 characters."""
    return (str(error).strip().splitlines() or [""])[0][:200]


def damage_reason(error: BaseException) -> str | None:
    """Why ``error`` (raised while restoring) shows the checkpoint itself is unreadable, or
    None when it does not (then the checkpoint may be fine and must not be moved).

    Damage is: a digest or metadata check that failed (:class:`UnreadableCheckpoint`), a
    missing file or item, a JSON file that does not parse, or a TensorStore read that
    reports one of :data:`DAMAGE_STATUSES`; the error's causes are searched too.
    """
    seen = error
    while seen is not None:
        message = first_line(seen)
        if isinstance(seen, UnreadableCheckpoint):
            return message
        if isinstance(seen, json.JSONDecodeError):
            return f"metadata is not JSON ({message})"
        if isinstance(seen, FileNotFoundError):
            return f"a file is missing ({message})"
        if isinstance(seen, KeyError) and "not found in the checkpoint" in message:
            return f"an item is missing ({message})"
        if isinstance(seen, ValueError) and message.startswith(DAMAGE_STATUSES):
            return message
        seen = seen.__cause__ or seen.__context__
    return None


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
      max_to_keep: how many of the newest checkpoints survive (older ones are deleted
        after each save), besides the one :meth:`keep_step` names.
      async_save: return from :meth:`save` once the arrays are copied to host memory and
        write in the background (training continues meanwhile).
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self._kept = _KeptSteps(set())
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                [ocp.checkpoint_managers.LatestN(max_to_keep), self._kept]
            ),
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = checkpoint_dir(workdir)
        self.unreadable_directory = self.directory + ".unreadable"
        self.reverted_directory = self.directory + ".reverted"
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

    def keep_step(self, step: int | None) -> None:
        """Keeps checkpoint ``step`` however many newer ones are saved (``max_to_keep``
        aside), until another step or None is named; the trainer keeps the best epoch's
        checkpoint this way for ``on_collapse="revert"``."""
        # One assignment: a background save's clean-up sees the old set or the new one.
        self._kept.steps = set() if step is None else {step}

    def delete(self, step: int) -> None:
        """Deletes checkpoint ``step`` (with several processes, collectively)."""
        self._manager.delete(step)

    def save(self, step: int, state: PyTree, totals: PyTree, meta: dict[str, Any]) -> str:
        """Saves checkpoint ``step`` (in the background when asynchronous); returns its path.

        ``meta`` is stored with ``digests``: the digest of every array of ``state`` and
        ``totals`` (:func:`apart_jax.integrity.tree_digests`), which restores verify.

        Raises:
          CheckpointSaveError: if this save, or the pending previous one, failed.
        """
        self._saved.append(step)
        meta = {**meta, "digests": {"state": tree_digests(state), "totals": tree_digests(totals)}}
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

    def set_aside(self, step: int, into: str | None = None) -> str:
        """Moves checkpoint ``step`` into ``into`` (default ``checkpoints.unreadable/``),
        never deleting it.

        Returns its new path. With several processes, process 0 moves it and all wait.
        """
        into = into or self.unreadable_directory
        target = os.path.join(into, str(step))
        if os.path.exists(target):
            target += f".{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            os.makedirs(into, exist_ok=True)
            shutil.move(self.path(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self._manager.reload()
        return target

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON ``meta`` item of checkpoint ``step``.

        Raises:
          UnreadableCheckpoint: if it is not a JSON object holding the run's config.
        """
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise UnreadableCheckpoint(f"its metadata holds no run config: {str(meta)[:100]}")
        return meta

    def verify(self, step: int, item: str, tree: PyTree) -> None:
        """Checks the restored ``tree`` of ``item`` against the digests saved with it.

        Checkpoints written before digests were recorded are not checked.

        Raises:
          UnreadableCheckpoint: naming the arrays whose digest differs.
        """
        recorded = self.read_meta(step).get("digests")
        if recorded is None:
            return
        bad = digest_mismatches(tree, recorded.get(item, {}))
        if bad:
            raise UnreadableCheckpoint(
                f"the digest of {len(bad)} array(s) of {item!r} does not match the saved one "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the files are corrupt"
            )

    def saved_shapes(self, step: int) -> dict[str, PyTree]:
        """The stored ``state`` item as a dict of its fields' trees of array metadata
        (``shape``, ``dtype``), read without reading any array."""
        with _state_handler() as handler:
            return handler.metadata(self._state_path(step)).tree

    def restore_fields(self, step: int, targets: dict[str, PyTree]) -> dict[str, PyTree]:
        """Restores only the named fields of checkpoint ``step``'s ``state`` (the others are
        not read); ``targets`` maps each field name to its tree of ``jax.ShapeDtypeStruct``."""
        args = ocp.args.PyTreeRestore(
            item=targets,
            restore_args=ocp.checkpoint_utils.construct_restore_args(targets),
            partial_restore=True,
        )
        with _state_handler() as handler:
            restored = handler.restore(self._state_path(step), args=args)
        self.verify(step, "state", restored)
        return restored

    def _state_path(self, step: int) -> pathlib.Path:
        return pathlib.Path(self.path(step), "state")

    def restore(self, step: int, **targets: PyTree) -> dict[str, PyTree]:
        """Restores the named items (``state``, ``totals``) of checkpoint ``step``.

        Each target (a tree of arrays or ``jax.ShapeDtypeStruct``) gives the shapes, dtypes
        and shardings to restore onto; items not named are not read. Every restored array is
        checked against its saved digest (:meth:`verify`).
        """
        args = {name: ocp.args.StandardRestore(abstract_like(t)) for name, t in targets.items()}
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        for name in targets:
            self.verify(step, name, restored[name])
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


@dataclasses.dataclass
class _KeptSteps:
    """An Orbax preservation policy keeping the checkpoints of ``steps`` (a set its owner
    changes between saves)."""

    steps: set[int]

    def should_preserve(
        self,
        checkpoints: Sequence[ocp.checkpoint_managers.PolicyCheckpointInfo],
        *,
        context: Any,
    ) -> list[bool]:
        return [info.step in self.steps for info in checkpoints]


@contextlib.contextmanager
def _state_handler() -> Iterator[ocp.PyTreeCheckpointHandler]:
    """A handler that reads parts of a checkpoint's ``state`` item (a pytree), then closes."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        yield handler
    finally:
        handler.close()


def checkpoint_meta(
    config: ml_collections.ConfigDict,
    run: Run,
    train_seconds: float,
    evaluations: Sequence[tuple[int, float, float]] = (),
    collapse: dict[str, Any] | None = None,
) -> dict:
    """The JSON stored with every checkpoint: the config and what restoring needs to know.

    ``evaluations``: ``(epoch, clean_acc, pgd20_acc)`` of every epoch evaluated so far,
    which a resumed run's collapse detection continues from (every process reads them, so
    all take the same decisions); ``collapse``: for the final checkpoint of a run that
    ended at a collapse, the :class:`apart_jax.collapse.Collapse` as a dict (its presence
    tells a rerun that the run is finished). Both are left out when empty.
    """
    meta = {
        "config": config_as_json(config),
        "num_train": len(run.dataset.y_train),
        "omega_rows": None if run.state.omega is None else int(run.state.omega.shape[0]),
        "train_seconds": train_seconds,
    }
    if evaluations:
        meta["evaluations"] = [list(e) for e in evaluations]
    if collapse is not None:
        meta["collapse"] = collapse
    return meta
