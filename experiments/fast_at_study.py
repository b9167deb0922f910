"""The fast-adversarial-training study: single-step methods against PGD-10, over seeds and eps.

    python -m experiments.fast_at_study --npz=cifar10.npz [--runs=runs/fast_at] \
        [--ledger=docs/results/fast_at] [--methods=fgsm_rs,nfgsm,...] [--radii=8,16] \
        [--seeds=0,1,2] [--stages=train,psi,attack,bench,report] [--aa_points=500] \
        [--psi_base=apart16_s0] [--psi_sweep=psi_lr_scale=2,psi_weight_decay=100,...]

Each run is a preset of experiments/configs/fast_at.py (``METHOD + RADIUS``) with a seed,
trained by ``experiments.train`` into RUNS/LABEL (LABEL = ``nfgsm16_s1``), in seed-major
order so that every method has its first seed before any has its second. Stages:

1. **train**: a finished run's config.json and metrics.jsonl (per-epoch clean and PGD-20
   accuracy on 1,000 test images) are copied into the ledger, LEDGER/LABEL/, with the
   command's wall time in ``wall.json``.
2. **psi**: the psi sweep (experiments/fast_at_psi.py): study run ``--psi_base`` (an APART
   run) trained again once per setting of ``--psi_sweep``, each run's record in
   ``--psi_ledger`` (``docs/results/fast_at_psi/apart16_s0_psi_lr_scale4/``).
3. **attack**: AutoAttack (``experiments.evaluate --suite=autoattack``) on the first
   ``--aa_points`` test images at the best and the last epoch of every ledger run; its
   reports go into the ledger too. A run whose checkpoints are gone is trained again
   first, into RUNS/LABEL (a finished directory lacking them is set aside as
   RUNS/LABEL.incomplete first). The ledger keeps the original record; the retraining's
   wall time is counted apart (``retrain`` in ``wall.json``), and where the retrained run's
   per-epoch accuracies differ from the ledger's (training on another machine, or another
   jax, need not repeat them bit for bit) a warning and ``retrain.json`` say by how much.
4. **bench**: unless the ledger holds ``bench_speed.json``, ``experiments.bench_speed``
   times every method's training step side by side in one run, at the study's width and
   batch; the report's one-machine training time (steps x step time) comes from it, since
   runs resumed in other sessions train on machines of other speeds.
5. **report**: ``docs/results.md``'s section between the fast-at markers is replaced by the
   tables (mean +- std over seeds; the psi sweep's runs), and the figures (PGD-20 per
   epoch, robust accuracy against training time, APART's psi) are written next to the
   ledgers.

Every stage skips what the ledger already holds, so rerunning the command after an
interruption (or in a later session, on another machine, with the ledger committed)
continues where it stopped; a run interrupted mid-training resumes from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from experiments.cli import parse_flags_or_exit
from experiments.configs.fast_at import METHODS, RADII, get_config
from experiments.fast_at_psi import SWEEP, parse_setting, sweep_label
from experiments.fast_at_report import BENCH_FILE, write_report
from experiments.run_summary import best_row
from experiments.runs import read_json, read_json_if_present, read_metrics

FLAGS = flags.FLAGS
CONFIG = "experiments/configs/fast_at.py"
WALL_FILE = "wall.json"
RETRAIN_FILE = "retrain.json"
LEDGER_FILES = ("config.json", "metrics.jsonl")
STAGES = ("train", "psi", "attack", "bench", "report")


def define_flags() -> None:
    """Defines this program's flags (once, before ``app.run``)."""
    flags.DEFINE_string("npz", None, "Decoded CIFAR-10 npz (experiments/cifar10_npz.sh).")
    flags.DEFINE_string("runs", "runs/fast_at", "Where the runs train (checkpoints).")
    flags.DEFINE_string("ledger", "docs/results/fast_at", "Finished runs' records, to commit.")
    flags.DEFINE_list("methods", list(METHODS), "Methods, in order.")
    flags.DEFINE_list("radii", [str(r) for r in RADII], "Training eps in 1/255, in order.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, in order (the outer loop).")
    flags.DEFINE_list("stages", list(STAGES), "Stages to run, in order.")
    flags.DEFINE_integer("aa_points", 500, "Test points for AutoAttack.")
    flags.DEFINE_string("psi_base", "apart16_s0", "The APART run the psi sweep changes.")
    flags.DEFINE_list("psi_sweep", list(SWEEP), "psi settings, one changed per sweep run.")
    flags.DEFINE_string("psi_ledger", "docs/results/fast_at_psi", "The psi sweep's records.")
    flags.DEFINE_string("results_md", "docs/results.md", "Markdown file holding the section.")


