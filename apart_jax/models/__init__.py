"""Models, their variables, and loading weights from plain arrays.

A model's variables form a dict of collections: ``params`` (weights), ``batch_stats``
(BN running statistics) and ``perturb`` (APART's psi scalars, see
:mod:`apart_jax.models.perturbation`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from apart_jax.models.perturbation import PSI, SITES
from apart_jax.models.preact_resnet import (
    PreActBlock,
    PreActResNet,
    preact_resnet18,
    small_cnn,
    wide_resnet34_10,
)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": preact_resnet18,
    "small_cnn": small_cnn,
    "wide_resnet34_10": wide_resnet34_10,
}

__all__ = [
    "COMPUTE_DTYPES",
    "MODELS",
    "PSI",
    "SITES",
    "PreActBlock",
    "PreActResNet",
    "cast_variables",
    "create_model",
    "flatten_variables",
    "init_variables",
    "load_variables",
    "preact_resnet18",
    "small_cnn",
    "storage_dtype",
    "wide_resnet34_10",
]


# Computation dtypes by config name; float32 leaves it to the inputs (float64 under x64).
COMPUTE_DTYPES: dict[str, jnp.dtype | None] = {
    "float32": None,
    "bfloat16": jnp.bfloat16,
    "float64": jnp.float64,
}


def storage_dtype(dtype: str) -> jnp.dtype:
    """The dtype a run computing in ``dtype`` stores its weights, BN statistics and psi in:
    float64 for "float64" (which needs ``jax_enable_x64``), float32 otherwise."""
    return jnp.dtype(jnp.float64 if dtype == "float64" else jnp.float32)


def cast_variables(variables: Any, dtype: jnp.dtype) -> Any:
    """``variables`` (any pytree) with every floating-point leaf cast to ``dtype``."""
    return jax.tree.map(
        lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, variables
    )


def create_model(
    name: str, *, num_classes: int, width: int, shortcut_input: str = "raw", dtype: str = "float32"
) -> nn.Module:
    """Builds a model by registry name (see :data:`MODELS`).

    ``dtype`` names the computation dtype (see :data:`COMPUTE_DTYPES`): "bfloat16" runs
    convolutions and activations in bfloat16 with float32 parameters, BN statistics and logits;
    "float64" computes everything in float64 and needs ``jax_enable_x64`` (its variables are
    cast to float64 by the caller, :func:`cast_variables`).

    Raises:
      ValueError: for an unknown name or dtype, a width below 1, or "float64" without x64.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if width < 1:
        raise ValueError(f"model width must be positive, got {width}")
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(COMPUTE_DTYPES)}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype='float64' needs jax_enable_x64: call jax.config.update('jax_enable_x64', True)"
            " first (a run with --config.dtype=float64 does)"
        )
    return MODELS[name](
        num_classes=num_classes,
        width=width,
        shortcut_input=shortcut_input,
        dtype=COMPUTE_DTYPES[dtype],
    )


def init_variables(
    model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]
) -> dict[str, Any]:
    """Initializes ``params``, ``batch_stats`` and ``perturb`` for images of shape (H, W, C).

    The perturbation sites' zeros (``perturbations``) are dropped: they are per batch.
    """
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return {k: v for k, v in variables.items() if k != SITES}


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flattens variables into ``{"params/stem/kernel": array, ...}`` (NumPy copies)."""
    flat = traverse_util.flatten_dict(jax.device_get(dict(variables)), sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def load_variables(flat: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """Builds model variables from a plain dict of arrays keyed like :func:`flatten_variables`.

    Every key of ``template`` (for example ``init_variables(...)``) must be present with the
    same shape; extra keys are an error too. Values take the template's dtypes.

    Raises:
      ValueError: naming the missing, unexpected or mis-shaped entries.
    """
    expected = traverse_util.flatten_dict(dict(template), sep="/")
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"variables do not match the model: missing {missing}, unexpected {unexpected}"
        )
    loaded = {}
    for key, ref in expected.items():
        value = np.asarray(flat[key])
        if value.shape != ref.shape:
            raise ValueError(
                f"variable {key} has shape {value.shape}, the model expects {ref.shape}"
            )
        loaded[key] = jnp.asarray(value, dtype=ref.dtype)
    return traverse_util.unflatten_dict(loaded, sep="/")
