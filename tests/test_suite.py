"""Attack suites on a small trained model, and the evaluate command."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from conftest import CompileCounter, run_module, tiny_config, write_npz

from apart_jax.attacks import AUTOATTACK, make_attack, measure_passes, run_suite
from apart_jax.attacks.suite import HOST_DRIVEN
from apart_jax.config import ConfigError
from apart_jax.data import DatasetError
from apart_jax.models import create_model
from apart_jax.restore import restore_checkpoint
from apart_jax.run import TrainedModel, setup_run
from apart_jax.trainer import train_and_evaluate
from experiments.evaluate import attack_points

pytestmark = pytest.mark.slow  # trains a run, then attacks it with every attack and the commands

EPS = 24 / 255
POINTS = 96


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A width-8 small CNN trained with FGSM on the digits for 6 epochs, checkpointed."""
    workdir = tmp_path_factory.mktemp("fgsm_digits")
    config = tiny_config(
        method="fgsm",
        width=8,
        epochs=6,
        batch_size=64,
        eval_every=6,
        checkpoint=True,
        eps=EPS,
        eval_eps=EPS,
    )
    train_and_evaluate(config, str(workdir))
    run = setup_run(config)
    state = restore_checkpoint(str(workdir), run)
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def apply_fn(v, x):
        return run.model.apply(v, x, train=False)

    x = run.dataset.x_test[:POINTS].astype(np.float32) / 255
    return workdir, apply_fn, variables, x, run.dataset.y_test[:POINTS]


def robust_under(trained, names, batch_size=48, host_loop=None):
    _, apply_fn, variables, x, y = trained
    return run_suite(
        apply_fn, variables, x, y, jax.random.key(0), attacks=names, eps=EPS,
        batch_size=batch_size, host_loop=host_loop,
    )  # fmt: skip


def test_stronger_attacks_leave_fewer_robust_points(trained):
    clean = robust_under(trained, []).robust_accuracy
    fgsm = robust_under(trained, ["fgsm"]).robust_accuracy
    pgd = robust_under(trained, ["pgd20"]).robust_accuracy
    apgd = robust_under(trained, ["apgd-ce"]).robust_accuracy
    assert clean >= fgsm >= pgd >= apgd
    assert clean > apgd  # the model is attackable: the ordering is not all ties
    assert clean > 0.5


def test_autoattack_is_the_worst_case_of_its_components(trained):
    _, apply_fn, variables, x, y = trained
    result = robust_under(trained, list(AUTOATTACK))
    assert [s.attack for s in result.stages] == list(AUTOATTACK)
    accuracies = [s.robust_accuracy for s in result.stages]
    assert accuracies == sorted(accuracies, reverse=True)
    assert result.robust_accuracy == accuracies[-1]
    for name in AUTOATTACK:
        assert result.robust_accuracy <= robust_under(trained, [name]).robust_accuracy
    # Stage s attacks exactly the points still robust after stage s - 1.
    attacked = [s.attacked for s in result.stages]
    remaining = [round(a * POINTS) for a in [result.clean_accuracy, *accuracies[:-1]]]
    assert attacked == remaining
    fooled = ~result.robust & (np.argmax(apply_fn(variables, x), -1) == y)
    predictions = np.asarray(np.argmax(apply_fn(variables, result.x_adv), -1))
    assert np.all(predictions[fooled] != y[fooled])
    assert np.max(np.abs(result.x_adv - x)) <= EPS + 1e-5


def test_autoattack_driven_from_the_host_finds_what_the_compiled_attacks_find(trained):
    host = robust_under(trained, list(AUTOATTACK), host_loop=True)
    compiled = robust_under(trained, list(AUTOATTACK), host_loop=False)
    assert [(s.attacked, s.fooled) for s in host.stages] == [
        (s.attacked, s.fooled) for s in compiled.stages
    ]
    assert sum(s.fooled for s in host.stages) > 0
    np.testing.assert_array_equal(host.robust, compiled.robust)
    np.testing.assert_allclose(host.x_adv, compiled.x_adv, atol=1e-6)


def test_measured_passes_of_standard_attacks(trained):
    _, apply_fn, variables, x, y = trained
    expected = {"fgsm": (1, 1), "pgd20": (20, 20), "cw": (20, 20)}
    for name, (forward, backward) in expected.items():
        count = measure_passes(apply_fn, variables, make_attack(name, eps=EPS), x[:2], y[:2])
        assert (count.forward, count.backward) == (forward, backward)
    square = measure_passes(apply_fn, variables, make_attack("square", eps=EPS), x[:2], y[:2])
    assert square.backward == 0 and 0 < square.forward <= 5000