def run_labels(methods: Sequence[str], radii: Sequence[int], seeds: Sequence[int]) -> list[str]:
    """Run labels in training order: seed-major, then radius, then method."""
    return [f"{m}{r}_s{s}" for s in seeds for r in radii for m in methods]


def parse_label(label: str) -> tuple[str, int]:
    """``"nfgsm16_s1"`` -> (the preset ``"nfgsm16"``, the seed 1)."""
    preset, seed = label.rsplit("_s", 1)
    return preset, int(seed)


def label_method(label: str) -> str:
    """``"pgd1016_s1"`` -> the study method ``"pgd10"`` (one of fast_at's METHODS)."""
    preset = parse_label(label)[0]
    return next(m for m in METHODS if preset[len(m) :].isdigit() and preset.startswith(m))


def is_finished(workdir: str) -> bool:
    """Whether ``workdir``'s metrics reach the configured number of epochs."""
    try:
        rows = read_metrics(workdir)
        epochs = read_json(os.path.join(workdir, "config.json"))["epochs"]
    except (OSError, ValueError, KeyError):  # ValueError: ConfigError too
        return False
    return rows[-1]["epoch"] >= epochs


def run_command(args: list[str], log_path: str) -> float:
    """Runs ``python -m ...args``, its output appended to ``log_path``; the wall seconds.

    Raises:
      SystemExit: the command failed (its log's path is named).
    """
    start = time.perf_counter()
    with open(log_path, "a") as log:
        done = subprocess.run([sys.executable, "-m", *args], stdout=log, stderr=log)
    if done.returncode:
        sys.exit(f"error: {' '.join(args[:3])} ... failed ({done.returncode}); see {log_path}")
    return time.perf_counter() - start


def add_wall(ledger_dir: str, key: str, seconds: float) -> None:
    """Adds ``seconds`` to ``key`` of the run's ``wall.json``."""
    path = os.path.join(ledger_dir, WALL_FILE)
    wall = read_json_if_present(path) or {}
    wall[key] = wall.get(key, 0.0) + seconds
    with open(path, "w") as f:
        json.dump(wall, f, indent=1)


def train_command(label: str, npz: str, workdir: str, settings: Sequence[str] = ()) -> list[str]:
    """The ``experiments.train`` arguments that train (or resume) run ``label`` into
    ``workdir``, with config ``settings`` (``"psi_lr_scale=4"``) changed."""
    preset, seed = parse_label(label)
    return [
        "experiments.train",
        f"--config={CONFIG}:{preset}",
        f"--config.npz_path={npz}",
        f"--config.seed={seed}",
        *(f"--config.{setting}" for setting in settings),
        "--config.progress=False",
        f"--workdir={workdir}",
    ]


def train(
    label: str, npz: str, runs: str, ledger: str, base: str = "", settings: Sequence[str] = ()
) -> None:
    """Trains (or resumes) run ``label`` into RUNS/LABEL and copies its record into
    LEDGER/LABEL; a psi sweep run is study run ``base`` with config ``settings`` changed."""
    workdir, ledger_dir = os.path.join(runs, label), os.path.join(ledger, label)
    print(f"-- training {label}", flush=True)
    command = train_command(base or label, npz, workdir, settings)
    seconds = run_command(command, os.path.join(runs, f"{label}.log"))
    os.makedirs(ledger_dir, exist_ok=True)
    for name in LEDGER_FILES:
        shutil.copy(os.path.join(workdir, name), ledger_dir)
    add_wall(ledger_dir, "train", seconds)


