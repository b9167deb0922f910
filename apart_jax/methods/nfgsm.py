"""N-FGSM adversarial training (de Jorge et al. 2022, "Make Some Noise"): one attack pass
from a noisy start, no projection back to the eps-ball, one training pass.

The step: docs/algorithm.md#nfgsm.
"""

from __future__ import annotations

from apart_jax.methods.base import AttackThenDescend


def nfgsm(
    eps: float, noise_scale: float = 2.0, step_scale: float = 1.0, projected: bool = False
) -> AttackThenDescend:
    """N-FGSM training: x_adv = clip(x + eta + alpha * sign(grad at x + eta), 0, 1).

    Args:
      eps: the training radius in (0, 1].
      noise_scale: k, eta uniform in [-k eps, k eps] (clipped so that x + eta is in [0, 1]);
        k = 0 starts at x.
      step_scale: alpha / eps (the paper's alpha = eps).
      projected: also project onto the eps-ball (the release's ``--clip 1``); N-FGSM does
        not. With ``noise_scale=0`` and ``projected=True`` this is FGSM.
    """
    if noise_scale < 0 or step_scale <= 0:
        raise ValueError(
            f"N-FGSM needs noise_scale >= 0 and step_scale > 0, got {noise_scale}, {step_scale}"
        )
    return AttackThenDescend(
        "nfgsm",
        "N-FGSM",
        random_start=noise_scale > 0,
        step_size=step_scale * eps,
        steps=1,
        start_scale=noise_scale,
        projected=projected,
    )
