"""A run's metrics record: ``metrics.jsonl`` (one JSON object per evaluation) and TensorBoard.

Only the lead process (index 0) of a multi-process run writes. A resumed run keeps the
rows up to the step it resumes from and drops any written after that checkpoint, so the
final file equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Any

from apart_jax.summary import SummaryWriter

METRICS_FILE = "metrics.jsonl"


def read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file (empty if there is none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def scalar_fields(row: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a row, nested ones named ``outer/inner`` (lists as ``name/i``)."""
    scalars: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            scalars.update(scalar_fields(value, f"{name}/"))
        elif isinstance(value, list):
            scalars.update(scalar_fields({str(i): v for i, v in enumerate(value)}, f"{name}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            scalars[name] = float(value)
    return scalars


class MetricsLog:
    """Appends evaluation rows to ``WORKDIR/metrics.jsonl`` and, optionally, TensorBoard.

    Args:
      workdir: the run's directory (must exist).
      resume_step: keep the existing rows up to this step (None: start a new file).
      tensorboard: also write the rows' numbers as scalars to ``WORKDIR/events.out.tfevents.*``.
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
        if resume_step is not None:
            self.rows = [r for r in read_rows(self.path) if r["step"] <= resume_step]
        partial = self.path + ".tmp"
        with open(partial, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.rows)
        os.replace(partial, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed by close())
        if tensorboard:
            self._writer = SummaryWriter(workdir)

    def write(self, row: dict[str, Any]) -> None:
        """Appends ``row`` (with an integer ``step``) and flushes it to disk."""
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        if self._writer is not None:
            numbers_only = {k: v for k, v in scalar_fields(row).items() if k != "step"}
            self._writer.scalars(numbers_only, row["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
