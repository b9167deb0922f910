"""The robustness-drop analysis of the paper (docs/algorithm.md#robustness-drop-diagnostics).

    python -m experiments.robustness_drop --fgsm=DIR --reference=DIR [--fgsm_plus=DIR] \
        [--num_points=0] [--train_points=256] [--image_epochs=A,B] [--out=DIR] [--seed=0]

``--fgsm`` (and ``--fgsm_plus``) are training runs that kept a checkpoint at the end of every
epoch (``checkpoint_every=0`` and ``checkpoint_keep`` >= epochs); ``--reference`` is a trained
run (PGD-10 in the paper) whose newest checkpoint is the fixed reference model. For every
epoch i of the FGSM run it measures, on the FGSM run's test split (its first --num_points):

* ``ref_random_acc``: Acc(reference, random signs): x + eps * s, s uniform in {-1, +1};
* ``ref_fgsm_acc``: Acc(reference, FGSM(theta_FGSM@i)): the FGSM run's own perturbations,
  generated at its epoch-i weights, applied to the reference model;
* ``transfer_gap`` = ref_random_acc - ref_fgsm_acc (diagnostic (a); about 0 when the
  generator has collapsed into noise);
* ``fgsm_pgd20_acc`` and ``fgsm_plus_pgd20_acc``: PGD-20 accuracy of each run's epoch-i
  model (eps and steps of the runs' evaluation protocol, one uniform random start);
* ``fgsm_whitebox_gap`` and ``fgsm_plus_whitebox_gap`` (diagnostic (b)): on the first
  --train_points training images (not augmented), the epoch-i model's mean cross-entropy
  under PGD-20 minus under its own generator's perturbation, both at the training eps. The
  FGSM+ generator is its pass-1 step from the stored Omega (centre crop) and psi.

Accuracies count a point as correct when the prediction on the perturbed input is right
(``ref_*``) or when it is right both clean and attacked (``*_pgd20_acc``). Every model runs
with BN in inference mode, generators included (training runs them in training mode).
Perturbations use the FGSM run's training eps; random signs use the same eps.

Writes into --out (default: the --fgsm directory): ``robustness_drop.csv`` (one row per
epoch), ``robustness_drop.png`` (accuracies and gaps per epoch) and ``perturbations.png``
(test images beside the FGSM run's perturbations at two epochs: --image_epochs, or by
default the epoch of best FGSM PGD-20 accuracy and the worst epoch after it, i.e. before
and after a collapse if there is one).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags

from apart_jax.attacks import clip_with_grad, fgsm, loss_gradient, pgd
from apart_jax.compiling import jit
from apart_jax.config import ConfigError
from apart_jax.data import Dataset, to_unit_range
from apart_jax.evaluation import clean_and_robust
from apart_jax.progress import progress_bar
from apart_jax.run import load_model, run_model
from apart_jax.step import augment_spec, epoch_batch_sizes
from experiments.cli import parse_flags_or_exit, quiet_logging, run_or_exit
from experiments.drop_figures import plot_curves, plot_perturbations
from experiments.runs import epoch_steps, load_run_data

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags (once, before ``app.run``)."""
    flags.DEFINE_string("fgsm", None, "FGSM training run with a checkpoint per epoch.")
    flags.DEFINE_string("reference", None, "Reference run (PGD-10 trained); its newest checkpoint.")
    flags.DEFINE_string(
        "fgsm_plus", None, "Optional FGSM+ (or APART) run with per-epoch checkpoints."
    )
    flags.DEFINE_integer("num_points", 0, "Test points, the first ones of the split (0 = all).")
    flags.DEFINE_integer("train_points", 256, "Training points for the white-box gap (0 = skip).")
    flags.DEFINE_list("image_epochs", [], "Two epochs for perturbations.png (default: automatic).")
    flags.DEFINE_integer("num_images", 6, "Test images shown in perturbations.png.")
    flags.DEFINE_integer("seed", 0, "Seed of the random signs and PGD starts.")
    flags.DEFINE_string("out", None, "Output directory (default: the --fgsm directory).")
    flags.mark_flags_as_required(["fgsm", "reference"])


