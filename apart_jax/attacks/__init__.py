"""Attacks: pure functions of a logits closure.

An attack takes ``logits_fn(x) -> logits`` (inputs (B, ...) in [0, 1], logits (B, K)),
clean inputs ``x``, integer labels ``y`` (B,) and, where it draws noise, an explicit PRNG
key; it returns adversarial inputs of the same shape and dtype, inside the eps-ball around
``x`` and inside [0, 1]. Attacks never touch model state: whether BN runs in training or
inference mode is the caller's choice of closure. They work under ``jax.jit``.
"""

from apart_jax.attacks.core import (
    clip_with_grad,
    default_unroll,
    fgsm,
    l2_norm,
    l2_normalize,
    linf_ascent,
    loss_gradient,
    pgd,
    project_l2,
    project_linf,
    uniform_start,
)
from apart_jax.attacks.counting import PassCount, counting
from apart_jax.attacks.losses import cross_entropy, dlr_loss, margin_loss, targeted_dlr_loss

__all__ = [
    "PassCount",
    "counting",
    "l2_norm",
    "l2_normalize",
    "project_l2",
    "clip_with_grad",
    "cross_entropy",
    "default_unroll",
    "dlr_loss",
    "fgsm",
    "linf_ascent",
    "loss_gradient",
    "margin_loss",
    "pgd",
    "project_linf",
    "targeted_dlr_loss",
    "uniform_start",
]
