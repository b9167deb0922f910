"""Reading a training run's directory: the one place in experiments/ that parses the
project's own files.

config.json, metrics.jsonl (through :func:`apart_jax.logbook.read_rows`) and the reports of
``experiments.evaluate``; which checkpoints a run saved and which of them end an epoch; the
run's config and data. The models themselves are read with :func:`apart_jax.run.load_model`.
``experiments.summarize``, ``experiments.plot``, ``experiments.evaluate`` and
``experiments.robustness_drop`` analyse what it returns. Every problem is a one-line
:class:`~apart_jax.config.ConfigError` naming the directory or file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from apart_jax.checkpoint import RunCheckpoints, checkpoint_dir
from apart_jax.config import CONFIG_FILE, ConfigError, read_run_config, validate_config
from apart_jax.data import Dataset
from apart_jax.logbook import METRICS_FILE, is_integer, is_number, read_rows
from apart_jax.methods import Method, method_from_config
from apart_jax.run import run_dataset

EVAL_FILE = "eval.json"  # experiments.evaluate's report of the newest checkpoint


def eval_step_file(step: int) -> str:
    """The name experiments.evaluate gives the report of a checkpoint older than the newest."""
    return f"eval_step{step}.json"


def read_json(path: str) -> Any:
    """The JSON value in ``path``; ConfigError if it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error.msg})") from None


def read_json_if_present(path: str) -> Any:
    """:func:`read_json` of ``path``, or None if there is no such file."""
    return read_json(path) if os.path.exists(path) else None


def _require_directory(workdir: str) -> None:
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir}: no such directory")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of ``workdir/metrics.jsonl`` (schema: :mod:`apart_jax.logbook`), at least one.

    Raises:
      ConfigError: ``workdir`` is not a directory, or its metrics.jsonl is missing, empty or
        malformed.
    """
    _require_directory(workdir)
    path = os.path.join(workdir, METRICS_FILE)
    rows = read_rows(path)
    if not rows:
        raise ConfigError(f"{path} is empty: no epoch has been evaluated yet")
    return rows


def read_run(workdir: str) -> tuple[dict[str, Any], Method, list[dict[str, Any]]]:
    """A training run's config.json (as written), its method and its metrics rows.

    The method is :func:`apart_jax.methods.method_from_config` of the config.

    Raises:
      ConfigError: ``workdir`` is not a directory, has no config.json, its config names no
        valid method, or :func:`read_metrics` refuses its metrics.
    """
    _require_directory(workdir)
    config_path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ConfigError(f"{workdir} is not a training run: no {CONFIG_FILE}")
    config = read_json(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("method"), str):
        raise ConfigError(f"{config_path}: no method; not a config written by experiments.train")
    try:
        method = method_from_config(config)
    except ValueError as error:
        raise ConfigError(f"{config_path}: {error}") from None
    return config, method, read_metrics(workdir)


def read_attack_report(path: str, attacks: Sequence[str]) -> dict[str, Any]:
    """What an experiments.evaluate report says of ``attacks`` (suite entries, e.g. "cw").

    Returns:
      ``{"file", "checkpoint_step", "num_points", "eps", "norm", "clean_accuracy"}`` and,
      per entry of ``attacks``, its robust accuracy in [0, 1], or None when the report's
      suite did not run it; ``file`` is the basename, ``norm`` "linf" when not given.

    Raises:
      ConfigError: the file is not an experiments.evaluate report, or an attack's robust
        accuracy is not a number.
    """
    report = read_json(path)
    if not isinstance(report, dict) or not is_integer(report.get("checkpoint_step")):
        raise ConfigError(f"{path}: not an experiments.evaluate report (no checkpoint_step)")
    results = report.get("results")
    if not isinstance(results, dict):
        raise ConfigError(f"{path}: not an experiments.evaluate report (no results)")
    accuracies = {}
    for entry in attacks:
        result = results.get(entry)
        value = result.get("robust_accuracy") if isinstance(result, dict) else None
        if value is not None and not is_number(value):
            raise ConfigError(f"{path}: results.{entry}.robust_accuracy is not a number")
        accuracies[entry] = value
    return {
        "file": os.path.basename(path),
        "checkpoint_step": report["checkpoint_step"],
        "num_points": report.get("num_points"),
        "eps": report.get("eps"),
        "norm": report.get("norm", "linf"),
        "clean_accuracy": report.get("clean_accuracy"),
        **accuracies,
    }


def find_attack_report(workdir: str, step: int, attacks: Sequence[str]) -> dict[str, Any] | None:
    """The :func:`read_attack_report` of checkpoint ``step``: eval_step{STEP}.json, else
    eval.json when its checkpoint_step is ``step``; None when neither is."""
    for name in (eval_step_file(step), EVAL_FILE):
        path = os.path.join(workdir, name)
        if os.path.isfile(path):
            report = read_attack_report(path, attacks)
            if report["checkpoint_step"] == step:
                return report
    return None


def distinct_labels(workdirs: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[str]:
    """The first of ``candidates`` (one label per workdir each) whose labels all differ.

    Raises:
      ConfigError: the last candidate repeats a label (the same run given twice).
    """
    *earlier, last = candidates
    for labels in earlier:
        if len(set(labels)) == len(labels):
            return list(labels)
    for i, label in enumerate(last):
        if label in last[:i]:
            raise ConfigError(f"--workdir {workdirs[i]} is given twice")
    return list(last)


def saved_steps(workdir: str) -> list[int]:
    """The steps of ``workdir``'s complete checkpoints, oldest first (empty if none)."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return []
    with RunCheckpoints(workdir) as checkpoints:
        return checkpoints.steps()


def epoch_steps(workdir: str, steps_per_epoch: int) -> dict[int, int]:
    """``{epoch: step}`` of the checkpoints saved at the end of an epoch, in epoch order.

    Raises:
      ConfigError: if ``workdir`` has no checkpoints, or none at the end of an epoch.
    """
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise ConfigError(f"no checkpoints in {workdir}: train with --config.checkpoint=True")
    steps = saved_steps(workdir)
    found = {s // steps_per_epoch: s for s in steps if s % steps_per_epoch == 0}
    if not found:
        raise ConfigError(
            f"{workdir} holds no end-of-epoch checkpoint (steps {steps}): train with "
            "--config.checkpoint_every=0 and --config.checkpoint_keep at least the epochs"
        )
    return dict(sorted(found.items()))


def load_run_data(workdir: str) -> tuple[ml_collections.ConfigDict, Dataset]:
    """The config of the run in ``workdir`` (its config.json, validated) and its dataset, in
    host memory.

    Raises:
      ConfigError, DatasetError: no config.json, an invalid one, or unreadable data.
    """
    config = read_run_config(workdir)
    validate_config(config)
    return config, run_dataset(config)
