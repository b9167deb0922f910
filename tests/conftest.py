"""Shared fixtures: the embedded digits and tiny configurations. CPU only, no network."""

from __future__ import annotations

import os

import jax
import pytest

from apart_jax.config import default_config
from apart_jax.data import load_digits

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
