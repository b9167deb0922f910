"""Attacks: pure functions of a logits closure.

An attack takes ``logits_fn(x) -> logits`` (inputs (B, ...) in [0, 1], logits (B, K)),
clean inputs ``x``, integer labels ``y`` (B,) and, where it draws noise, an explicit PRNG
key; it returns adversarial inputs of the same shape and dtype, inside the eps-ball around
``x`` and inside [0, 1]. Attacks never touch model state: whether BN runs in training or
inference mode is the caller's choice of closure. They work under ``jax.jit``.

Every public attack first runs :func:`check_attack_inputs`: a wrong shape, dtype, key or
hyperparameter raises a ValueError naming the argument, at trace time (no run-time cost).
"""

from apart_jax.attacks.apgd import apgd, apgd_targeted
from apart_jax.attacks.checks import check_attack_inputs
from apart_jax.attacks.core import (
    attack_loss,
    clip_with_grad,
    cw_linf,
    default_unroll,
    fgsm,
    gradient_ascent,
    l2_norm,
    l2_normalize,
    loss_gradient,
    pgd,
    project,
    project_l2,
    project_linf,
    random_init,
    steepest_direction,
    uniform_start,
)
from apart_jax.attacks.counting import PassCount, counting
from apart_jax.attacks.fab import fab, fab_targeted
from apart_jax.attacks.losses import cross_entropy, dlr_loss, margin_loss, targeted_dlr_loss
from apart_jax.attacks.square import square
from apart_jax.attacks.suite import AUTOATTACK, autoattack, make_attack, run_suite

__all__ = [
    "AUTOATTACK",
    "apgd",
    "apgd_targeted",
    "autoattack",
    "fab",
    "fab_targeted",
    "make_attack",
    "run_suite",
    "square",
    "attack_loss",
    "check_attack_inputs",
    "cw_linf",
    "project",
    "random_init",
    "steepest_direction",
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
    "gradient_ascent",
    "loss_gradient",
    "margin_loss",
    "pgd",
    "project_linf",
    "targeted_dlr_loss",
    "uniform_start",
]
