"""The release's optimizers: SGD with coupled weight decay and a cyclic triangular schedule.

This mirrors PyTorch's ``SGD(momentum, weight_decay)`` driven per iteration by
``CyclicLR(base_lr=0, max_lr=peak, cycle_momentum=True, base_momentum=0.8,
max_momentum=0.9)`` with equal up and down phases:

* learning rate at update t: ``peak * tri(t)``, with ``tri(t) = 1 - |2 (t mod T) / T - 1|``
  rising 0 -> 1 over the first half of a cycle of T updates and falling back over the second;
  the very first update therefore has rate 0, as in PyTorch;
* momentum: ``max - (max - min) * tri(t)`` (0.9 -> 0.8 -> 0.9), inverse to the rate;
* weight decay is added to the gradient before momentum (coupled), ``g + wd * p``.

How the weights' and psi's optimizers use it: docs/algorithm.md#optimizers-and-schedules.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def triangle(cycle_steps: int):
    """The schedule t -> tri(t) in [0, 1] described above, for cycles of ``cycle_steps`` updates."""
    if cycle_steps < 1:
        raise ValueError(f"cycle_steps must be positive, got {cycle_steps}")

    def schedule(count):
        phase = jnp.mod(count, cycle_steps) / cycle_steps
        return 1.0 - jnp.abs(2.0 * phase - 1.0)

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
