"""Catastrophic overfitting ("collapse"): one definition, shared by the trainer and
``experiments.summarize``.

A run *collapses* at the first evaluated epoch whose PGD-20 accuracy is strictly below
``ratio`` (0.5 by default) times the highest PGD-20 accuracy of the evaluated epochs before
it, provided that highest accuracy is at least ``min_best`` (0.1 by default): "PGD-20 below
half its best after the best epoch, from a best at or above chance". The floor is the
robust accuracy of a constant classifier on 10 balanced classes: a run that has not beaten
it has no robustness to lose, and its early PGD-20 accuracies (a few percent) can halve and
recover while it learns. The first evaluated epoch never collapses (nothing comes before
it), an epoch exactly at the threshold does not, and epochs that were not evaluated are not
looked at.

:func:`collapse_epoch` is the definition; :func:`best_epoch` picks the epoch a run reverts
to (``on_collapse="revert"``); :func:`detect_collapse` gathers both into a
:class:`Collapse`, which words the trainer's log line and the fields of the metrics row.
Pure functions of the accuracies: every process of a run, given the same (replicated)
accuracies, reaches the same answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

# What the trainer does when a run collapses (config key ``on_collapse``).
ON_COLLAPSE = ("continue", "stop", "revert")
DEFAULT_RATIO = 0.5
# Chance level on 10 balanced classes (CIFAR-10); 1 / num_classes for other datasets.
DEFAULT_MIN_BEST = 0.1

Accuracies = Iterable[tuple[int, float | None]]  # (epoch, accuracy in [0, 1] or None)


def evaluated(by_epoch: Accuracies) -> list[tuple[int, float]]:
    """The ``(epoch, accuracy)`` pairs of the epochs that were evaluated (accuracy not
    None), sorted by epoch.

    Raises:
      ValueError: an epoch appears twice.
    """
    pairs = sorted((int(epoch), float(acc)) for epoch, acc in by_epoch if acc is not None)
    epochs = [epoch for epoch, _ in pairs]
    if len(set(epochs)) != len(epochs):
        raise ValueError(f"an epoch is given twice: {epochs}")
    return pairs


def _check_threshold(ratio: float, min_best: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio={ratio} must be in (0, 1)")
    if not 0.0 <= min_best < 1.0:
        raise ValueError(f"min_best={min_best} must be in [0, 1)")


def collapse_epoch(
    pgd_by_epoch: Accuracies, ratio: float = DEFAULT_RATIO, min_best: float = DEFAULT_MIN_BEST
) -> int | None:
    """The first evaluated epoch whose PGD-20 accuracy is below ``ratio`` times the highest
    PGD-20 accuracy of the evaluated epochs before it, when that highest accuracy is at
    least ``min_best``; None when no epoch is.

    Args:
      pgd_by_epoch: ``(epoch, PGD-20 accuracy)`` pairs, epochs >= 1 in any order, each at
        most once, accuracies in [0, 1]; an accuracy of None (an epoch not evaluated) is
        skipped.
      ratio: in (0, 1). The comparison is strict: ``acc < ratio * best`` (an accuracy
        exactly at the threshold is not a collapse).
      min_best: in [0, 1); a drop counts only from a best of at least this accuracy
        (inclusive; 0 drops the floor).

    Raises:
      ValueError: ``ratio`` outside (0, 1), ``min_best`` outside [0, 1), or an epoch
        given twice.

    Examples: ``collapse_epoch([(1, 0.2), (2, 0.4), (3, 0.1)])`` is 3 (0.1 < 0.5 x 0.4);
    ``collapse_epoch([(1, 0.08), (2, 0.03)])`` is None (the best, 0.08, is below 0.1).
    """
    _check_threshold(ratio, min_best)
    best = None
    for epoch, acc in evaluated(pgd_by_epoch):
        if best is not None and best >= min_best and acc < ratio * best:
            return epoch
        best = acc if best is None else max(best, acc)
    return None


def best_epoch(
    pgd_by_epoch: Accuracies,
    clean_by_epoch: Mapping[int, float] | None = None,
    *,
    before: int | None = None,
) -> int | None:
    """The evaluated epoch of highest PGD-20 accuracy; None when none was evaluated.

    Ties go to the higher clean accuracy (when ``clean_by_epoch`` gives it), then to the
    later epoch: the order ``experiments.summarize`` picks its best epoch in.

    Args:
      pgd_by_epoch: as for :func:`collapse_epoch`.
      clean_by_epoch: ``{epoch: clean accuracy}``; epochs missing from it count as 0.
      before: only epochs strictly before this one (None: all).
    """
    clean = clean_by_epoch or {}
    candidates = [
        (acc, clean.get(epoch, 0.0), epoch)
        for epoch, acc in evaluated(pgd_by_epoch)
        if before is None or epoch < before
    ]
    return max(candidates)[2] if candidates else None


@dataclasses.dataclass(frozen=True)
class Collapse:
    """A detected collapse: at ``epoch`` PGD-20 accuracy ``pgd20_acc`` fell below ``ratio``
    times ``best_pgd20_acc`` (at least ``min_best``), reached at ``best_epoch`` (the best
    epoch before it, see :func:`best_epoch`); ``action`` is what the run did (one of
    :data:`ON_COLLAPSE`)."""

    epoch: int
    pgd20_acc: float
    best_epoch: int
    best_pgd20_acc: float
    ratio: float
    min_best: float
    action: str

    @property
    def ended_run(self) -> bool:
        """Whether the run ended here ("stop" or "revert")."""
        return self.action != "continue"

    def line(self) -> str:
        """The one line the trainer prints, e.g. ``catastrophic overfitting at epoch 7:
        PGD-20 3.1% < 0.5 x best 27.0% (epoch 4); stopped``."""
        outcome = {
            "continue": "training continues (on_collapse='continue')",
            "stop": "stopped",
            "revert": f"reverted to epoch {self.best_epoch}",
        }[self.action]
        return (
            f"catastrophic overfitting at epoch {self.epoch}: PGD-20 {self.pgd20_acc:.1%} "
            f"< {self.ratio:g} x best {self.best_pgd20_acc:.1%} (epoch {self.best_epoch}); "
            f"{outcome}"
        )

    def row_fields(self) -> dict[str, Any]:
        """The fields added to the metrics.jsonl row of the collapse epoch (and stored in
        the checkpoint of a run that ended at it)."""
        return {
            "collapsed_epoch": self.epoch,
            "collapse_action": self.action,
            "collapse_best_epoch": self.best_epoch,
            "collapse_best_pgd20_acc": self.best_pgd20_acc,
            "collapse_ratio": self.ratio,
            "collapse_min_best": self.min_best,
        }


def detect_collapse(
    pgd_by_epoch: Accuracies,
    ratio: float = DEFAULT_RATIO,
    action: str = "continue",
    clean_by_epoch: Mapping[int, float] | None = None,
    min_best: float = DEFAULT_MIN_BEST,
) -> Collapse | None:
    """The :class:`Collapse` of :func:`collapse_epoch` (None when there is none), with the
    best epoch before it (:func:`best_epoch`, ties broken by ``clean_by_epoch``) and
    ``action``.

    Raises:
      ValueError: as :func:`collapse_epoch`, or ``action`` not one of :data:`ON_COLLAPSE`.
    """
    if action not in ON_COLLAPSE:
        raise ValueError(f"action={action!r}: choose one of {list(ON_COLLAPSE)}")
    pairs = evaluated(pgd_by_epoch)
    epoch = collapse_epoch(pairs, ratio, min_best)
    if epoch is None:
        return None
    accuracy = dict(pairs)
    best = best_epoch(pairs, clean_by_epoch, before=epoch)
    return Collapse(
        epoch=epoch,
        pgd20_acc=accuracy[epoch],
        best_epoch=best,
        best_pgd20_acc=accuracy[best],
        ratio=ratio,
        min_best=min_best,
        action=action,
    )