def compilations(run):
    """``(run(), names of the programs compiled while it ran)``."""
    with CompileCounter() as compiled:
        return run(), compiled.names


@pytest.mark.parametrize("host_loop", [False, True])
def test_a_suite_compiles_once_per_attack_and_batch_shape(trained, host_loop):
    jax.block_until_ready(jax.random.fold_in(jax.random.key(0), 1))  # eager key ops, compiled
    # A batch size no other test uses (the two cases neither: they share Square's program):
    # every program of this run is new to the process.
    batch_size = 44 if host_loop else 40
    run = functools.partial(robust_under, trained, list(AUTOATTACK), batch_size, host_loop)
    first, in_first_run = compilations(run)
    second, in_second_run = compilations(run)
    attacking = sum(stage.attacked > 0 for stage in first.stages)
    assert attacking >= 2
    if not host_loop:
        # One program for the clean predictions, one per attack that had points to attack
        # (with the predictions at its points); the padded last batch reuses them.
        assert sorted(in_first_run) == ["jit(_attack_batch)"] * attacking + ["jit(_classify)"]
    else:
        # One iteration per loop body of each attack the host drives (APGD-T's and FAB-T's
        # target classes share theirs), whatever the number of batches, targets and
        # restarts, though the restored weights are placed on a one-device mesh. Square is
        # compiled whole.
        from_host = sum(s.attacked > 0 and s.attack in HOST_DRIVEN for s in first.stages)
        assert from_host == attacking - 1
        assert in_first_run.count("jit(run)") == from_host
        assert in_first_run.count("jit(_attack_batch)") == 1
    # The second run compiles nothing.
    assert in_second_run == []
    np.testing.assert_array_equal(second.x_adv, first.x_adv)
    # make_attack hands out the same callable for the same settings, so jit finds it again.
    assert make_attack("apgd-t", eps=EPS) is make_attack("apgd-t", eps=float(EPS))


def evaluate(*args):
    return run_module("experiments.evaluate", *args)


def test_evaluate_command_writes_every_number_and_the_protocol(trained):
    workdir = trained[0]
    proc = evaluate(
        f"--workdir={workdir}", "--suite=fgsm,pgd20", "--num_points=40", "--batch_size=16"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((workdir / "eval.json").read_text())
    assert report["num_points"] == 40 and report["checkpoint_step"] == 6 * 23
    assert report["bn_mode"] == "inference" and report["eps"] == pytest.approx(EPS)
    assert report["host_loop"] == (jax.default_backend() == "cpu")
    pgd = report["results"]["pgd20"]["stages"][0]
    assert pgd["protocol"]["steps"] == 20 and pgd["protocol"]["restarts"] == 1
    assert pgd["protocol"]["step_size"] == pytest.approx(EPS / 4)
    assert (pgd["forward_passes"], pgd["backward_passes"]) == (20, 20)
    assert report["results"]["pgd20"]["robust_accuracy"] <= report["clean_accuracy"]
    assert "pgd20" in proc.stdout and "written:" in proc.stdout


def test_evaluate_command_rejects_a_directory_without_a_run(tmp_path):
    proc = evaluate(f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "config.json" in proc.stderr


def test_attack_points_take_the_first_points_of_the_split_or_of_another_npz(tmp_path):
    run_npz = write_npz(tmp_path / "run.npz", test=8)
    other = write_npz(tmp_path / "other.npz", test=12)
    config = tiny_config(dataset="npz", npz_path=str(tmp_path / "run.npz"))
    model = create_model("small_cnn", num_classes=4, width=4)
    trained = TrainedModel(config, model, {}, {}, step=0, num_train=20, omega=None)

    x, y, available = attack_points(trained, num_points=5)
    assert (x.dtype, x.shape, available) == (np.float32, (5, 6, 6, 3), 8)
    np.testing.assert_array_equal(x * 255.0, run_npz["x_test"][:5])
    np.testing.assert_array_equal(y, run_npz["y_test"][:5])
    x, y, available = attack_points(trained, npz=str(tmp_path / "other.npz"))
    assert available == 12
    np.testing.assert_array_equal(y, other["y_test"])
    with pytest.raises(ConfigError, match="num_points=9 but only 8 test points"):
        attack_points(trained, num_points=9)
    write_npz(tmp_path / "small.npz", image_shape=(4, 4, 3))
    with pytest.raises(DatasetError, match="do not fit"):
        attack_points(trained, npz=str(tmp_path / "small.npz"))
