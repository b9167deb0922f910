"""The epoch loop: train, evaluate every ``eval_every`` epochs, checkpoint, resume.

Data flows one way::

    Dataset (host, uint8) -> DeviceData (device) -> the compiled step (apart_jax.step)
      -> TrainState -> clean and PGD-20 accuracy (apart_jax.evaluation)
      -> metrics.jsonl, TensorBoard, checkpoints (apart_jax.checkpoint)

:func:`train_and_evaluate` builds the run (:func:`apart_jax.run.setup_run`), resumes from
the newest readable checkpoint and runs :func:`apart_jax.epoch.train_epoch` per epoch.
What happens between steps and after an epoch (the progress bar, the health check, a
checkpoint when one is due, the evaluation row, the collapse check, a stop on SIGTERM) are
:func:`after_step` and :func:`end_epoch` below, which call the actions of
:mod:`apart_jax.loop` on the run's one :class:`apart_jax.loop.Loop`.

Catastrophic overfitting (:mod:`apart_jax.collapse`) is checked after every evaluation:
the first time a collapse is detected the run prints one line (:meth:`Collapse.line`),
adds the ``collapse_*`` fields to that epoch's metrics row and, as ``on_collapse`` says,
trains on, stops there, or reverts to the best epoch's checkpoint and stops
(:func:`apart_jax.loop.end_at_collapse`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from apart_jax.checkpoint import RunCheckpoints
from apart_jax.collapse import Collapse
from apart_jax.config import CONFIG_FILE
from apart_jax.data import Dataset
from apart_jax.epoch import compile_epoch_steps, train_epoch
from apart_jax.evaluation import Evaluation, run_evaluation
from apart_jax.health import StepHealth, check_health, healthy
from apart_jax.logbook import MetricsLog
from apart_jax.loop import (
    Loop,
    checkpoint_due,
    end_at_collapse,
    new_collapse,
    report,
    save_checkpoint,
    stop_if_requested,
)
from apart_jax.methods import Method
from apart_jax.parallel import replicated
from apart_jax.progress import progress_bar
from apart_jax.restore import restore_resume_point
from apart_jax.run import Run, setup_run
from apart_jax.runguard import PeerWatch, StopRequest, workdir_lock
from apart_jax.state import EpochTotals, TrainState, zero_totals
from apart_jax.step import device_order

PyTree = Any


@dataclasses.dataclass
class RunResult:
    """What a finished run reports: the evaluation row of its final state and where its
    outputs went.

    ``last`` is the last metrics row, or for a run reverted at a collapse the row of the
    epoch it reverted to (its final checkpoint's); empty on processes other than the lead.
    ``resumed_from`` is the checkpoint step the run continued from (None: a fresh start).
    ``collapse``: the catastrophic overfitting detected during the run (None if none), with
    the action taken; :attr:`collapsed_epoch` and :attr:`collapse_action` read it.
    """

    method: str
    label: str
    passes_per_step: int
    last: dict[str, Any]
    metrics_path: str
    checkpoint_path: str | None
    compile_seconds: float
    resumed_from: int | None = None
    collapse: Collapse | None = None

    @property
    def collapsed_epoch(self) -> int | None:
        """The epoch of the collapse, None if the run did not collapse."""
        return None if self.collapse is None else self.collapse.epoch

    @property
    def collapse_action(self) -> str | None:
        """The action: "continue", "stop" or "revert" (the run's ``on_collapse``, or
        "stop" where a revert found no checkpoint of the best epoch); None if no collapse."""
        return None if self.collapse is None else self.collapse.action


def after_step(
    loop: Loop,
    bar: tqdm,
    epoch: int,
    clock_origin: float,
    i: int,
    state: TrainState,
    totals: EpochTotals,
    health: StepHealth,
) -> None:
    """After step ``i`` of ``epoch``: the progress bar and, every ``log_every`` steps, the
    health check and the running means; whether to stop; mid-epoch, a checkpoint when one is
    due or the run stops, and the stop (at an epoch's end :func:`end_epoch` does both)."""
    config, steps_per_epoch = loop.run.config, loop.run.steps_per_epoch
    bar.update(1)
    if (i + 1) % config.log_every == 0 or i + 1 == steps_per_epoch:
        check_health(health, config.skip_nonfinite, loop.checkpoint_path)
        seen = loop.starts[i + 1]
        bar.set_postfix(
            loss=f"{float(totals.loss_sum) / seen:.3f}",
            acc=f"{float(totals.correct_sum) / seen:.3f}",
            refresh=False,
        )
    step = (epoch - 1) * steps_per_epoch + i + 1
    loop.stopping = loop.stop.reached(step)
    if i + 1 == steps_per_epoch:
        return
    if checkpoint_due(loop, step) or loop.stopping:
        save_checkpoint(loop, step, state, totals, health, time.perf_counter() - clock_origin)
    stop_if_requested(loop, step)


def evaluation_row(
    loop: Loop,
    epoch: int,
    state: TrainState,
    totals: EpochTotals,
    health: StepHealth,
    accuracies: dict[str, float],
    train_seconds: float,
    eval_seconds: float,
) -> dict[str, Any]:
    """The metrics.jsonl row of ``epoch``: training means, accuracies, timings, psi."""
    run = loop.run
    examples = int(loop.starts[-1])
    row = {
        "epoch": epoch,
        "step": epoch * run.steps_per_epoch,
        "method": run.method.name,
        "train_loss": float(totals.loss_sum) / examples,
        "train_acc": float(totals.correct_sum) / examples,
        **accuracies,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "eval_examples": len(run.dataset.y_test),
    }
    if run.method.learns_psi:
        row["psi"] = host_psi(run.method, state.psi)
    if run.config.skip_nonfinite:
        row["skipped_steps"] = int(health.skipped)
    return row


def end_epoch(
    loop: Loop,
    log: MetricsLog,
    evaluation: Evaluation,
    bar: tqdm,
    epoch: int,
    state: TrainState,
    totals: EpochTotals,
    health: StepHealth,
    train_seconds: float,
) -> bool:
    """After ``epoch``: its evaluation row (every ``eval_every`` epochs and after the last)
    and collapse check, a checkpoint when one is due (every epoch when ``checkpoint_every``
    is 0, and with ``on_collapse="revert"`` at every new best epoch), the stop.

    Returns whether the run ends here because of a collapse
    (:func:`apart_jax.loop.end_at_collapse`).
    """
    config, step = loop.run.config, epoch * loop.run.steps_per_epoch
    collapse = None
    if epoch % config.eval_every == 0 or epoch == config.epochs:
        eval_start = time.perf_counter()
        accuracies = evaluation(state)
        eval_seconds = time.perf_counter() - eval_start
        loop.evaluations.append((epoch, accuracies["clean_acc"], accuracies["pgd20_acc"]))
        collapse = new_collapse(loop, epoch)
        row = evaluation_row(
            loop, epoch, state, totals, health, accuracies, train_seconds, eval_seconds
        )
        if collapse is not None:
            row.update(collapse.row_fields())
        log.write(row)
        bar.set_postfix(
            clean=f"{row['clean_acc']:.3f}", pgd20=f"{row['pgd20_acc']:.3f}", refresh=False
        )
    if collapse is not None and collapse.ended_run:
        end_at_collapse(loop, collapse, step, state, totals, health, train_seconds)
    if collapse is not None:
        report(loop, collapse.line())
        if collapse.ended_run:
            return True
    keep_best = (
        config.on_collapse == "revert" and bool(loop.evaluations) and loop.best_epoch() == epoch
    )
    if keep_best:  # the epoch a collapse would revert to: save it and keep it
        loop.checkpoints.keep_step(step)
    if config.checkpoint_every == 0 or checkpoint_due(loop, step) or loop.stopping or keep_best:
        save_checkpoint(loop, step, state, totals, health, train_seconds)
    stop_if_requested(loop, step)
    return False


def host_psi(method: Method, psi: PyTree) -> dict[str, Any]:
    """``method``'s summary of psi as JSON-ready numbers and lists."""
    summary = jax.device_get(method.psi_summary(psi))
    return {k: np.asarray(v).tolist() for k, v in summary.items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, dataset: Dataset | None = None
) -> RunResult:
    """Trains one method as configured, evaluating every ``eval_every`` epochs.

    Writes ``WORKDIR/config.json``, ``WORKDIR/metrics.jsonl`` (one JSON object per
    evaluation), TensorBoard events and, if ``config.checkpoint``, Orbax checkpoints every
    ``checkpoint_every`` steps (0: every epoch) and at the end. If ``WORKDIR`` already
    holds a checkpoint of the same configuration, the run resumes from the newest one and
    ends with the same weights and metrics as an uninterrupted run (timings aside).

    Args:
      config: see :func:`apart_jax.config.default_config`.
      workdir: output directory (created).
      dataset: use this dataset instead of loading ``config.dataset``.

    After every evaluation the run checks for catastrophic overfitting
    (:mod:`apart_jax.collapse`, ``collapse_ratio``, ``collapse_min_best``); at the first
    collapse it prints one line, records it in that epoch's metrics row and, by
    ``on_collapse``, trains on ("continue"), ends with that epoch's checkpoint ("stop") or
    ends with the best epoch's checkpoint as the newest one ("revert",
    :func:`apart_jax.loop.end_at_collapse`). Such a run is finished: running it again
    trains no further. ``RunResult.collapse`` reports it.

    SIGTERM or SIGINT (preemption, Ctrl-C) ends the current step, writes a checkpoint and
    raises :class:`apart_jax.runguard.TrainingInterrupted`; rerunning resumes from it. With
    several processes, a signal to any of them stops all after one agreed step, and a
    process that dies ends the others within ``config.peer_timeout`` seconds
    (:class:`apart_jax.runguard.PeerWatch`: one line on stderr, exit status 1).

    Raises:
      ConfigError, DatasetError: invalid configuration or data, a workdir holding a
        different run, or a workdir in use by another run, before training starts.
      TrainingInterrupted: on SIGTERM or SIGINT, after the checkpoint is written.
      CheckpointRestoreError: the newest checkpoint could not be restored although its files
        look intact (nothing is moved; the run does not start over).
      apart_jax.health.NonFiniteError: a non-finite step (unless ``skip_nonfinite``).
    """
    run = setup_run(config, dataset)
    with contextlib.ExitStack() as stack:
        # First in, last out: the other processes learn how this one left (even refused).
        stack.enter_context(PeerWatch(run.config.peer_timeout))
        if jax.process_index() == 0:
            stack.enter_context(workdir_lock(workdir))
        stop = stack.enter_context(StopRequest())
        checkpoints = None
        if run.config.checkpoint:
            checkpoints = RunCheckpoints(workdir, max_to_keep=run.config.checkpoint_keep)
            stack.enter_context(checkpoints)
        return train_run(run, workdir, stop, checkpoints)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the run's full config to ``WORKDIR/config.json``."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def train_run(
    run: Run, workdir: str, stop: StopRequest, checkpoints: RunCheckpoints | None
) -> RunResult:
    """The body of :func:`train_and_evaluate` once the run is built and the workdir locked."""
    config, method, mesh = run.config, run.method, run.mesh
    lead = jax.process_index() == 0
    resume_step, meta, state, totals = restore_resume_point(checkpoints, run)
    health = healthy(replicated(mesh))
    train_seconds = meta.get("train_seconds", 0.0)
    evaluation = run_evaluation(run)
    if lead:
        write_config(config, workdir)

    compile_start = time.perf_counter()
    compiled = compile_epoch_steps(run, state)
    compile_seconds = time.perf_counter() - compile_start

    loop = Loop(
        run=run,
        stop=stop,
        checkpoints=checkpoints,
        resume_step=resume_step,
        checkpoint_path=None if resume_step is None else checkpoints.path(resume_step),
        starts=np.cumsum([0, *run.batch_sizes]),
        evaluations=[(int(e), float(c), float(p)) for e, c, p in meta.get("evaluations", [])],
        # A checkpoint written before collapse_min_best existed ended at a collapse found
        # with no floor.
        ended=Collapse(**{"min_best": 0.0, **meta["collapse"]}) if meta.get("collapse") else None,
    )
    steps_per_epoch, num_train = run.steps_per_epoch, len(run.dataset.y_train)
    step = resume_step or 0
    if config.on_collapse == "revert" and loop.evaluations:
        checkpoints.keep_step(loop.best_epoch() * steps_per_epoch)
    # A run that ended at a collapse is finished: keep its rows up to the collapse epoch
    # (a reverted run's newest checkpoint is older) and train no further.
    log_step = resume_step if loop.ended is None else loop.ended.epoch * steps_per_epoch
    epochs = range(step // steps_per_epoch + 1, config.epochs + 1) if loop.ended is None else []
    log = MetricsLog(workdir, resume_step=log_step, tensorboard=config.tensorboard, enabled=lead)
    with log:
        for epoch in epochs:
            first = step - (epoch - 1) * steps_per_epoch
            if first == 0:
                totals = zero_totals(mesh)
            epoch_start = time.perf_counter()
            order = device_order(config.seed, epoch, num_train, mesh)
            bar = progress_bar(
                enabled=config.progress and lead,
                total=steps_per_epoch,
                initial=first,
                desc=f"{method.label} {epoch}/{config.epochs}",
                unit="step",
            )
            with bar:
                after_each_step = functools.partial(
                    after_step, loop, bar, epoch, epoch_start - train_seconds
                )
                state, totals, health = train_epoch(
                    compiled,
                    state,
                    totals,
                    run.data,
                    order,
                    run.batch_sizes,
                    first,
                    after_each_step,
                    health,
                )
                check_health(health, config.skip_nonfinite, loop.checkpoint_path)
                step = epoch * steps_per_epoch
                jax.block_until_ready(state)
                train_seconds += time.perf_counter() - epoch_start
                if end_epoch(
                    loop, log, evaluation, bar, epoch, state, totals, health, train_seconds
                ):
                    break
    if checkpoints is not None:
        checkpoints.wait()
    collapse = loop.ended
    if collapse is None and config.on_collapse == "continue":
        collapse = loop.collapse("continue")
    last = log.rows[-1] if log.rows else {}
    if collapse is not None and collapse.action == "revert":
        last = next((r for r in log.rows if r["epoch"] == collapse.best_epoch), {})
    return RunResult(
        method=method.name,
        label=method.label,
        passes_per_step=method.passes_per_step,
        last=last,
        metrics_path=log.path,
        checkpoint_path=loop.checkpoint_path,
        compile_seconds=compile_seconds,
        resumed_from=resume_step,
        collapse=collapse,
    )