COLUMNS = (
    "epoch",
    "step",
    "ref_random_acc",
    "ref_fgsm_acc",
    "transfer_gap",
    "fgsm_pgd20_acc",
    "fgsm_plus_pgd20_acc",
    "fgsm_whitebox_gap",
    "fgsm_plus_whitebox_gap",
)
PyTree = Any


class Probe:
    """A run's measurements, each compiled once and reused for every checkpoint of the run.

    Every function takes the model's ``variables`` (params and BN statistics, inference
    mode) as an argument, inputs x (N, H, W, C) float32 in [0, 1] and labels y (N,) int.
    ``dataset`` is the run's data in host memory; ``pad`` its augmentation's padding.
    """

    def __init__(self, config: ml_collections.ConfigDict, dataset: Dataset):
        self.config, self.dataset = config, dataset
        self.pad = augment_spec(config).pad
        model = run_model(config, dataset.num_classes)
        c = config

        def logits(variables, x):
            return model.apply(variables, x, train=False)

        self.predict = jit(lambda v, x: jnp.argmax(logits(v, x), -1))
        self.mean_loss = jit(
            lambda v, x, y: jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(logits(v, x), y)
            )
        )
        self.fgsm = jit(
            lambda v, x, y, eps: fgsm(
                functools.partial(logits, v), x, y, jax.random.key(0), eps=eps
            )  # FGSM draws no noise: the key is unused
        )
        self.pgd_robust = jit(
            lambda v, x, y, key: clean_and_robust(
                functools.partial(logits, v), x, y, key,
                eps=c.eval_eps, step_size=c.eval_pgd_step_size, steps=c.eval_pgd_steps,
            )[1]
        )  # fmt: skip
        self.pgd_train = jit(
            lambda v, x, y, key: pgd(
                functools.partial(logits, v), x, y, key,
                eps=c.eps, step_size=c.eval_pgd_step_size, steps=c.eval_pgd_steps,
            )
        )  # fmt: skip
        self.fgsm_plus = jit(
            lambda v, x, y, omega, alpha, alpha_omega: fgsm_plus_generator(
                functools.partial(logits, v), x, y, omega, alpha, alpha_omega, eps=c.eps
            )
        )

    @property
    def steps_per_epoch(self) -> int:
        c = self.config
        return len(epoch_batch_sizes(len(self.dataset.y_train), c.batch_size, c.drop_remainder))


def load_probe(workdir: str) -> Probe:
    """The :class:`Probe` of the run in ``workdir`` (its config and data; no checkpoint)."""
    return Probe(*load_run_data(workdir))


@dataclasses.dataclass
class Model:
    """A run's model at one checkpoint, with the run's compiled :class:`Probe`."""

    probe: Probe
    variables: PyTree
    psi: PyTree
    omega: jax.Array | None


def checkpoint_model(
    workdir: str, probe: Probe, step: int | None = None, *, omega: bool = False
) -> Model:
    """The model of ``workdir`` at checkpoint ``step`` (default: the newest); with its Omega
    if ``omega`` (for :func:`generator_points`)."""
    try:
        trained = load_model(workdir, step, omega=omega)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    return Model(probe, trained.variables, trained.psi, trained.omega)


def random_signs(key: jax.Array, x: np.ndarray, eps: float) -> np.ndarray:
    """x (N, H, W, C) in [0, 1] moved by eps * s, s uniform in {-1, +1} per pixel, clipped."""
    signs = jax.random.rademacher(key, x.shape, jnp.float32)
    return np.asarray(jnp.clip(x + eps * signs, 0.0, 1.0))


