"""``dtype="float64"``: every part of every method's training step computes in float64."""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, module_env, run_module, tiny_config

from apart_jax.augment import Augmentation, crop_and_flip, uncrop_and_unflip
from apart_jax.config import ConfigError, default_config, resume_conflicts, validate_config
from apart_jax.methods import METHOD_NAMES
from apart_jax.models import create_model
from apart_jax.run import setup_run
from apart_jax.step import device_order, draw_batch


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_float64_step_holds_no_float32_value(method):
    """The lowered step (inputs, schedule, Omega, psi, metrics) has no f32 tensor at all."""
    with jax.enable_x64(True):
        run = setup_run(tiny_config(method=method, dtype="float64", train_size=64, pgd_steps=2))
        order = device_order(0, 1, 64, run.mesh)
        batch = draw_batch(run.state, order, jnp.int32(0), 32, run.augment)
        text = run.train_step.on_batch.lower(run.state, run.data, batch).as_text()
        state, metrics = run.train_step.on_batch(run.state, run.data, batch)
    assert re.findall(r"tensor<[0-9x]*f32>", text) == []
    assert "f64" in text
    floats = {
        x.dtype for x in jax.tree.leaves((state, metrics)) if jnp.issubdtype(x.dtype, jnp.floating)
    }
    assert floats == {jnp.dtype(jnp.float64)}
    assert np.isfinite(float(metrics["loss"]))


def test_float64_needs_x64_and_omega_float64_needs_dtype_float64():
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            create_model("small_cnn", num_classes=10, width=4, dtype="float64")
    config = default_config()
    config.omega_dtype = "float64"
    with pytest.raises(ConfigError, match="omega_dtype='float64' needs dtype='float64'"):
        validate_config(config)
    config.dtype = "float64"
    validate_config(config)


def test_omega_dtype_default_resolves_and_resumes_runs_that_saved_float32():
    config = default_config()
    assert config.omega_dtype is None
    saved = {"dtype": "float32", "omega_dtype": "float32"}
    assert resume_conflicts(saved, config) == []
    config.dtype = "float64"
    assert resume_conflicts({"dtype": "float64", "omega_dtype": "float64"}, config) == []
    assert resume_conflicts(saved, config) == [
        "dtype: 'float32' (saved) != 'float64'",
        "omega_dtype: 'float32' (saved) != 'float64'",
    ]


def test_crop_and_uncrop_run_under_x64_with_int32_offsets():
    with jax.enable_x64(True):
        frames = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float64).reshape(2, 6, 6, 1)
        aug = Augmentation(jnp.array([[0, 2], [1, 0]], jnp.int32), jnp.array([False, True]))
        windows = crop_and_flip(frames, aug, (4, 4))
        restored = uncrop_and_unflip(jnp.zeros_like(frames), windows, aug)
    np.testing.assert_array_equal(windows[0], frames[0, 0:4, 2:6])
    np.testing.assert_array_equal(windows[1], frames[1, 1:5, 0:4][:, ::-1])
    np.testing.assert_array_equal(restored[1, 1:5, 0:4], frames[1, 1:5, 0:4])


@pytest.mark.slow
def test_the_train_command_runs_apart_in_float64(tmp_path):
    """--config.dtype=float64 alone: x64 enabled, every stored array float64."""
    workdir = tmp_path / "run"
    done = run_module(
        "experiments.train",
        "--config=experiments/configs/digits.py",
        f"--workdir={workdir}",
        "--config.dtype=float64",
        "--config.epochs=1",
        "--config.train_size=256",
        "--config.test_size=64",
        "--config.width=4",
        "--config.model=small_cnn",
        "--config.progress=False",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dtypes = "sorted({str(x.dtype) for x in jax.tree.leaves((m.variables, m.psi))})"
    load = f"from apart_jax.run import load_model; m = load_model({str(workdir)!r})"
    check = f"import jax; {load}; print({dtypes})"
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, env=module_env(), capture_output=True, text=True
    )
    assert out.stdout.strip() == "['float64']", out.stderr[-2000:]
