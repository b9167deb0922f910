"""The robustness-drop analysis: its generators analytically, then the command end to end."""

import csv
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import linear_problem, run_module, tiny_config
from PIL import Image

from apart_jax.trainer import train_and_evaluate
from experiments.robustness_drop import (
    COLUMNS,
    choose_image_epochs,
    fgsm_plus_generator,
    random_signs,
)


@pytest.mark.parametrize("alpha", [0.01, 0.3])
def test_fgsm_plus_generator_on_a_linear_model(alpha):
    """Two classes, logits x W: sign(dCE/dx) = sign(w_other - w_true) wherever x is, so the
    generator's point is x + clip(clip(alpha_omega * omega, +-eps) + alpha * that sign, +-eps),
    clipped to [0, 1]."""
    logits_fn, w, x, y = linear_problem(0)
    omega = jax.random.uniform(jax.random.key(1), x.shape, minval=-1.0, maxval=1.0)
    eps, alpha_omega = 0.1, 0.2
    direction = jnp.sign((w[:, 1 - y] - w[:, y]).T)
    delta = jnp.clip(jnp.clip(alpha_omega * omega, -eps, eps) + alpha * direction, -eps, eps)
    got = fgsm_plus_generator(logits_fn, x, y, omega, alpha, alpha_omega, eps=eps)
    np.testing.assert_allclose(got, jnp.clip(x + delta, 0.0, 1.0), atol=1e-7)
    assert float(jnp.max(jnp.abs(got - x))) <= eps + 1e-7


def test_random_signs_move_every_pixel_by_eps_unless_clipped():
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype(np.float32)
    eps = 0.05
    moved = random_signs(jax.random.key(0), x, eps)
    step = np.abs(moved - x)
    inside = (x > eps) & (x < 1 - eps)
    np.testing.assert_allclose(step[inside], eps, rtol=1e-5)
    assert np.all(step <= eps + 1e-7) and moved.min() >= 0 and moved.max() <= 1
    up = (moved - x)[inside] > 0
    assert 0.45 < up.mean() < 0.55  # both signs, about equally often


def test_image_epochs_are_the_best_and_the_worst_after_it():
    rows = [{"epoch": e, "fgsm_pgd20_acc": a} for e, a in enumerate([0.1, 0.4, 0.3, 0.0, 0.2], 1)]
    assert choose_image_epochs(rows) == (2, 4)
    # The best epoch last: no later epoch, so both pictures show it.
    rows = [{"epoch": e, "fgsm_pgd20_acc": a} for e, a in enumerate([0.1, 0.2], 1)]
    assert choose_image_epochs(rows) == (2, 2)


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """FGSM and FGSM+ runs on 256 digits, 3 epochs, a checkpoint kept at every epoch end."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("fgsm", "fgsm_plus"):
        config = tiny_config(
            method=method,
            epochs=3,
            train_size=256,
            test_size=64,
            eps=32 / 255,
            eval_eps=32 / 255,
            checkpoint=True,
            checkpoint_every=0,
            checkpoint_keep=3,
            tensorboard=False,
        )
        train_and_evaluate(config, str(root / method))
    return root


@pytest.mark.slow
def test_command_writes_one_row_per_epoch_and_both_figures(trained_runs, tmp_path):
    out = tmp_path / "analysis"
    fgsm, plus = str(trained_runs / "fgsm"), str(trained_runs / "fgsm_plus")
    done = run_module(
        "experiments.robustness_drop",
        f"--fgsm={fgsm}",
        f"--reference={plus}",
        f"--fgsm_plus={plus}",
        "--num_points=48",
        "--train_points=32",
        "--num_images=4",
        f"--out={out}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out / "robustness_drop.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [r["step"] for r in rows] == ["8", "16", "24"]
    assert tuple(rows[0]) == COLUMNS
    values = [{k: float(v) for k, v in r.items()} for r in rows]
    # The reference and its random signs do not change with i; (a) is their difference.
    assert len({v["ref_random_acc"] for v in values}) == 1
    for v in values:
        assert math.isclose(
            v["transfer_gap"],
            v["ref_random_acc"] - v["ref_fgsm_acc"],
            abs_tol=2e-6,  # 6 decimals in the CSV
        )
        for key in COLUMNS[2:]:
            assert math.isfinite(v[key]), key
        for key in ("ref_random_acc", "ref_fgsm_acc", "fgsm_pgd20_acc", "fgsm_plus_pgd20_acc"):
            assert 0.0 <= v[key] <= 1.0 and abs(v[key] * 48 - round(v[key] * 48)) < 1e-3
    assert Image.open(out / "robustness_drop.png").size == (1200, 450)
    # One row of images and two rows of perturbations, 4 columns.
    width, height = Image.open(out / "perturbations.png").size
    assert (width, height) == (640, 510)


@pytest.mark.slow
def test_a_reference_that_is_not_a_run_is_refused(trained_runs, tmp_path):
    """A --reference directory without config.json: one line, exit 2."""
    fgsm = str(trained_runs / "fgsm")
    done = run_module(
        "experiments.robustness_drop",
        f"--fgsm={fgsm}",
        f"--reference={tmp_path}",
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {os.path.join(str(tmp_path), 'config.json')} not found: "
        "expected a directory written by experiments.train"
    ]
