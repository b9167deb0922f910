"""PGD-K adversarial training (Madry et al. 2018): K attack passes, one training pass.

The step: docs/algorithm.md#pgd.
"""

from __future__ import annotations

from apart_jax.methods.base import AttackThenDescend


def pgd(steps: int = 10, step_size: float = 2.0 / 255.0) -> AttackThenDescend:
    """PGD-K training: uniform random start, K projected steps of ``step_size`` (2/255)."""
    if steps < 1:
        raise ValueError(f"pgd_steps must be positive, got {steps}")
    return AttackThenDescend(
        "pgd", f"PGD-{steps}", random_start=True, step_size=step_size, steps=steps
    )
