"""Evaluate a training run's checkpoint under attack suites.

    python -m experiments.evaluate --workdir=DIR [--suite=pgd20,cw,autoattack] [--step=STEP] \
        [--num_points=0] [--seed=0] [--batch_size=500] [--npz=FILE] [--eps=...] [--norm=linf]

Reads the model of checkpoint --step of DIR (written by experiments.train; default: the
newest; a step that is not saved exits with status 2 and lists the saved steps) with
apart_jax.run.load_model (weights and BN statistics only: no Omega, optimizer states or
training data), evaluates on its dataset's test split (or the x_test, y_test of --npz), BN
in inference mode, and prints a table. The
report, with every number, the protocol, the checkpoint's step and its epoch
(ceil(step / steps per epoch)), goes to DIR/eval.json for the newest checkpoint and to
DIR/eval_step{STEP}.json for an older one (experiments.summarize reads both). Suite entries:
"autoattack" (APGD-CE, APGD-T, FAB-T, Square as a worst case) or any single attack of
apart_jax.attacks.suite.make_attack ("fgsm", "pgd20", "cw", "apgd-ce", "apgd-dlr", "apgd-t",
"fab-t", "square"), each run on every point.

The flags are defined by :func:`define_flags`, called when the module runs as a program, so
that tests can import the helpers next to other entry points' flags.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags

from apart_jax.attacks.suite import (
    AUTOATTACK,
    make_attack,
    measure_passes,
    run_suite,
    suite_host_loop,
)
from apart_jax.checkpoint import checkpoint_dir
from apart_jax.config import ConfigError, read_run_config
from apart_jax.data import DatasetError, load_npz
from apart_jax.run import TrainedModel, load_model, run_test_split
from experiments.cli import parse_flags_or_exit, quiet_logging, run_or_exit
from experiments.runs import EVAL_FILE, eval_step_file, saved_steps

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags (once, before ``app.run``)."""
    flags.DEFINE_string("workdir", None, "A training run's directory (config.json, checkpoints/).")
    flags.DEFINE_list("suite", ["pgd20", "cw", "autoattack"], "Attacks or 'autoattack', in order.")
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).")
    flags.DEFINE_integer("num_points", 0, "Test points to evaluate, the first ones (0 = all).")
    flags.DEFINE_integer("seed", 0, "Seed of the attacks' random starts.")
    flags.DEFINE_integer("batch_size", 500, "Points per compiled batch.")
    flags.DEFINE_string("npz", "", "Evaluate on x_test, y_test of this npz instead.")
    flags.DEFINE_float("eps", None, "Attack radius (default: the run's eval_eps).")
    flags.DEFINE_enum("norm", "linf", ["linf", "l2"], "Threat model.")
    flags.DEFINE_bool("count_passes", True, "Count each attack's forward/backward passes.")
    flags.mark_flags_as_required(["workdir"])


def protocol_of(attack) -> dict:
    """The attack's settings (bound and default keyword values) as JSON-ready numbers."""
    return {
        name: p.default
        for name, p in inspect.signature(attack).parameters.items()
        if isinstance(p.default, (int, float, str, bool)) and p.default is not None
    }


def resolve_step(available: Sequence[int], requested: int | None, where: str = "") -> int:
    """The checkpoint step to evaluate: ``requested``, or the newest of ``available``.

    Raises:
      ConfigError: nothing is saved, or ``requested`` is not among ``available`` (the message,
        one line, lists the saved steps).
    """
    where = where or "the run"
    if not available:
        raise ConfigError(f"no checkpoint in {where}: train with --config.checkpoint=True first")
    steps = sorted(available)
    if requested is None:
        return steps[-1]
    if requested not in steps:
        raise ConfigError(
            f"--step={requested}: no checkpoint at that step in {where}; "
            f"saved steps: {', '.join(map(str, steps))}"
        )
    return requested


def epoch_of(step: int, steps_per_epoch: int) -> int:
    """The epoch a checkpoint step falls in: ceil(step / steps_per_epoch) (1 = the first)."""
    return math.ceil(step / steps_per_epoch)


def report_path(workdir: str, step: int, newest: int) -> str:
    """Where the report of checkpoint ``step`` goes: DIR/eval.json for the newest checkpoint,
    DIR/eval_step{STEP}.json for an older one."""
    name = EVAL_FILE if step == newest else eval_step_file(step)
    return os.path.join(workdir, name)


def load_run(workdir: str, step: int | None = None) -> tuple[TrainedModel, int]:
    """The run's model at checkpoint ``step`` (default: the newest) and the newest saved step."""
    read_run_config(workdir)  # a directory without a run is refused before its checkpoints
    steps = saved_steps(workdir)
    step = resolve_step(steps, step, checkpoint_dir(workdir))
    try:
        trained = load_model(workdir, step)
    except FileNotFoundError as error:
        raise ConfigError(f"{error}: train with --config.checkpoint=True first") from None
    return trained, steps[-1]


