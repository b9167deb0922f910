"""Collect training runs into one markdown table: cost, best and last epoch, attack results.

    python -m experiments.summarize --workdir=DIR [--workdir=DIR2 ...] [--out=table.md] \
        [--csv=table.csv] [--title=...]
    python -m experiments.summarize --workdir=DIR [--workdir=DIR2 ...] --missing

One row per run, in the order given: its label (the directory's basename; where two
basenames coincide, the method and training eps, e.g. "apart 8/255", else the path), the
method, the training eps, forward+backward passes per training step, the epochs trained
(``12/15`` for an unfinished run; ``7/30 (stopped)`` or ``7/30 (reverted to 4)`` for a run
the trainer ended at a collapse, ``on_collapse``), the epoch of catastrophic overfitting
("collapsed at epoch": :func:`apart_jax.collapse.collapse_epoch` at its defaults on the
metrics' PGD-20 accuracies, the first evaluated epoch whose PGD-20 accuracy is below half
the best PGD-20 accuracy of the evaluated epochs before it, that best being at least 10%;
"-" when none is), the training
time (the last row's ``train_seconds``), and for the best and for the last epoch (the final
state: the last evaluated epoch, or the epoch a run reverted to):

* clean and PGD-20 accuracy from DIR/metrics.jsonl (written by experiments.train);
* C&W and AutoAttack ("AA") accuracy and the clean accuracy on the points they ran on, from
  the experiments.evaluate report of that epoch's checkpoint step: DIR/eval_step{STEP}.json,
  or DIR/eval.json when its ``checkpoint_step`` is that step; "-" when there is none.

The best epoch is the one of highest PGD-20 accuracy; ties go to the higher clean accuracy,
then to the later epoch (the longer-trained model, the one a newest-checkpoint evaluation
covers). A protocol line under the table says, from the files, on how many test points and
at which eps the numbers were measured. The table is printed and, with --out, written to a
file; --csv writes the same rows with raw numbers (accuracies as fractions in [0, 1],
seconds; empty cells where not evaluated). Every missing evaluation (a best or last epoch
without a report, or whose report lacks C&W or AutoAttack) is listed with the
experiments.evaluate command that fills it; with --missing only those are printed, as
"WORKDIR STEP" lines for scripts (experiments/cifar10_subset_study.sh runs them).

A missing directory, one without config.json, a missing, empty or malformed metrics.jsonl or
a malformed eval json exits with one line on stderr and status 2. The files are read by
:mod:`experiments.runs`, a run's epochs picked by :mod:`experiments.run_summary`; this
module formats the table.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from apart_jax.config import ConfigError
from experiments.cli import parse_flags_or_exit, quiet_logging, run_or_exit
from experiments.run_summary import (
    ATTACKS,
    COLLAPSE_MIN_BEST,
    COLLAPSE_RATIO,
    load_run_summary,
)
from experiments.runs import distinct_labels

FLAGS = flags.FLAGS

EPOCH_KINDS = ("best", "last")
MISSING = "-"
NORMS = {"linf": "L-inf", "l2": "L2"}


def define_flags() -> None:
    """Defines this program's flags (once, before ``app.run``)."""
    flags.DEFINE_multi_string("workdir", None, "A training run's directory; repeat, in order.")
    flags.DEFINE_string("out", None, "Markdown file to write the table to (it is printed too).")
    flags.DEFINE_string("csv", None, "CSV file to write the same rows to, raw numbers.")
    flags.DEFINE_string("title", "", "A heading above the table (none if empty).")
    flags.DEFINE_bool(
        "missing",
        False,
        "Print only 'WORKDIR STEP' per best or last epoch lacking a C&W or AutoAttack report "
        "(nothing if none), for scripts; --out and --csv are not written.",
    )
    flags.mark_flags_as_required(["workdir"])


def format_eps(eps: float | None) -> str:
    """An eps in [0, 1] as "8/255" (two decimals at most: "0.5/255")."""
    if eps is None:
        return MISSING
    return f"{round(eps * 255, 2):g}/255"


def format_duration(seconds: float | None) -> str:
    """ "42 s" under a minute, "6.5 min" under an hour, "2.1 h" beyond."""
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_accuracy(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2%}"