def accuracy_differences(
    recorded: Sequence[dict[str, Any]], retrained: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """The largest absolute difference, over the epochs of ``recorded`` (metrics rows), of
    each accuracy (``clean_acc``, ``pgd20_acc``; in [0, 1]) from ``retrained``'s same
    epoch; an epoch ``retrained`` lacks counts as a difference of 1."""
    by_epoch = {row["epoch"]: row for row in retrained}
    return {
        key: max(
            abs(row[key] - by_epoch[row["epoch"]][key]) if row["epoch"] in by_epoch else 1.0
            for row in recorded
        )
        for key in ("clean_acc", "pgd20_acc")
    }


def retrain(label: str, npz: str, runs: str, ledger: str) -> None:
    """Trains ledger run ``label`` again into RUNS/LABEL for its checkpoints, keeping the
    ledger's record: the wall time goes to ``retrain``, and the accuracies' differences
    from the ledger's, if any, to a warning and LEDGER/LABEL/retrain.json."""
    workdir, ledger_dir = os.path.join(runs, label), os.path.join(ledger, label)
    if os.path.isdir(workdir) and is_finished(workdir):
        aside = f"{workdir}.incomplete"
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(workdir, aside)
        print(f"-- {workdir} is finished without the checkpoints to attack; moved to {aside}")
    print(f"-- training {label} again for its checkpoints", flush=True)
    seconds = run_command(train_command(label, npz, workdir), os.path.join(runs, f"{label}.log"))
    add_wall(ledger_dir, "retrain", seconds)
    differences = accuracy_differences(read_metrics(ledger_dir), read_metrics(workdir))
    if any(differences.values()):
        with open(os.path.join(ledger_dir, RETRAIN_FILE), "w") as f:
            json.dump(differences, f, indent=1)
        print(
            f"warning: {label} trained again differs from its ledger record by up to "
            f"{100 * differences['clean_acc']:.1f} points of clean and "
            f"{100 * differences['pgd20_acc']:.1f} of PGD-20 accuracy; its AutoAttack "
            "reports are of the retrained model",
            flush=True,
        )


def attack_steps(ledger_dir: str) -> list[int]:
    """The checkpoint steps of the best and the last epoch of a ledger run (one if equal)."""
    rows = read_metrics(ledger_dir)
    return sorted({best_row(rows)["step"], rows[-1]["step"]})


def attack(label: str, npz: str, runs: str, ledger: str, points: int) -> None:
    """AutoAttack on the best and last epochs of ``label``; reports copied into the ledger."""
    workdir, ledger_dir = os.path.join(runs, label), os.path.join(ledger, label)
    steps = attack_steps(ledger_dir)
    newest = read_metrics(ledger_dir)[-1]["step"]
    names = {s: "eval.json" if s == newest else f"eval_step{s}.json" for s in steps}
    missing = [s for s in steps if not os.path.exists(os.path.join(ledger_dir, names[s]))]
    if not missing:
        return
    if not all(os.path.isdir(os.path.join(workdir, "checkpoints", str(s))) for s in missing):
        retrain(label, npz, runs, ledger)
    for step in missing:
        print(f"-- AutoAttack on {label}, step {step}", flush=True)
        seconds = run_command(
            [
                "experiments.evaluate",
                f"--workdir={workdir}",
                f"--step={step}",
                "--suite=autoattack",
                f"--npz={npz}",
                f"--num_points={points}",
                "--count_passes=False",
            ],
            os.path.join(runs, f"{label}.log"),
        )
        shutil.copy(os.path.join(workdir, names[step]), ledger_dir)
        add_wall(ledger_dir, "attack", seconds)


def bench(methods: Sequence[str], runs: str, ledger: str) -> None:
    """Times ``methods`` (and clean training) side by side with experiments.bench_speed at
    the study's model, width and batch, into LEDGER/bench_speed.json, unless it exists."""
    out = os.path.join(ledger, BENCH_FILE)
    if os.path.exists(out):
        return
    config = get_config(f"{methods[0]}{RADII[0]}")
    print("-- timing every method's step (experiments.bench_speed)", flush=True)
    run_command(
        [
            "experiments.bench_speed",
            f"--methods={','.join(['clean', *methods])}",
            f"--model={config.model}",
            f"--width={config.width}",
            f"--batch_size={config.batch_size}",
            f"--dtype={config.dtype}",
            "--epoch_examples=0",
            "--eval_points=0",
            f"--json={out}",
        ],
        os.path.join(runs, "bench_speed.log"),
    )


def psi_sweep(npz: str, runs: str, psi_ledger: str, base: str, settings: Sequence[str]) -> None:
    """Trains study run ``base`` once per psi setting in ``settings`` (experiments/
    fast_at_psi.py) into RUNS, its record into ``psi_ledger``, unless it holds the run."""
    os.makedirs(psi_ledger, exist_ok=True)
    for setting in settings:
        label = sweep_label(base, setting)
        if not is_finished(os.path.join(psi_ledger, label)):
            train(label, npz, runs, psi_ledger, base, [setting])


def run_study(
    npz: str,
    runs: str,
    ledger: str,
    labels: Sequence[str],
    stages: Sequence[str],
    aa_points: int,
    results_md: str,
    psi: tuple[str, Sequence[str], str] = ("apart16_s0", SWEEP, "docs/results/fast_at_psi"),
) -> None:
    """Runs ``stages`` (train, psi, attack, bench, report) over the runs ``labels``; ``psi``
    is the sweep's base run, settings and ledger. See the module doc."""
    os.makedirs(runs, exist_ok=True)
    os.makedirs(ledger, exist_ok=True)
    for stage in stages:
        if stage == "train":
            for label in labels:
                if not is_finished(os.path.join(ledger, label)):
                    train(label, npz, runs, ledger)
        elif stage == "psi":
            base, settings, psi_ledger = psi
            psi_sweep(npz, runs, psi_ledger, base, settings)
        elif stage == "attack":
            for label in labels:
                if is_finished(os.path.join(ledger, label)):
                    attack(label, npz, runs, ledger, aa_points)
        elif stage == "bench":
            bench(list(dict.fromkeys(label_method(label) for label in labels)), runs, ledger)
        elif stage == "report":
            print(write_report(ledger, results_md, psi[2]))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = [m for m in FLAGS.methods if m not in METHODS]
    if unknown:
        raise app.UsageError(f"--methods: {unknown} not in {list(METHODS)}")
    stages = [s for s in FLAGS.stages if s not in STAGES]
    if stages:
        raise app.UsageError(f"--stages: unknown {stages}; choose from {', '.join(STAGES)}")
    if {"train", "psi", "attack"} & set(FLAGS.stages) and not (
        FLAGS.npz and os.path.isfile(FLAGS.npz)
    ):
        raise app.UsageError(f"--npz={FLAGS.npz!r}: the train, psi and attack stages need the data")
    try:
        [parse_setting(setting) for setting in FLAGS.psi_sweep]
    except ValueError as e:
        raise app.UsageError(f"--psi_sweep: {e}") from None
    try:
        base_is_apart = label_method(FLAGS.psi_base) == "apart"
    except (ValueError, StopIteration):
        base_is_apart = False
    if not base_is_apart:
        raise app.UsageError(f"--psi_base={FLAGS.psi_base!r}: not an APART run (apart16_s0)")
    labels = run_labels(FLAGS.methods, [int(r) for r in FLAGS.radii], [int(s) for s in FLAGS.seeds])
    npz = os.path.abspath(FLAGS.npz) if FLAGS.npz else ""
    psi = (FLAGS.psi_base, FLAGS.psi_sweep, FLAGS.psi_ledger)
    run_study(npz, FLAGS.runs, FLAGS.ledger, labels, FLAGS.stages, FLAGS.aa_points,
              FLAGS.results_md, psi)  # fmt: skip


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
