"""What a training run directory amounts to: its best and final epochs, its collapse, and
the attack reports of both (the rows of experiments.summarize's table and of the fast-at
study's report).

The best epoch is the one of highest PGD-20 accuracy; ties go to the higher clean accuracy,
then to the later epoch. A run collapsed at :func:`apart_jax.collapse.collapse_epoch` of its
PGD-20 accuracies, at the defaults whatever the run's own ``collapse_ratio`` and
``collapse_min_best``, so that every table uses one definition.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from apart_jax.collapse import DEFAULT_MIN_BEST, DEFAULT_RATIO, collapse_epoch
from experiments.runs import find_attack_report, read_run

ATTACKS = (("cw", "C&W"), ("autoattack", "AA"))  # eval json entry, column name
# The tables' definition of collapse, whatever a run's collapse_ratio and collapse_min_best.
COLLAPSE_RATIO, COLLAPSE_MIN_BEST = DEFAULT_RATIO, DEFAULT_MIN_BEST


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row of highest PGD-20 accuracy; ties: higher clean accuracy, then later epoch."""
    return max(rows, key=lambda r: (r["pgd20_acc"], r["clean_acc"], r["epoch"]))


def _epoch_summary(workdir: str, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "epoch": row["epoch"],
        "step": row["step"],
        "clean_acc": row["clean_acc"],
        "pgd20_acc": row["pgd20_acc"],
        "eval_examples": row.get("eval_examples"),
        "attacks": find_attack_report(workdir, row["step"], [entry for entry, _ in ATTACKS]),
    }


def load_run_summary(workdir: str) -> dict[str, Any]:
    """What the table shows of one run directory (written by experiments.train).

    Returns:
      ``{"workdir", "label", "method", "method_label", "eps", "eval_eps",
      "eval_pgd_steps", "eval_pgd_step_size", "passes_per_step", "epochs",
      "epochs_planned", "collapsed_epoch", "collapse_action", "ended_by",
      "train_seconds", "best", "last"}``; ``best`` and ``last`` are
      ``{"epoch", "step", "clean_acc", "pgd20_acc", "eval_examples", "attacks"}`` with
      ``attacks`` as :func:`experiments.runs.read_attack_report` returns for C&W and
      AutoAttack, or None when not evaluated. ``label`` is the directory's basename.
      ``collapsed_epoch``: :func:`apart_jax.collapse.collapse_epoch` of the rows' PGD-20
      accuracies at its default ratio and floor (None: none); ``collapse_action``: the
      trainer's record of the collapse it detected (its ``collapse_action`` field:
      "continue", "stop" or "revert"), None if it recorded none; ``ended_by``: "stopped"
      or "reverted to N" when that ended the run, else None. ``last`` is the final state's
      epoch: the last row, or for a reverted run the epoch it reverted to.

    Raises:
      ConfigError: :func:`experiments.runs.read_run` or an eval json refuses the directory.
    """
    config, method, rows = read_run(workdir)
    last = final = rows[-1]
    recorded = next((r for r in rows if "collapse_action" in r), {})
    action = recorded.get("collapse_action")
    ended_by = None
    if action == "stop":
        ended_by = "stopped"
    elif action == "revert":
        reverted_to = recorded["collapse_best_epoch"]
        ended_by = f"reverted to {reverted_to}"
        final = next((r for r in rows if r["epoch"] == reverted_to), last)
    return {
        "workdir": workdir,
        "label": os.path.basename(os.path.abspath(workdir)),
        "method": config["method"],
        "method_label": method.label,
        "eps": config.get("eps"),
        "eval_eps": config.get("eval_eps"),
        "eval_pgd_steps": config.get("eval_pgd_steps"),
        "eval_pgd_step_size": config.get("eval_pgd_step_size"),
        "passes_per_step": method.passes_per_step,
        "epochs": last["epoch"],
        "epochs_planned": config.get("epochs"),
        "collapsed_epoch": collapse_epoch(
            [(r["epoch"], r["pgd20_acc"]) for r in rows], COLLAPSE_RATIO, COLLAPSE_MIN_BEST
        ),
        "collapse_action": action,
        "ended_by": ended_by,
        "train_seconds": last.get("train_seconds"),
        "best": _epoch_summary(workdir, best_row(rows)),
        "last": _epoch_summary(workdir, final),
    }
