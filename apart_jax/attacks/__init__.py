"""Attacks: pure functions of a logits closure, all called the same way.

Every attack is ``attack(logits_fn, x, y, key, *, eps, ...)``: ``logits_fn(x) -> logits``
(inputs (B, ...) in [0, 1], logits (B, K)), clean inputs ``x``, integer labels ``y`` (B,) and
a PRNG key (FGSM checks it but draws no noise); it returns adversarial inputs of the same
shape and dtype, inside the eps-ball around ``x`` and inside [0, 1]. A targeted attack takes
``targets`` (B,) int (targeted iff given); the multi-target AutoAttack versions are
``apgd_t`` and ``fab_t``. ``unroll`` chooses the loop form the same way in every attack
(:func:`loop`; None, the default, is the fastest compiled form measured on the backend;
"host" lets Python drive the iterations, outside jit, the fastest on CPU). Attacks never
touch model state: whether BN runs in training or inference mode is the caller's choice of
closure. They work under ``jax.jit`` (every loop form but "host").

Every public attack first runs :func:`check_attack_inputs`: a wrong shape, dtype, key or
hyperparameter raises a ValueError naming the argument, at trace time (no run-time cost).

Modules: ``core`` (what every attack shares, FGSM, PGD), ``apgd``, ``fab``, ``square``,
``losses``, ``checks``, ``batching`` (whole datasets in mini-batches, compiled once),
``suite`` (named attacks, AutoAttack), ``counting`` (measured passes).
"""

from apart_jax.attacks.apgd import apgd, apgd_t
from apart_jax.attacks.batching import (
    RobustResult,
    attack_in_batches,
    check_perturbation,
    predict,
    robust_accuracy,
)
from apart_jax.attacks.checks import check_attack_inputs
from apart_jax.attacks.core import (
    clip_with_grad,
    fgsm,
    gradient_ascent,
    l2_norm,
    l2_normalize,
    loop,
    loss_gradient,
    pgd,
    project,
    random_init,
    steepest_direction,
)
from apart_jax.attacks.counting import PassCount, counting
from apart_jax.attacks.fab import fab, fab_t
from apart_jax.attacks.losses import (
    LOSSES,
    attack_loss,
    cross_entropy,
    dlr_loss,
    margin_loss,
    targeted_dlr_loss,
)
from apart_jax.attacks.square import square
from apart_jax.attacks.suite import AUTOATTACK, SuiteResult, make_attack, measure_passes, run_suite

__all__ = [
    "AUTOATTACK",
    "LOSSES",
    "PassCount",
    "RobustResult",
    "SuiteResult",
    "apgd",
    "apgd_t",
    "attack_in_batches",
    "attack_loss",
    "check_attack_inputs",
    "check_perturbation",
    "clip_with_grad",
    "counting",
    "cross_entropy",
    "dlr_loss",
    "fab",
    "fab_t",
    "fgsm",
    "gradient_ascent",
    "l2_norm",
    "l2_normalize",
    "loop",
    "loss_gradient",
    "make_attack",
    "margin_loss",
    "measure_passes",
    "pgd",
    "predict",
    "project",
    "random_init",
    "robust_accuracy",
    "run_suite",
    "square",
    "steepest_direction",
    "targeted_dlr_loss",
]
