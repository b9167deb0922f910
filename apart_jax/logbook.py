"""A run's metrics record: ``metrics.jsonl`` (one JSON object per evaluation) and TensorBoard.

``metrics.jsonl`` holds one row per evaluation, in step order. A row is a JSON object with
the keys of :data:`REQUIRED` and, where they apply, those of :data:`OPTIONAL`:

=================  =======  ========================================================
key                type     value
=================  =======  ========================================================
``epoch``          int      the epoch just trained, from 1
``step``           int      training steps taken so far
``method``         str      the method's name (``"apart"``, ``"pgd"``, ...)
``clean_acc``      number   test accuracy on clean inputs, in [0, 1]
``pgd20_acc``      number   test accuracy under the evaluation PGD attack, in [0, 1]
``train_loss``     number   mean training loss of the epoch (adversarial inputs)
``train_acc``      number   training accuracy of the epoch (adversarial inputs), in [0, 1]
``train_seconds``  number   training time so far, compilation excluded
``eval_seconds``   number   time of this evaluation
``eval_examples``  int      number of test examples evaluated
``psi``            object   FGSM+ and APART: the learned step sizes, ``{name: number or
                            [number, ...]}`` (``alpha``, ``alpha_omega``, ``layer_alphas``)
``skipped_steps``  int      runs with ``skip_nonfinite``: non-finite steps discarded so far
=================  =======  ========================================================

The row of the epoch at which the trainer detects catastrophic overfitting
(:mod:`apart_jax.collapse`; at most one row per run) also has:

===========================  ======  ==================================================
key                          type    value
===========================  ======  ==================================================
``collapsed_epoch``          int     the collapse epoch (this row's ``epoch``)
``collapse_action``          str     what the run did: ``"continue"`` (trained on),
                                     ``"stop"`` (ended here) or ``"revert"`` (ended with
                                     the ``collapse_best_epoch`` checkpoint as final)
``collapse_best_epoch``      int     the best epoch before it (highest PGD-20 accuracy)
``collapse_best_pgd20_acc``  number  that epoch's PGD-20 accuracy
``collapse_ratio``           number  the run's ``collapse_ratio``: this row's
                                     ``pgd20_acc`` < ratio x ``collapse_best_pgd20_acc``
``collapse_min_best``        number  the run's ``collapse_min_best``: the floor that
                                     ``collapse_best_pgd20_acc`` reached
===========================  ======  ==================================================

Other keys are kept as they are. :func:`read_rows` is the one reader: the trainer's resume,
``experiments.summarize`` and ``experiments.plot`` use it.

Only the lead process (index 0) of a multi-process run writes. A resumed run keeps the
rows up to the step it resumes from and drops any written after that checkpoint, so the
final file equals an uninterrupted run's; its TensorBoard events hide those of the dropped
rows in the same way.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from collections.abc import Callable
from typing import Any

import jax

from apart_jax.collapse import ON_COLLAPSE
from apart_jax.config import ConfigError

METRICS_FILE = "metrics.jsonl"


def is_integer(value: object) -> bool:
    """Whether a JSON value is an integer (``true``/``false`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether a JSON value is a number, integer or not (``true``/``false`` are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_psi(value: object) -> bool:
    """A ``{name: number or [number, ...]}`` object."""
    return isinstance(value, dict) and all(
        is_number(v) or (isinstance(v, list) and all(map(is_number, v))) for v in value.values()
    )


# key: (check of its value, what the value must be).
_INTEGER = (is_integer, "an integer")
_NUMBER = (is_number, "a number")
REQUIRED: dict[str, tuple[Callable[[object], bool], str]] = {
    "epoch": _INTEGER,
    "step": _INTEGER,
    "method": (lambda v: isinstance(v, str), "a string"),
    "clean_acc": _NUMBER,
    "pgd20_acc": _NUMBER,
}
OPTIONAL: dict[str, tuple[Callable[[object], bool], str]] = {
    "train_loss": _NUMBER,
    "train_acc": _NUMBER,
    "train_seconds": _NUMBER,
    "eval_seconds": _NUMBER,
    "eval_examples": _INTEGER,
    "psi": (_is_psi, "an object of numbers and lists of numbers"),
    "skipped_steps": _INTEGER,
    "collapsed_epoch": _INTEGER,
    "collapse_action": (lambda v: v in ON_COLLAPSE, f"one of {list(ON_COLLAPSE)}"),
    "collapse_best_epoch": _INTEGER,
    "collapse_best_pgd20_acc": _NUMBER,
    "collapse_ratio": _NUMBER,
    "collapse_min_best": _NUMBER,
}


def check_row(row: object, where: str) -> dict[str, Any]:
    """``row`` if it is a metrics row of the schema above.

    Raises:
      ConfigError: it is not an object, lacks a required key or has a value of the wrong
        type (one line, starting with ``where``).
    """
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    for key, (check, kind) in (REQUIRED | OPTIONAL).items():
        if key in row and not check(row[key]):
            raise ConfigError(f"{where}: {key} must be {kind}, got {row[key]!r}")
    return row


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``, each checked by :func:`check_row`, in file order.

    Blank lines are skipped; an empty file gives ``[]``.

    Raises:
      ConfigError: the file is missing, or a line is not JSON or not a row (one line naming
        ``path:line``).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: no epoch has been evaluated (train first)")
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{where}: not valid JSON ({error.msg})") from None
            rows.append(check_row(row, where))
    return rows


def scalar_fields(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a row, nested ones named ``outer/inner`` (lists as ``name/i``).

    Strings, booleans and None are left out; e.g. ``{"step": 3, "psi": {"layer_alphas":
    [0.5, 0.25]}}`` gives ``{"step": 3.0, "psi/layer_alphas/0": 0.5, "psi/layer_alphas/1":
    0.25}``.
    """
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): float(value)
        for path, value in jax.tree_util.tree_leaves_with_path(row)
        if is_number(value)
    }


class MetricsLog:
    """Appends evaluation rows to ``WORKDIR/metrics.jsonl`` and, optionally, TensorBoard.

    Args:
      workdir: the run's directory (must exist).
      resume_step: keep the existing rows up to this step (None: start a new file).
      tensorboard: also write each row's numbers but ``step`` as scalars at its step into
        a new event file ``WORKDIR/events.out.tfevents.{seconds}.{hostname}.{first step}``
        (tensorboardX; the events reach the file within a second, all of them at
        :meth:`close`). It marks the steps from the first one on as restarted, so that
        TensorBoard hides the events of rows this run drops.
      enabled: False on the processes that must not write (all but the lead).
    """

    def __init__(
        self, workdir: str, *, resume_step: int | None, tensorboard: bool, enabled: bool = True
    ):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.rows: list[dict[str, Any]] = []
        self._file = None
        self._writer = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            self.rows = [r for r in read_rows(self.path) if r["step"] <= resume_step]
        partial = self.path + ".tmp"
        with open(partial, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)
        os.replace(partial, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed by close())
        if tensorboard:
            # Lazy: tensorboardX (and protobuf) only load for runs that write events.
            from tensorboardX import SummaryWriter

            first_step = (resume_step or 0) + 1
            # The suffix keeps a resumed run from overwriting the file of the run it
            # resumes when both start in the same second (the file names' resolution).
            self._writer = SummaryWriter(
                workdir, purge_step=first_step, flush_secs=1, filename_suffix=f".{first_step}"
            )

    def write(self, row: dict[str, Any]) -> None:
        """Appends ``row`` (of the schema above) to metrics.jsonl, flushed to disk, and its
        numbers to TensorBoard."""
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._writer is not None:
            wall_time = time.time()
            for tag, value in scalar_fields(row).items():
                if tag != "step":
                    self._writer.add_scalar(tag, value, row["step"], walltime=wall_time)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
