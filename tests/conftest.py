"""Shared fixtures: the embedded digits and tiny configurations. CPU only, no network."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from apart_jax.config import default_config
from apart_jax.data import load_digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Re-use compiled programs across test runs on the same machine.
jax.config.update(
    "jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "apart_jax_jit")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@pytest.fixture(scope="session")
def digits():
    return load_digits()


def tiny_config(**overrides):
    """A width-4 small CNN on the digits, batch 32, quiet; ``overrides`` set config keys."""
    config = default_config()
    config.model = "small_cnn"
    config.width = 4
    config.batch_size = 32
    config.epochs = 2
    config.eval_every = 1
    config.progress = False
    config.checkpoint = False
    for key, value in overrides.items():
        config[key] = value
    return config


LINEAR_FEATURES = 12


def linear_problem(seed: int, batch: int = 6, classes: int = 2):
    """A linear classifier x -> x W with inputs inside [0.25, 0.75] (room for eps <= 0.25).

    Returns (logits_fn, W (12, classes), x (batch, 12), y (batch,)).
    """
    k_w, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    w = jax.random.normal(k_w, (LINEAR_FEATURES, classes))
    x = jax.random.uniform(k_x, (batch, LINEAR_FEATURES), minval=0.25, maxval=0.75)
    y = jax.random.randint(k_y, (batch,), 0, classes)
    return (lambda x: x @ w), w, x, y


def module_env(devices: int | None = None) -> dict[str, str]:
    """The environment of a subprocess that imports this project, optionally with ``devices``
    simulated CPU devices."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=module_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
