"""FGSM and FGSM-RS adversarial training (one attack pass, one training pass).

The steps: docs/algorithm.md#fgsm and docs/algorithm.md#fgsm_rs.
"""

from __future__ import annotations

from apart_jax.methods.base import AttackThenDescend


def fgsm(eps: float) -> AttackThenDescend:
    """FGSM training: zero initialization, one step of size eps (the collapsing baseline)."""
    return AttackThenDescend("fgsm", "FGSM", random_start=False, step_size=eps, steps=1)


def fgsm_rs(eps: float, step_scale: float = 1.25) -> AttackThenDescend:
    """FGSM-RS (Wong et al. 2020): uniform start in the eps-ball, one projected step of 1.25 eps."""
    return AttackThenDescend(
        "fgsm_rs", "FGSM-RS", random_start=True, step_size=step_scale * eps, steps=1
    )