def fgsm_plus_generator(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    omega: jax.Array,
    alpha: jax.Array,
    alpha_omega: jax.Array,
    *,
    eps: float,
) -> jax.Array:
    """FGSM+'s perturbed input (APART's input part): one sign step from the stored init.

    x (B, H, W, C) in [0, 1]; omega (B, H, W, C), the examples' Omega frames cropped to x;
    alpha, alpha_omega: psi's scalars. Returns x_adv (B, H, W, C), within eps of x, in [0, 1].
    """
    delta0 = clip_with_grad(alpha_omega * omega, -eps, eps)
    x0 = clip_with_grad(x + delta0, 0.0, 1.0)
    delta = jnp.clip(delta0 + alpha * jnp.sign(loss_gradient(logits_fn, x0, y)), -eps, eps)
    return jnp.clip(x + delta, 0.0, 1.0)


def generator_points(model: Model, x: np.ndarray, y: np.ndarray) -> jax.Array:
    """The perturbed training points (N, H, W, C) that ``model``'s own method generates.

    Runs without Omega (FGSM, FGSM-RS, PGD) use an FGSM step at the training eps (no random
    start: the analysis is of FGSM's generator); FGSM+ and APART take Omega's rows 0..N-1
    (the first N training examples), centre-cropped, with psi's alpha and alpha_omega.
    """
    probe, eps = model.probe, model.probe.config.eps
    if model.omega is None:
        return probe.fgsm(model.variables, x, y, eps)
    pad = probe.pad
    height, width = x.shape[1:3]
    omega = model.omega[: len(y), pad : pad + height, pad : pad + width].astype(jnp.float32)
    psi = model.psi
    return probe.fgsm_plus(model.variables, x, y, omega, psi["alpha"], psi["alpha_omega"])


def accuracy(model: Model, x: np.ndarray | jax.Array, y: np.ndarray) -> float:
    """Plain accuracy of ``model`` on (x, y)."""
    return float(jnp.mean(model.probe.predict(model.variables, x) == y))


def pgd_accuracy(model: Model, x: np.ndarray, y: np.ndarray, key: jax.Array) -> float:
    """Accuracy (correct clean and under the run's evaluation PGD) of ``model`` on (x, y)."""
    return float(jnp.mean(model.probe.pgd_robust(model.variables, x, y, key)))


def whitebox_gap(model: Model, x: np.ndarray, y: np.ndarray, key: jax.Array) -> float:
    """Mean cross-entropy under PGD (training eps) minus under the model's own generator."""
    probe, v = model.probe, model.variables
    x_pgd = probe.pgd_train(v, x, y, key)
    return float(
        probe.mean_loss(v, x_pgd, y) - probe.mean_loss(v, generator_points(model, x, y), y)
    )


def analyse(
    fgsm_dir: str,
    reference_dir: str,
    fgsm_plus_dir: str | None,
    *,
    num_points: int,
    train_points: int,
    seed: int,
) -> tuple[list[dict], dict[str, Any]]:
    """The per-epoch table (rows keyed by :data:`COLUMNS`) and what the figures need."""
    fgsm_probe = load_probe(fgsm_dir)
    data = fgsm_probe.dataset
    if num_points > len(data.y_test):
        raise ConfigError(f"num_points={num_points} but the test split has {len(data.y_test)}")
    if train_points > len(data.y_train):
        raise ConfigError(f"train_points={train_points} but there are {len(data.y_train)}")
    x = np.asarray(to_unit_range(data.x_test[: num_points or None]))
    y = data.y_test[: num_points or None]
    x_train = np.asarray(to_unit_range(data.x_train[:train_points]))
    y_train = data.y_train[:train_points]
    eps = fgsm_probe.config.eps
    key = jax.random.key(seed)

    reference = checkpoint_model(reference_dir, load_probe(reference_dir))
    if reference.probe.dataset.image_shape != data.image_shape:
        raise ConfigError("--reference was trained on images of another shape than --fgsm")
    ref_random = accuracy(reference, random_signs(jax.random.fold_in(key, 1), x, eps), y)

    runs = {"fgsm": (fgsm_dir, fgsm_probe)}
    if fgsm_plus_dir:
        runs["fgsm_plus"] = (fgsm_plus_dir, load_probe(fgsm_plus_dir))
    epochs = {name: epoch_steps(d, p.steps_per_epoch) for name, (d, p) in runs.items()}

    rows = []
    bar = progress_bar(enabled=True, iterable=epochs["fgsm"].items(), desc="epochs", unit="epoch")
    for epoch, step in bar:
        row = dict.fromkeys(COLUMNS, math.nan) | {"epoch": epoch, "step": step}
        fgsm_model = checkpoint_model(fgsm_dir, fgsm_probe, step, omega=True)
        row["ref_random_acc"] = ref_random
        row["ref_fgsm_acc"] = accuracy(
            reference, fgsm_probe.fgsm(fgsm_model.variables, x, y, eps), y
        )
        row["transfer_gap"] = ref_random - row["ref_fgsm_acc"]
        for name, (workdir, probe) in runs.items():
            if epoch not in epochs[name]:
                continue
            model = (
                fgsm_model
                if name == "fgsm"
                else checkpoint_model(workdir, probe, epochs[name][epoch], omega=True)
            )
            epoch_key = jax.random.fold_in(key, epoch)
            row[f"{name}_pgd20_acc"] = pgd_accuracy(model, x, y, epoch_key)
            if train_points:
                row[f"{name}_whitebox_gap"] = whitebox_gap(model, x_train, y_train, epoch_key)
        rows.append(row)
    return rows, {"fgsm_probe": fgsm_probe, "x": x, "y": y, "eps": eps}


