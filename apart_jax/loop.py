"""The epoch loop's shared state and its actions between steps: a checkpoint when one is due,
the stop on SIGTERM or SIGINT, and the end of a run at a catastrophic-overfitting collapse.

:mod:`apart_jax.trainer` runs the epochs and calls these; each takes the one :class:`Loop`
of the run.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from apart_jax.checkpoint import RunCheckpoints, checkpoint_meta
from apart_jax.collapse import Collapse, best_epoch, detect_collapse
from apart_jax.health import StepHealth, check_health
from apart_jax.restore import restore_run_state
from apart_jax.run import Run
from apart_jax.runguard import StopRequest, TrainingInterrupted
from apart_jax.state import EpochTotals, TrainState


@dataclasses.dataclass
class Loop:
    """What the epoch loop's periodic actions share.

    ``starts[i]`` is the number of examples before step ``i`` of an epoch;
    ``checkpoint_path`` is the newest checkpoint saved or resumed from (None: none yet);
    ``stopping``: the run stops after the current step (:meth:`StopRequest.reached`);
    ``evaluations``: ``(epoch, clean_acc, pgd20_acc)`` of every epoch evaluated so far,
    those before the resume point from its checkpoint (saved with every checkpoint);
    ``ended``: the collapse that ended the run ("stop" or "revert"), None while it trains.
    """

    run: Run
    stop: StopRequest
    checkpoints: RunCheckpoints | None
    resume_step: int | None
    checkpoint_path: str | None
    starts: np.ndarray
    stopping: bool = False
    evaluations: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    ended: Collapse | None = None

    @property
    def total_steps(self) -> int:
        return self.run.config.epochs * self.run.steps_per_epoch

    def collapse(self, action: str) -> Collapse | None:
        """The collapse in :attr:`evaluations` (:func:`apart_jax.collapse.detect_collapse`
        with the run's ``collapse_ratio`` and ``collapse_min_best``), None if none."""
        return detect_collapse(
            [(epoch, pgd) for epoch, _, pgd in self.evaluations],
            self.run.config.collapse_ratio,
            action,
            {epoch: clean for epoch, clean, _ in self.evaluations},
            self.run.config.collapse_min_best,
        )

    def best_epoch(self) -> int | None:
        """The evaluated epoch of highest PGD-20 accuracy so far (ties: higher clean
        accuracy, then the later epoch), None before the first evaluation."""
        return best_epoch(
            [(epoch, pgd) for epoch, _, pgd in self.evaluations],
            {epoch: clean for epoch, clean, _ in self.evaluations},
        )


def checkpoint_due(loop: Loop, step: int) -> bool:
    """Whether a checkpoint is due after ``step`` (the last step, or every ``checkpoint_every``)."""
    every = loop.run.config.checkpoint_every
    return step == loop.total_steps or (every > 0 and step % every == 0)


def save_checkpoint(
    loop: Loop,
    step: int,
    state: TrainState,
    totals: EpochTotals,
    health: StepHealth,
    train_seconds: float,
) -> None:
    """Checks health, then saves checkpoint ``step`` (unless it is the one resumed from),
    with the evaluations so far and, if the run ends at a collapse, the collapse."""
    config = loop.run.config
    check_health(health, config.skip_nonfinite, loop.checkpoint_path)
    if loop.checkpoints is not None and step != loop.resume_step:
        meta = checkpoint_meta(config, loop.run, train_seconds, loop.evaluations, _ended(loop))
        loop.checkpoint_path = loop.checkpoints.save(step, state, totals, meta)


def _ended(loop: Loop) -> dict[str, Any] | None:
    return None if loop.ended is None else dataclasses.asdict(loop.ended)


def stop_if_requested(loop: Loop, step: int) -> None:
    """When the run stops after ``step`` (SIGTERM or SIGINT, agreed by every process): waits
    for the checkpoint and raises :class:`TrainingInterrupted`."""
    if not loop.stopping:
        return
    if loop.checkpoints is not None:
        loop.checkpoints.wait()
    raise TrainingInterrupted(loop.stop.signum or signal.SIGTERM, step, loop.checkpoint_path)


def report(loop: Loop, line: str) -> None:
    """Prints ``line`` to stderr on the lead process (above the progress bar, if any)."""
    if jax.process_index() == 0:
        tqdm.write(line, file=sys.stderr)


def new_collapse(loop: Loop, epoch: int) -> Collapse | None:
    """The collapse detected at ``epoch``, just evaluated (None if there is none, or if it
    was detected at an earlier epoch), with the action the run takes: its
    ``on_collapse``, or "stop" where a revert finds no checkpoint of the best epoch.

    Every process holds the same evaluations (the accuracies are replicated, the earlier
    ones come from the checkpoint resumed from), so all take the same decision.
    """
    collapse = loop.collapse(loop.run.config.on_collapse)
    if collapse is None or collapse.epoch != epoch:
        return None
    if collapse.action == "revert":
        loop.checkpoints.wait()
        best_step = collapse.best_epoch * loop.run.steps_per_epoch
        if best_step not in loop.checkpoints.steps():
            report(
                loop,
                f"on_collapse='revert': no checkpoint of epoch {collapse.best_epoch} "
                f"({loop.checkpoints.path(best_step)}) to revert to; stopping instead",
            )
            collapse = dataclasses.replace(collapse, action="stop")
    return collapse


def end_at_collapse(
    loop: Loop,
    collapse: Collapse,
    step: int,
    state: TrainState,
    totals: EpochTotals,
    health: StepHealth,
    train_seconds: float,
) -> None:
    """Ends the run at ``collapse`` (its ``action`` "stop" or "revert") with a final
    checkpoint whose metadata records the collapse, so that running the same command
    again finds the run finished instead of training on.

    "stop": the final checkpoint is this epoch's (``step``), saved whatever
    ``checkpoint_every`` says.

    "revert": the best epoch's checkpoint becomes the final one. The trainer saved it when
    that epoch was evaluated and kept it since (:meth:`RunCheckpoints.keep_step`: it
    survives ``checkpoint_keep``), so no copy of the state is held in memory. It is
    restored (its digests verified), the newer checkpoints are moved into
    ``WORKDIR/checkpoints.reverted/`` (never deleted), and it is saved again under its own
    step with the collapse in its metadata: the newest checkpoint, which reruns,
    ``load_model`` and ``experiments.evaluate`` read, is the best epoch's state. A run
    killed in between resumes from an earlier checkpoint and, being deterministic, meets
    the same collapse again. The collapse epoch's own state is not saved.
    """
    loop.ended = collapse
    checkpoints = loop.checkpoints
    if collapse.action == "stop":
        save_checkpoint(loop, step, state, totals, health, train_seconds)
        if checkpoints is not None:
            checkpoints.wait()
        return
    run = loop.run
    best_step = collapse.best_epoch * run.steps_per_epoch
    checkpoints.wait()
    meta = checkpoints.read_meta(best_step)
    best_state, best_totals = restore_run_state(checkpoints, best_step, run, meta)
    for newer in checkpoints.steps():
        if newer > best_step:
            checkpoints.set_aside(newer, into=checkpoints.reverted_directory)
    checkpoints.delete(best_step)
    meta = checkpoint_meta(run.config, run, meta["train_seconds"], loop.evaluations, _ended(loop))
    loop.checkpoint_path = checkpoints.save(best_step, best_state, best_totals, meta)
    checkpoints.wait()