def unique_labels(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Each run's ``label``; where labels coincide, "method eps" (e.g. "apart 8/255"), and
    where those coincide too, the workdir as given.

    Raises:
      ConfigError: the same run directory is given twice.
    """
    return distinct_labels(
        [s["workdir"] for s in summaries],
        [
            [s["label"] for s in summaries],
            [f"{s['method']} {format_eps(s['eps'])}" for s in summaries],
            [os.path.normpath(s["workdir"]) for s in summaries],
        ],
    )


def _epochs_cell(summary: dict[str, Any]) -> str:
    planned = summary["epochs_planned"]
    cell = str(summary["epochs"])
    if planned is not None and summary["epochs"] < planned:
        cell += f"/{planned}"
    if summary.get("ended_by"):
        cell += f" ({summary['ended_by']})"
    return cell


def table_columns() -> list[str]:
    """The markdown table's header cells."""
    columns = ["run", "method", "train eps", "passes/step", "epochs", "collapsed at epoch"]
    columns.append("train time")
    for kind in EPOCH_KINDS:
        columns += [f"{kind} epoch", f"{kind} clean", f"{kind} PGD-20"]
        columns += [f"{kind} {name}" for _, name in ATTACKS]
        columns.append(f"{kind} clean (attack pts)")
    return columns


def table_row(summary: dict[str, Any]) -> list[str]:
    """One run's markdown cells, in :func:`table_columns` order."""
    cells = [
        summary["label"],
        summary["method_label"],
        MISSING if summary["method"] == "clean" else format_eps(summary["eps"]),
        str(summary["passes_per_step"]),
        _epochs_cell(summary),
        MISSING if summary["collapsed_epoch"] is None else str(summary["collapsed_epoch"]),
        format_duration(summary["train_seconds"]),
    ]
    for kind in EPOCH_KINDS:
        epoch = summary[kind]
        attacks = epoch["attacks"] or {}
        cells += [
            str(epoch["epoch"]),
            format_accuracy(epoch["clean_acc"]),
            format_accuracy(epoch["pgd20_acc"]),
        ]
        cells += [format_accuracy(attacks.get(entry)) for entry, _ in ATTACKS]
        cells.append(format_accuracy(attacks.get("clean_accuracy")))
    return cells


def _agreeing(pairs: Sequence[tuple[str, str]]) -> str:
    """The text all runs share, or "A (run1, run2), B (run3)" where they differ."""
    groups: dict[str, list[str]] = {}
    for label, text in pairs:
        groups.setdefault(text, []).append(label)
    if len(groups) == 1:
        return next(iter(groups))
    return ", ".join(f"{text} ({', '.join(labels)})" for text, labels in groups.items())


def protocol_line(summaries: Sequence[dict[str, Any]]) -> str:
    """What the numbers were measured on, from the runs' configs, metrics and eval jsons."""
    examples = _agreeing([(s["label"], str(s["last"]["eval_examples"] or "?")) for s in summaries])
    pgd = _agreeing(
        [
            (
                s["label"],
                f"{s['eval_pgd_steps']} steps of {format_eps(s['eval_pgd_step_size'])} "
                f"at L-inf eps {format_eps(s['eval_eps'])}",
            )
            for s in summaries
        ]
    )
    text = (
        f"Protocol: clean and PGD-20 accuracy from metrics.jsonl on {examples} test examples, "
        f"PGD {pgd}"
    )
    reports = [
        (s["label"], s[kind]["attacks"])
        for s in summaries
        for kind in EPOCH_KINDS
        if s[kind]["attacks"] is not None
    ]
    names = " and ".join(name for _, name in ATTACKS)
    if reports:
        points = _agreeing([(label, str(r["num_points"])) for label, r in reports])
        eps = _agreeing(
            [
                (label, f"{NORMS.get(r['norm'], r['norm'])} eps {format_eps(r['eps'])}")
                for label, r in reports
            ]
        )
        text += (
            f"; {names} (AutoAttack) by experiments.evaluate on the first {points} test points "
            f"at {eps}, with the clean accuracy on those points"
        )
    else:
        text += f"; {names} not evaluated"
    return (
        text + f'; BN in inference mode; "{MISSING}" = not evaluated; best = the epoch of highest '
        "PGD-20 accuracy (ties: higher clean accuracy, then the later epoch); last = the final "
        "state (the last evaluated epoch, or the epoch a run reverted to at a collapse); "
        f"collapsed at epoch = the first evaluated epoch whose PGD-20 accuracy is below "
        f"{COLLAPSE_RATIO:g} x the best PGD-20 accuracy of the evaluated epochs before it, "
        f"that best being at least {COLLAPSE_MIN_BEST:.0%} "
        f'(catastrophic overfitting; "{MISSING}" = never).'
    )


def format_table(summaries: Sequence[dict[str, Any]], title: str = "") -> str:
    """A markdown table of :func:`load_run_summary` results (one row each, in order), the
    protocol line under it and, if ``title``, a heading above it."""
    if not summaries:
        raise ConfigError("no run to summarize")
    columns = table_columns()
    rows = [table_row(s) for s in summaries]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    lines = [f"## {title}", ""] if title else []
    lines += [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [line(r) for r in rows]
    lines += ["", protocol_line(summaries)]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = [
    "run",
    "method",
    "train_eps",
    "passes_per_step",
    "epochs",
    "epochs_planned",
    "collapsed_epoch",
    "collapse_action",
    "train_seconds",
] + [
    f"{kind}_{key}"
    for kind in EPOCH_KINDS
    for key in (
        "epoch",
        "step",
        "clean",
        "pgd20",
        "eval_examples",
        "cw",
        "autoattack",
        "attack_clean",
        "attack_points",
        "attack_file",
    )
]


def csv_row(summary: dict[str, Any]) -> dict[str, Any]:
    """One run's raw numbers, keyed by :data:`CSV_COLUMNS` (None where not evaluated)."""
    row = {
        "run": summary["label"],
        "method": summary["method"],
        "train_eps": summary["eps"],
        "passes_per_step": summary["passes_per_step"],
        "epochs": summary["epochs"],
        "epochs_planned": summary["epochs_planned"],
        "collapsed_epoch": summary["collapsed_epoch"],
        "collapse_action": summary["collapse_action"],
        "train_seconds": summary["train_seconds"],
    }
    for kind in EPOCH_KINDS:
        epoch = summary[kind]
        attacks = epoch["attacks"] or {}
        row.update(
            {
                f"{kind}_epoch": epoch["epoch"],
                f"{kind}_step": epoch["step"],
                f"{kind}_clean": epoch["clean_acc"],
                f"{kind}_pgd20": epoch["pgd20_acc"],
                f"{kind}_eval_examples": epoch["eval_examples"],
                f"{kind}_cw": attacks.get("cw"),
                f"{kind}_autoattack": attacks.get("autoattack"),
                f"{kind}_attack_clean": attacks.get("clean_accuracy"),
                f"{kind}_attack_points": attacks.get("num_points"),
                f"{kind}_attack_file": attacks.get("file"),
            }
        )
    return row


def write_csv(summaries: Sequence[dict[str, Any]], path: str) -> None:
    """The table's rows as CSV, raw numbers; empty cells where not evaluated."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_row(s) for s in summaries)


def missing_evaluations(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    """(workdir, step) of each best or last epoch whose report is missing or lacks one of
    the table's attacks (C&W, AutoAttack), in table order, each step once."""
    missing = []
    for s in summaries:
        steps = dict.fromkeys(
            s[kind]["step"]
            for kind in EPOCH_KINDS
            if s[kind]["attacks"] is None
            or any(s[kind]["attacks"][entry] is None for entry, _ in ATTACKS)
        )
        missing += [(s["workdir"], step) for step in steps]
    return missing


def evaluate_commands(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """The experiments.evaluate command of each :func:`missing_evaluations` entry, with the
    number of points of the existing reports when they all agree on one."""
    points = {
        s[kind]["attacks"]["num_points"]
        for s in summaries
        for kind in EPOCH_KINDS
        if s[kind]["attacks"] is not None
    }
    num_points = f" --num_points={points.pop()}" if len(points) == 1 else ""
    return [
        f"python -m experiments.evaluate --workdir={workdir} --step={step}"
        f" --suite=cw,autoattack{num_points}"
        for workdir, step in missing_evaluations(summaries)
    ]


def summarize_workdirs() -> str:
    """Loads every --workdir, writes --out and --csv and returns the markdown (with --missing:
    only the "WORKDIR STEP" lines of :func:`missing_evaluations`)."""
    summaries = [load_run_summary(w) for w in FLAGS.workdir]
    if FLAGS.missing:
        return "\n".join(f"{workdir} {step}" for workdir, step in missing_evaluations(summaries))
    for summary, label in zip(summaries, unique_labels(summaries), strict=True):
        summary["label"] = label
    text = format_table(summaries, FLAGS.title)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            f.write(text)
    if FLAGS.csv:
        write_csv(summaries, FLAGS.csv)
    commands = evaluate_commands(summaries)
    if commands:
        text += "\nNot evaluated under C&W and AutoAttack yet; to fill in:\n"
        text += "".join(f"  {c}\n" for c in commands)
    for path in (FLAGS.out, FLAGS.csv):
        if path:
            text += f"\nwritten: {path}"
    return text


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logging()
    text = run_or_exit(summarize_workdirs)
    if text:
        print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
