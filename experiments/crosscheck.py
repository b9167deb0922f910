"""Our AutoAttack against the original, on the same model: a run's checkpoint and its PyTorch copy.

    python -m experiments.crosscheck --workdir=DIR [--num_points=0] [--eps=...] [--step=STEP] \
        [--npz=FILE] [--batch_size=500] [--seed=0] [--out=FILE] [--torch_threads=0]

Reads checkpoint --step of DIR (default: the newest), exports it in memory to the PyTorch
twin of apart_jax.interop.torch_model (eval mode, float32) and, on the first --num_points
points of the run's test split (0 = all; loaded as experiments.evaluate does, BN in
inference mode), runs

* the original AutoAttack: ``pyautoattack.AutoAttack(model, norm="Linf", eps=eps,
  version="standard", device="cpu", seed=seed).run_standard_evaluation`` on the PyTorch copy;
* ours: ``apart_jax.attacks.suite.run_suite`` (APGD-CE, APGD-T, FAB-T, Square) on the JAX
  model, key ``jax.random.key(seed)``.

It prints both clean and robust accuracies, the per-example agreement (robust under both,
only under ours, only under the original, under neither), each stage's points attacked and
fooled, each side's wall time (ours includes its XLA compilation, also given alone) and their
ratio, and how far the two models' logits are apart on the clean points. Points robust only
under ours are cross-examined: whether the original's adversarial point also fools the JAX
model (then our attack is the weaker one, not the model different). The JSON report goes to
DIR/crosscheck.json, or --out. eps defaults to the run's eval_eps. Both sides use the
machine's cores (XLA's threads, torch's intra-op threads; the report gives torch's count).
When other processes load the cores, PyTorch's threads wait on each other: on the 2-core
machine with two busy processes beside it, the original AutoAttack on 8 points of a tiny
model ran over 80 s with 2 threads and 2.8 s with --torch_threads=1.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import app, flags

from apart_jax.attacks.suite import AUTOATTACK, run_suite
from apart_jax.compiling import jit
from apart_jax.config import ConfigError
from apart_jax.interop import export_state_dict, exported_architecture
from apart_jax.progress import progress_bar
from experiments.cli import parse_flags_or_exit, quiet_logging, run_or_exit
from experiments.evaluate import attack_points, load_run
from experiments.export import CROSSCHECK_FILE

FLAGS = flags.FLAGS

#: pyautoattack's per-batch and per-attack log lines (its logger "auto-attack", DEBUG).
_BATCH_LINE = re.compile(r"^(\S+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed")
_RUNNING_LINE = re.compile(r"^running (\S+)")


def define_flags() -> None:
    """Defines this program's flags (once, before ``app.run``)."""
    flags.DEFINE_string("workdir", None, "A training run's directory (config.json, checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_integer("num_points", 0, "Test points, the first ones (0 = all).")
    flags.DEFINE_string("npz", "", "Attack the x_test, y_test of this npz instead.")
    flags.DEFINE_float("eps", None, "L-inf radius (default: the run's eval_eps).")
    flags.DEFINE_integer("batch_size", 500, "Points per batch, for both implementations.")
    flags.DEFINE_integer("seed", 0, "Seed of both AutoAttacks.")
    flags.DEFINE_string("out", None, "Report path (default: DIR/crosscheck.json).")
    flags.DEFINE_integer(
        "torch_threads", 0, "PyTorch's intra-op threads (0: its default, one per core)."
    )
    flags.mark_flags_as_required(["workdir"])


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict[str, int]:
    """Counts of points robust under both, only ours, only theirs, neither; (N,) bool each."""
    return {
        "both": int(np.sum(ours & theirs)),
        "only_ours": int(np.sum(ours & ~theirs)),
        "only_original": int(np.sum(~ours & theirs)),
        "neither": int(np.sum(~ours & ~theirs)),
    }


def torch_logits(module: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits (N, K) float32 of the PyTorch module for NHWC images x (N, H, W, C) in [0, 1]."""
    import torch

    parts = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
            parts.append(module(batch.permute(0, 3, 1, 2).contiguous()).numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


class _AutoAttackLog(logging.Handler):
    """Reads pyautoattack's log: per attack the points attacked and fooled and the seconds,
    a progress bar per attack, and its warnings."""

    def __init__(self, robust: int, total: int, progress: bool):
        super().__init__(logging.DEBUG)
        self.robust, self.total, self.progress = robust, total, progress
        self.stages: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.bar = None
        self.started = time.perf_counter()

    def close_stage(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.stages and "seconds" not in self.stages[-1]:
            stage = self.stages[-1]
            stage["seconds"] = time.perf_counter() - self.started
            self.robust -= stage["fooled"]
            stage["robust_accuracy"] = self.robust / self.total

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(message)
        elif m := _RUNNING_LINE.match(message):
            self.close_stage()
            self.started = time.perf_counter()
            self.stages.append({"attack": m.group(1), "attacked": 0, "fooled": 0})
            self.bar = progress_bar(
                enabled=self.progress,
                total=self.robust,
                desc=f"original {m.group(1)} ({self.robust} robust)",
                unit="pt",
                leave=False,
            )
        elif (m := _BATCH_LINE.match(message)) and self.stages:
            self.stages[-1]["fooled"] += int(m.group(4))
            self.stages[-1]["attacked"] += int(m.group(5))
            if self.bar is not None:
                self.bar.update(int(m.group(5)))


@contextlib.contextmanager
def _listening(handler: logging.Handler) -> Iterator[None]:
    """Attaches ``handler`` to pyautoattack's logger at DEBUG, silencing its own output."""
    logger = logging.getLogger("auto-attack")
    saved = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def original_autoattack(
    module: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> dict[str, Any]:
    """The original standard L-inf AutoAttack on a PyTorch module, NHWC inputs x in [0, 1].

    Returns ``{"clean", "robust"}`` (N,) bool, ``x_adv`` (N, H, W, C) float32, ``stages``
    (attack, attacked, fooled, seconds, robust_accuracy), ``seconds``, ``threads`` (torch's
    intra-op threads) and ``warnings``.
    """
    import torch
    from pyautoattack import AutoAttack

    torch.manual_seed(seed)
    clean = np.argmax(torch_logits(module, x, batch_size), -1) == y
    x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    y_t = torch.from_numpy(y.astype(np.int64))
    attack = AutoAttack(module, norm="Linf", eps=eps, version="standard", device="cpu", seed=seed)
    log = _AutoAttackLog(int(clean.sum()), len(y), progress)
    start = time.perf_counter()
    with _listening(log):
        x_adv, _ = attack.run_standard_evaluation(x_t, y_t, batch_size=batch_size)
        log.close_stage()
    seconds = time.perf_counter() - start
    x_adv = x_adv.numpy().transpose(0, 2, 3, 1)
    robust = np.argmax(torch_logits(module, x_adv, batch_size), -1) == y
    return {
        "clean": clean,
        "robust": robust,
        "x_adv": np.ascontiguousarray(x_adv),
        "stages": log.stages,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "warnings": log.warnings,
    }


def crosscheck(
    apply_fn: Callable[..., Any],
    variables: Any,
    module: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Both AutoAttacks on the same points; the report's numbers (no file written).

    apply_fn(variables, x) -> logits is our model, ``module`` its PyTorch copy (eval mode);
    x: (N, H, W, C) float32 in [0, 1]; y: (N,) int.
    """
    logits_of = jit(apply_fn)
    ours_logits = np.concatenate(
        [
            np.asarray(logits_of(variables, x[s : s + batch_size]))
            for s in range(0, len(x), batch_size)
        ]
    )
    theirs_logits = torch_logits(module, x, batch_size)
    compile_seconds = []

    def listen(event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compile_seconds.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    start = time.perf_counter()
    try:
        ours = run_suite(
            apply_fn,
            variables,
            x,
            y,
            jax.random.key(seed),
            eps=eps,
            attacks=AUTOATTACK,
            batch_size=batch_size,
            progress=progress,
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    ours_seconds = time.perf_counter() - start
    theirs = original_autoattack(
        module, x, y, eps=eps, seed=seed, batch_size=batch_size, progress=progress
    )
    only_ours = np.flatnonzero(ours.robust & ~theirs["robust"])
    # Does the original's point, which fools the PyTorch copy, fool the JAX model too?
    fools_jax = (
        np.argmax(np.asarray(logits_of(variables, theirs["x_adv"][only_ours])), -1) != y[only_ours]
        if len(only_ours)
        else np.zeros(0, bool)
    )
    linf = np.abs(theirs["x_adv"] - x).reshape(len(x), -1).max(-1) if len(x) else np.zeros(0)
    return {
        "num_points": len(y),
        "eps": eps,
        "seed": seed,
        "batch_size": batch_size,
        "logits_max_abs_diff": float(np.max(np.abs(ours_logits - theirs_logits)))
        if len(x)
        else 0.0,
        "clean_predictions_agree": int(
            np.sum(np.argmax(ours_logits, -1) == np.argmax(theirs_logits, -1))
        ),
        "ours": {
            "clean_accuracy": ours.clean_accuracy,
            "robust_accuracy": ours.robust_accuracy,
            "seconds": ours_seconds,
            "compile_seconds": sum(compile_seconds),
            "stages": [stage.__dict__ for stage in ours.stages],
        },
        "original": {
            "implementation": "pyautoattack AutoAttack(norm='Linf', version='standard')",
            "clean_accuracy": float(np.mean(theirs["clean"])) if len(y) else float("nan"),
            "robust_accuracy": float(np.mean(theirs["robust"])) if len(y) else float("nan"),
            "seconds": theirs["seconds"],
            "torch_threads": theirs["threads"],
            "stages": theirs["stages"],
            "max_linf_perturbation": float(linf.max()) if len(linf) else 0.0,
            "warnings": theirs["warnings"],
        },
        "time_ratio_original_over_ours": theirs["seconds"] / ours_seconds,
        "agreement": agreement(ours.robust, theirs["robust"]),
        "only_ours_indices": only_ours.tolist(),
        "only_ours_fooled_jax_by_original_point": int(fools_jax.sum()),
        "only_original_indices": np.flatnonzero(~ours.robust & theirs["robust"]).tolist(),
    }


def format_report(report: dict[str, Any]) -> str:
    """The printed summary: accuracies, agreement, stages and times."""
    ours, theirs, agree = report["ours"], report["original"], report["agreement"]
    lines = [
        f"{report['method']} at step {report['checkpoint_step']}, {report['num_points']} test "
        f"points, Linf eps {report['eps']:.5f} ({report['eps'] * 255:.1f}/255), BN inference",
        f"logits JAX vs PyTorch: max |diff| {report['logits_max_abs_diff']:.2e}, clean "
        f"predictions agree on {report['clean_predictions_agree']}/{report['num_points']}",
        "",
        f"{'':<10}{'clean':>8}{'robust':>8}{'seconds':>9}",
        f"{'ours':<10}{ours['clean_accuracy']:>8.2%}{ours['robust_accuracy']:>8.2%}"
        f"{ours['seconds']:>9.1f}",
        f"{'original':<10}{theirs['clean_accuracy']:>8.2%}{theirs['robust_accuracy']:>8.2%}"
        f"{theirs['seconds']:>9.1f}",
        f"time original / ours: {report['time_ratio_original_over_ours']:.2f} (ours includes "
        f"{ours['compile_seconds']:.1f} s of XLA compilation; torch ran "
        f"{theirs['torch_threads']} threads)",
        "",
        f"robust under both {agree['both']}, only ours {agree['only_ours']} (of which the "
        f"original's point fools JAX too: {report['only_ours_fooled_jax_by_original_point']}), "
        f"only original {agree['only_original']}, neither {agree['neither']}",
        "",
        f"{'stage':<10}{'ours att/fooled':>17}{'s':>7}{'orig att/fooled':>17}{'s':>7}",
    ]
    theirs_stages = {s["attack"]: s for s in theirs["stages"]}
    for stage in ours["stages"]:
        other = theirs_stages.get(stage["attack"], {})
        lines.append(
            f"{stage['attack']:<10}{stage['attacked']:>8}/{stage['fooled']:<8}"
            f"{stage['seconds']:>7.1f}{other.get('attacked', 0):>8}/{other.get('fooled', 0):<8}"
            f"{other.get('seconds', 0.0):>7.1f}"
        )
    for warning in theirs["warnings"]:
        lines.append(f"original AutoAttack warned: {warning}")
    return "\n".join(lines)


def crosscheck_workdir() -> dict[str, Any]:
    import torch

    from apart_jax.interop.torch_model import load_into_torch

    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)
    trained, _ = load_run(FLAGS.workdir, FLAGS.step)
    config = trained.config
    x, y, split_points = attack_points(trained, FLAGS.npz, FLAGS.num_points)
    eps = config.eval_eps if FLAGS.eps is None else FLAGS.eps
    try:
        arch = exported_architecture(trained.model, trained.variables)
        state_dict = export_state_dict(trained.model, trained.variables, step=trained.step)
    except ValueError as error:
        raise ConfigError(f"{FLAGS.workdir}: {error}") from None
    module = load_into_torch(state_dict, arch)

    def apply_fn(v, z):
        return trained.model.apply(v, z, train=False)

    report = {
        "workdir": os.path.abspath(FLAGS.workdir),
        "checkpoint_step": trained.step,
        "method": config.method,
        "model": arch.name,
        "width": arch.width,
        # The JAX model computes as the run did (bfloat16 or float64 runs differ from the
        # float32 PyTorch copy by more than rounding); the copy's weights are float32.
        "jax_dtype": config.get("dtype", "float32"),
        "dataset": config.dataset,
        "npz": os.path.abspath(FLAGS.npz) if FLAGS.npz else None,
        "test_points": split_points,
        "bn_mode": "inference",
    }
    report.update(
        crosscheck(
            apply_fn,
            trained.variables,
            module,
            x,
            y,
            eps=eps,
            seed=FLAGS.seed,
            batch_size=FLAGS.batch_size,
        )
    )
    return report


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logging()
    report = run_or_exit(crosscheck_workdir)
    path = FLAGS.out or os.path.join(FLAGS.workdir, CROSSCHECK_FILE)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(format_report(report))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
