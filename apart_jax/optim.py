"""The release's optimizers: SGD with coupled weight decay and a cyclic triangular schedule.

This mirrors PyTorch's ``SGD(momentum, weight_decay)`` driven per iteration by
``CyclicLR(base_lr=0, max_lr=peak, cycle_momentum=True, base_momentum=0.8,
max_momentum=0.9)`` with equal up and down phases:

* learning rate at update t: ``peak * tri(t)``, with ``tri(t) = min(2 r, 2 (T - r)) / T`` for
  ``r = t mod T``, rising 0 -> 1 over the first half of a cycle of T updates and falling back
  over the second; the very first update therefore has rate 0, as in PyTorch. The integers
  are exact, so the one division rounds once (PyTorch computes the same ratio in float64);
* momentum: ``max - (max - min) * tri(t)`` (0.9 -> 0.8 -> 0.9), inverse to the rate;
* weight decay is added to the gradient before momentum (coupled), ``g + wd * p``.

How the weights' and psi's optimizers use it: docs/algorithm.md#optimizers-and-schedules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def triangle(cycle_steps: int):
    """The schedule t -> tri(t) in [0, 1] described above, for cycles of ``cycle_steps`` updates,
    in JAX's float dtype (float32, or float64 under x64)."""
    if cycle_steps < 1:
        raise ValueError(f"cycle_steps must be positive, got {cycle_steps}")

    def schedule(count):
        r = jnp.mod(count, cycle_steps)
        twice_distance = jnp.minimum(2 * r, 2 * (cycle_steps - r))  # to the nearer cycle end
        return twice_distance.astype(jax.dtypes.canonicalize_dtype(jnp.float64)) / cycle_steps

    return schedule


def cyclic_sgd(
    peak_lr: float,
    cycle_steps: int,
    *,
    weight_decay: float,
    momentum_max: float = 0.9,
    momentum_min: float = 0.8,
) -> optax.GradientTransformation:
    """SGD with coupled weight decay, a triangular rate and inversely cycled momentum.

    Args:
      peak_lr: rate at the middle of each cycle (0.2 for weights, 5e-8 for psi).
      cycle_steps: updates per cycle (all training steps for one 30-epoch triangle).
      weight_decay: coupled L2 coefficient (2e-4 for weights, 400 for psi).
      momentum_max, momentum_min: momentum at the ends and at the middle of a cycle.
    """
    tri = triangle(cycle_steps)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.inject_hyperparams(optax.sgd)(
            learning_rate=lambda count: peak_lr * tri(count),
            momentum=lambda count: momentum_max - (momentum_max - momentum_min) * tri(count),
        ),
    )
