"""Checkpoints and auto-resume: a resumed run ends exactly where an uninterrupted one does;
reading a trained model back without its training state or data."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from conftest import (
    RESUMABLE,
    assert_same_run,
    checkpoint_steps,
    host_leaves,
    tiny_config,
    write_npz,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from apart_jax.checkpoint import RunCheckpoints
from apart_jax.config import ConfigError
from apart_jax.data import DatasetError, load_digits
from apart_jax.logbook import read_rows
from apart_jax.restore import restore_checkpoint
from apart_jax.run import load_model, run_test_split, setup_run
from apart_jax.runguard import workdir_lock
from apart_jax.state import TrainState
from apart_jax.trainer import train_and_evaluate


@pytest.fixture
def uninterrupted(resumable_run):
    return resumable_run


def test_checkpoints_every_n_steps_and_at_the_end(uninterrupted):
    workdir, result = uninterrupted
    assert checkpoint_steps(workdir) == [3, 6, 9, 12]
    assert result.checkpoint_path == str(workdir / "checkpoints" / "12")
    assert result.resumed_from is None
    with RunCheckpoints(str(workdir)) as checkpoints:
        meta = checkpoints.read_meta(6)
    assert meta["config"]["method"] == "apart" and meta["omega_rows"] == 200
    assert meta["train_seconds"] > 0


@pytest.mark.parametrize(
    "checkpoint_every, resume_from",
    [(3, 6), (3, 9), (0, 8)],  # mid-epoch 2, mid-epoch 3, the end of epoch 2
)
def test_resuming_equals_an_uninterrupted_run(
    uninterrupted, tmp_path, checkpoint_every, resume_from
):
    workdir, _ = uninterrupted
    config = tiny_config(**{**RESUMABLE, "checkpoint_every": checkpoint_every})
    interrupted = tmp_path / "interrupted"
    if checkpoint_every == 3:
        shutil.copytree(workdir, interrupted)
    else:  # saving at other steps must not change the run
        train_and_evaluate(config, str(interrupted))
        assert checkpoint_steps(interrupted) == [4, 8, 12]
    for step in checkpoint_steps(interrupted):  # as if killed right after `resume_from`
        if step > resume_from:
            shutil.rmtree(interrupted / "checkpoints" / str(step))
    # metrics.jsonl still holds rows written after the kept checkpoint: they are redone.
    assert read_rows(str(interrupted / "metrics.jsonl"))[-1]["epoch"] == 3
    result = train_and_evaluate(config, str(interrupted))
    assert result.resumed_from == resume_from
    rows = assert_same_run(workdir, interrupted, config)
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_a_finished_run_is_not_trained_again(uninterrupted, tmp_path):
    workdir, first = uninterrupted
    again = tmp_path / "again"
    shutil.copytree(workdir, again)
    result = train_and_evaluate(tiny_config(**RESUMABLE), str(again))
    assert result.resumed_from == 12
    assert result.last == first.last
    assert checkpoint_steps(again) == [3, 6, 9, 12]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    config = tiny_config(**{**RESUMABLE, "epochs": 2, "checkpoint_every": 2, "checkpoint_keep": 2})
    train_and_evaluate(config, str(tmp_path))
    assert checkpoint_steps(tmp_path) == [6, 8]


@pytest.mark.parametrize(
    "change, message",
    [(dict(method="fgsm_plus"), "method"), (dict(width=8), "width"), (dict(seed=1), "seed")],
)
def test_a_checkpoint_of_another_run_is_refused(uninterrupted, tmp_path, change, message):
    workdir, _ = uninterrupted
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    before = {p: (other / p).read_bytes() for p in ("config.json", "metrics.jsonl")}
    with pytest.raises(ConfigError, match=f"different run.*{message}") as info:
        train_and_evaluate(tiny_config(**{**RESUMABLE, **change}), str(other))
    assert "\n" not in str(info.value)
    assert {p: (other / p).read_bytes() for p in before} == before  # nothing overwritten
    assert checkpoint_steps(other) == [3, 6, 9, 12]


def test_metrics_go_to_tensorboard(uninterrupted):
    workdir, result = uninterrupted
    scalars = EventAccumulator(str(workdir))
    scalars.Reload()
    rows = read_rows(result.metrics_path)
    assert [e.step for e in scalars.Scalars("pgd20_acc")] == [r["step"] for r in rows]
    np.testing.assert_allclose(
        [e.value for e in scalars.Scalars("clean_acc")], [r["clean_acc"] for r in rows], rtol=1e-6
    )
    assert {"train_loss", "psi/alpha", "psi/layer_alphas/1"} <= set(scalars.Tags()["scalars"])


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path):
    in_use = pytest.raises(ConfigError, match="in use by another training run")
    with workdir_lock(str(tmp_path)), in_use as info:  # a run in progress holds the lock
        train_and_evaluate(tiny_config(**RESUMABLE), str(tmp_path))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
    train_and_evaluate(tiny_config(**{**RESUMABLE, "epochs": 1}), str(tmp_path))  # released


def test_load_model_reads_only_the_inference_variables(uninterrupted):
    """load_model equals the trained state's weights, BN statistics and psi, bit for bit,
    and brings no Omega (unless asked for), optimizer state or data."""
    workdir, _ = uninterrupted
    config = tiny_config(**RESUMABLE)
    run = setup_run(config)
    for step in (6, None):
        state = restore_checkpoint(str(workdir), run, step)
        trained = load_model(str(workdir), step)
        assert trained.step == int(state.step) == (step or 12)
        assert set(trained.variables) == {"params", "batch_stats"}
        for mine, theirs in (
            (trained.variables["params"], state.params),
            (trained.variables["batch_stats"], state.batch_stats),
            (trained.psi, state.psi),
        ):
            assert jax.tree.structure(mine) == jax.tree.structure(theirs)
            for a, b in zip(host_leaves(mine), host_leaves(theirs), strict=True):
                np.testing.assert_array_equal(a, b)
        assert trained.omega is None
        assert not any(isinstance(v, TrainState) for v in vars(trained).values())
    assert trained.config.method == "apart" and trained.model.num_classes == 10
    assert (trained.num_train, trained.steps_per_epoch) == (200, 4)  # 64, 64, 64 and 8
    logits = trained.model.apply(trained.variables, np.zeros((2, 8, 8, 1), np.float32))
    assert logits.shape == (2, 10)
    with_omega = load_model(str(workdir), omega=True).omega
    np.testing.assert_array_equal(with_omega, restore_checkpoint(str(workdir), run).omega)


def test_load_model_names_the_saved_steps(uninterrupted, tmp_path):
    workdir, _ = uninterrupted
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 5 in .* \[3, 6, 9, 12\]"):
        load_model(str(workdir), 5)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(workdir / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_model(str(empty))
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model(str(tmp_path))


def test_a_runs_test_split_is_read_without_its_training_split(tmp_path):
    labels = np.array([0, 1, 3, 2, 1, 0, 3, 3])
    arrays = write_npz(
        tmp_path / "d.npz",
        x_train=np.zeros((20, 6, 6, 3), np.float32),  # invalid, but never read
        y_test=labels,
    )
    config = tiny_config(dataset="npz", npz_path=str(tmp_path / "d.npz"), test_size=6)
    x, y = run_test_split(config, num_classes=4)
    np.testing.assert_array_equal(x, arrays["x_test"][:6])
    np.testing.assert_array_equal(y, labels[:6])
    assert x.dtype == np.uint8 and y.dtype == np.int32
    with pytest.raises(DatasetError, match=r"^d.npz: y_test has labels in \[0, 3\], outside"):
        run_test_split(config, num_classes=3)
    digits = load_digits()
    x, y = run_test_split(tiny_config(test_size=0), num_classes=10)
    np.testing.assert_array_equal(x, digits.x_test)
    np.testing.assert_array_equal(y, digits.y_test)