def choose_image_epochs(rows: Sequence[dict]) -> tuple[int, int]:
    """The epoch of best FGSM PGD-20 accuracy and the worst epoch after it (or the last)."""
    best = max(range(len(rows)), key=lambda i: (rows[i]["fgsm_pgd20_acc"], -i))
    after = rows[best + 1 :] or rows[best:]
    worst = min(after, key=lambda r: r["fgsm_pgd20_acc"])
    return rows[best]["epoch"], worst["epoch"]


def write_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: row[k] if k in ("epoch", "step") else f"{row[k]:.6f}" for k in COLUMNS}
            )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logging()

    def job() -> None:
        if FLAGS.image_epochs and len(FLAGS.image_epochs) != 2:
            raise ConfigError(f"--image_epochs needs two epochs, got {FLAGS.image_epochs}")
        rows, context = analyse(
            FLAGS.fgsm,
            FLAGS.reference,
            FLAGS.fgsm_plus,
            num_points=FLAGS.num_points,
            train_points=FLAGS.train_points,
            seed=FLAGS.seed,
        )
        out = FLAGS.out or FLAGS.fgsm
        os.makedirs(out, exist_ok=True)
        write_csv(rows, os.path.join(out, "robustness_drop.csv"))
        eps = context["eps"]
        title = (
            f"{os.path.basename(os.path.normpath(FLAGS.fgsm))} (eps {eps * 255:.0f}/255), "
            f"reference {os.path.basename(os.path.normpath(FLAGS.reference))}, "
            f"{len(context['y'])} test points"
        )
        plot_curves(rows, os.path.join(out, "robustness_drop.png"), title)
        chosen = [int(e) for e in FLAGS.image_epochs] or list(choose_image_epochs(rows))
        steps = {r["epoch"]: r["step"] for r in rows}
        missing = [e for e in chosen if e not in steps]
        if missing:
            raise ConfigError(f"--image_epochs {missing}: no checkpoint (epochs {list(steps)})")
        x, y = context["x"][: FLAGS.num_images], context["y"][: FLAGS.num_images]
        probe = context["fgsm_probe"]
        perturbations = {
            e: np.asarray(
                probe.fgsm(checkpoint_model(FLAGS.fgsm, probe, steps[e]).variables, x, y, eps)
            )
            - x
            for e in chosen
        }
        plot_perturbations(x, perturbations, eps, os.path.join(out, "perturbations.png"))
        for row in rows:
            print(
                ", ".join(
                    f"{k} {row[k]:.4f}" if isinstance(row[k], float) else f"{k} {row[k]}"
                    for k in COLUMNS
                )
            )
        print(f"written: {out}/robustness_drop.csv, robustness_drop.png, perturbations.png")

    run_or_exit(job)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