def attack_points(
    trained: TrainedModel, npz: str = "", num_points: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """The points to attack: the first ``num_points`` (0 = all) of the run's test split, or of
    the ``x_test, y_test`` in ``npz``; images (M, H, W, C) float32 in [0, 1], labels (M,), and
    how many points the split holds.

    Raises:
      ConfigError: more points asked for than the split holds.
      DatasetError: the npz's images do not fit the model.
    """
    x, y = run_test_split(trained.config, trained.model.num_classes)
    image_shape = x.shape[1:]
    if npz:
        data = load_npz(npz)
        x, y = data.x_test, data.y_test
    available = len(y)
    if num_points:
        if num_points > available:
            raise ConfigError(f"num_points={num_points} but only {available} test points")
        x, y = x[:num_points], y[:num_points]
    if x.shape[1:] != image_shape:
        raise DatasetError(f"test images {x.shape[1:]} do not fit the model's {image_shape}")
    return x.astype(np.float32) / 255.0, y, available


def evaluate_workdir() -> dict:
    trained, newest = load_run(FLAGS.workdir, FLAGS.step)
    config = trained.config
    x, y, _ = attack_points(trained, FLAGS.npz, FLAGS.num_points)
    eps = config.eval_eps if FLAGS.eps is None else FLAGS.eps
    variables = trained.variables

    def apply_fn(v, z):
        return trained.model.apply(v, z, train=False)

    report = {
        "workdir": os.path.abspath(FLAGS.workdir),
        "checkpoint_step": trained.step,
        "epoch": epoch_of(trained.step, trained.steps_per_epoch),
        "steps_per_epoch": trained.steps_per_epoch,
        "newest_checkpoint_step": newest,
        "method": config.method,
        "dataset": FLAGS.npz or config.dataset,
        "num_points": len(y),
        "seed": FLAGS.seed,
        "batch_size": FLAGS.batch_size,
        "eps": eps,
        "norm": FLAGS.norm,
        "bn_mode": "inference",
        "host_loop": suite_host_loop(),
        "results": {},
    }
    key = jax.random.key(FLAGS.seed)
    for i, entry in enumerate(FLAGS.suite):
        names = list(AUTOATTACK) if entry == "autoattack" else [entry]
        attacks = {name: make_attack(name, eps=eps, norm=FLAGS.norm) for name in names}
        start = time.perf_counter()
        result = run_suite(
            apply_fn,
            variables,
            x,
            y,
            jax.random.fold_in(key, i),
            attacks=names,
            eps=eps,
            norm=FLAGS.norm,
            batch_size=FLAGS.batch_size,
            progress=True,
            host_loop=report["host_loop"],
        )
        report["clean_accuracy"] = result.clean_accuracy
        stages = []
        for stage in result.stages:
            row = {**stage.__dict__, "protocol": protocol_of(attacks[stage.attack])}
            if FLAGS.count_passes:
                count = measure_passes(apply_fn, variables, attacks[stage.attack], x[:2], y[:2])
                row.update(forward_passes=count.forward, backward_passes=count.backward)
            stages.append(row)
        report["results"][entry] = {
            "robust_accuracy": result.robust_accuracy,
            "seconds": time.perf_counter() - start,
            "stages": stages,
        }
    return report


def format_report(report: dict) -> str:
    """A table: one row per attack (per stage for suites), robust accuracy, passes, time."""
    lines = [
        f"{report['method']} at step {report['checkpoint_step']} (epoch {report['epoch']}), "
        f"{report['num_points']} points, "
        f"{report['norm']} eps {report['eps']:.5f} ({report['eps'] * 255:.1f}/255), BN inference",
        f"clean accuracy {report['clean_accuracy']:.2%}",
        "",
        f"{'suite':<12}{'attack':<10}{'robust acc':>11}{'attacked':>10}{'fooled':>8}"
        f"{'fwd/bwd':>12}{'seconds':>9}",
    ]
    for entry, result in report["results"].items():
        for stage in result["stages"]:
            passes = f"{stage.get('forward_passes', '-')}/{stage.get('backward_passes', '-')}"
            lines.append(
                f"{entry:<12}{stage['attack']:<10}{stage['robust_accuracy']:>11.2%}"
                f"{stage['attacked']:>10}{stage['fooled']:>8}{passes:>12}{stage['seconds']:>9.1f}"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logging()
    report = run_or_exit(evaluate_workdir)
    path = report_path(FLAGS.workdir, report["checkpoint_step"], report["newest_checkpoint_step"])
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(format_report(report))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
