"""Where APART's learnable perturbation lives in a model, and the helpers that reach it.

Two variable collections, both separate from ``params``:

* ``perturb`` (:data:`PSI`): the learnable scalars psi. The top-level model holds
  ``alpha`` (input step size) and ``alpha_omega`` (scale of the stored initialization);
  every residual block holds its own ``alpha`` (the layer-wise step size). Models declare
  them only while initializing, so a forward pass never needs them.
* ``perturbations`` (:data:`SITES`): one additive site per block, on the block's
  pre-activated input h = relu(bn1(z)). Passing zeros there and differentiating gives
  dL/dh; passing non-zero values adds them to h. Without the collection a site is a no-op.

The site is built on Flax's ``Module.perturb`` (marked experimental), kept behind
:func:`site` so that one function changes if that API does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PSI = "perturb"
SITES = "perturbations"
SITE_NAME = "preact"

PyTree = Any


def site(module: nn.Module, h: jax.Array) -> jax.Array:
    """Marks ``h`` (B, H, W, C) as the block's perturbation site and returns h + perturbation."""
    return module.perturb(SITE_NAME, h, collection=SITES)


def declare_psi(module: nn.Module, *names: str) -> None:
    """Declares scalar psi variables (float32, init 0) in ``module``, only while initializing.

    Their values are set by the training method (:func:`apart_jax.methods.apart.init_psi`).
    """
    if module.is_initializing():
        for name in names:
            module.variable(PSI, name, jnp.zeros, (), jnp.float32)


def site_zeros(apply_fn, variables: PyTree, x: jax.Array, train: bool = True) -> dict[str, PyTree]:
    """Zeros shaped like every perturbation site of the model for input ``x`` (B, H, W, C).

    Computed with ``jax.eval_shape``: no forward pass runs.
    """
    shapes = jax.eval_shape(
        lambda v, x: apply_fn(v, x, train=train, mutable=[SITES, "batch_stats"])[1][SITES],
        variables,
        x,
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def layer_noise(psi: PyTree, directions: PyTree) -> PyTree:
    """APART's layer-wise noise alpha_i * direction_i for every site, a ``perturbations`` tree.

    Args:
      psi: the ``perturb`` collection; each block ``b`` holds the scalar ``psi[b]["alpha"]``.
      directions: a ``perturbations`` tree, ``directions[b]["preact"]`` of shape (B, H, W, C),
        typically sign(dL/dh) from the first pass (constants, no gradient flows into them).

    Returns:
      A tree shaped like ``directions``; gradients flow into each block's alpha.
    """
    return {
        block: {SITE_NAME: psi[block]["alpha"] * jax.lax.stop_gradient(d[SITE_NAME])}
        for block, d in directions.items()
    }


def block_alphas(psi: PyTree) -> dict[str, jax.Array]:
    """The layer-wise alphas of psi, in block order, keyed by block name."""
    return {name: value["alpha"] for name, value in psi.items() if isinstance(value, dict)}
