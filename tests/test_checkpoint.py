"""Checkpoints and auto-resume: a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import (
    RESUMABLE,
    assert_same_run,
    checkpoint_steps,
    tiny_config,
)

from apart_jax.checkpoint import RunCheckpoints
from apart_jax.config import ConfigError
from apart_jax.logbook import read_rows
from apart_jax.runguard import workdir_lock
from apart_jax.summary import read_scalars
from apart_jax.train import train_and_evaluate


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = train_and_evaluate(tiny_config(**RESUMABLE), str(workdir))
    return workdir, result


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
    scalars = read_scalars(str(workdir))
    rows = read_rows(result.metrics_path)
    assert [step for step, _ in scalars["pgd20_acc"]] == [r["step"] for r in rows]
    np.testing.assert_allclose(
        [v for _, v in scalars["clean_acc"]], [r["clean_acc"] for r in rows], rtol=1e-6
    )
    assert {"train_loss", "psi/alpha", "psi/layer_alphas/1"} <= set(scalars)


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path):
    in_use = pytest.raises(ConfigError, match="in use by another training run")
    with workdir_lock(str(tmp_path)), in_use as info:  # a run in progress holds the lock
        train_and_evaluate(tiny_config(**RESUMABLE), str(tmp_path))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
    train_and_evaluate(tiny_config(**{**RESUMABLE, "epochs": 1}), str(tmp_path))  # released
