"""Core attack primitives: projections, the signed-gradient loop, FGSM and PGD.

An attack takes ``logits_fn(x) -> logits`` (inputs (B, ...) in [0, 1], logits (B, K)),
clean inputs ``x``, integer labels ``y`` (B,) and, where it draws noise, an explicit PRNG
key; it returns adversarial inputs of the same shape and dtype, inside the L-inf ball of
radius ``eps`` around ``x`` and inside [0, 1]. Attacks never touch model state: whether
BN runs in training or inference mode is the caller's choice of closure. They work under
``jax.jit`` and ``jax.vmap``.

The iterative loop is :func:`linf_ascent`, which threads an arbitrary carry (the training
methods use it to carry BN statistics through their attack passes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from apart_jax.attacks.checks import check_attack_inputs, check_positive_int
from apart_jax.attacks.losses import cross_entropy, dlr_loss, margin_loss, targeted_dlr_loss

LogitsFn = Callable[[jax.Array], jax.Array]
Carry = TypeVar("Carry")


def default_unroll() -> bool:
    """Whether attack loops are unrolled by default on the current backend.

    On XLA:CPU a rolled ``fori_loop`` around convolutions was 5-16x slower than the same
    loop unrolled (docs in DESIGN.md), so CPU unrolls; other backends keep a rolled loop
    (smaller programs, faster compiles) until the speed benchmark says otherwise.
    """
    return jax.default_backend() == "cpu"


def clip_with_grad(x: jax.Array, lo: Any, hi: Any) -> jax.Array:
    """``clip(x, lo, hi)`` whose gradient passes (factor 1) where lo <= x <= hi, else 0.

    This is ``torch.clamp``'s gradient; ``jnp.clip`` instead halves the gradient at ties
    (x == lo or x == hi), which happen often (black or white pixels, delta = 0).
    """
    inside = (x >= lo) & (x <= hi)
    return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, lo, hi)))


def project_linf(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """Projects ``x_adv`` onto the L-inf ball of radius eps around ``x``, then onto [0, 1]."""
    return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def l2_norm(x: jax.Array) -> jax.Array:
    """Per-example L2 norm of a batch (B, ...) -> (B,)."""
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=-1))


def l2_normalize(x: jax.Array, tiny: float = 1e-12) -> jax.Array:
    """Scales each example of ``x`` (B, ...) to unit L2 norm (zero stays zero)."""
    return x / (l2_norm(x) + tiny).reshape((-1,) + (1,) * (x.ndim - 1))


def project_l2(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """Projects ``x_adv`` onto the L2 ball of radius eps around ``x``, then clips to [0, 1].

    The box clip can only shrink the perturbation, so the result stays in the ball.
    """
    delta = x_adv - x
    scale = jnp.minimum(1.0, eps / (l2_norm(delta) + 1e-12))
    return jnp.clip(x + delta * scale.reshape((-1,) + (1,) * (x.ndim - 1)), 0.0, 1.0)


def uniform_start(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """A uniform random point of the eps-ball around ``x``, clipped to [0, 1]."""
    check_attack_inputs(x, key=key, eps=eps, norm="linf")
    noise = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    return jnp.clip(x + noise, 0.0, 1.0)


def project(x_adv: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    """Projects onto the ``norm`` ("linf" or "l2") ball of radius eps around ``x`` and [0, 1]."""
    return project_linf(x_adv, x, eps) if norm == "linf" else project_l2(x_adv, x, eps)


def steepest_direction(grad: jax.Array, norm: str) -> jax.Array:
    """The ascent direction for ``norm``: sign(grad) (L-inf) or grad / ||grad||_2 (L2)."""
    return jnp.sign(grad) if norm == "linf" else l2_normalize(grad)


def random_init(key: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    """A random point of the ``norm`` ball around ``x``, clipped to [0, 1].

    L-inf: uniform in the cube. L2: a uniform direction at a radius eps * U(0, 1).
    """
    check_attack_inputs(x, key=key, eps=eps, norm=norm)
    if norm == "linf":
        return uniform_start(key, x, eps)
    k_dir, k_radius = jax.random.split(key)
    direction = l2_normalize(jax.random.normal(k_dir, x.shape, x.dtype))
    radius = eps * jax.random.uniform(k_radius, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
    return jnp.clip(x + radius * direction, 0.0, 1.0)


def gradient_ascent(
    grad_fn: Callable[[jax.Array, Carry], tuple[jax.Array, Carry]],
    x: jax.Array,
    x_start: jax.Array,
    carry: Carry,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    unroll: bool | None = None,
) -> tuple[jax.Array, Carry]:
    """``steps`` steepest-ascent steps, each projected onto the eps-ball and [0, 1].

    Each step moves ``step_size`` along :func:`steepest_direction` (signed gradient for
    L-inf, normalized gradient for L2).

    Args:
      grad_fn: ``(x_adv, carry) -> (gradient of the loss at x_adv, new carry)``.
      x: clean inputs in [0, 1].
      x_start: the starting point, inside the ball.
      carry: threaded through ``grad_fn`` (for example BN statistics); any pytree.
      eps, step_size, steps: ball radius, step length, number of steps (static int).
      norm: "linf" or "l2".
      unroll: unroll the loop into straight-line code (``True``) or run a rolled
        ``lax.fori_loop``; ``None`` takes :func:`default_unroll`.

    Returns:
      ``(x_adv, carry)`` after the last step.
    """

    def body(_, state):
        x_adv, carry = state
        grad, carry = grad_fn(x_adv, carry)
        return project(x_adv + step_size * steepest_direction(grad, norm), x, eps, norm), carry

    if default_unroll() if unroll is None else unroll:
        # Straight-line code: ``fori_loop(..., unroll=True)`` still leaves a one-trip loop
        # when steps == 1, which ran twice as slow on XLA:CPU as the inlined step.
        state = (x_start, carry)
        for i in range(steps):
            state = body(i, state)
        return state
    return jax.lax.fori_loop(0, steps, body, (x_start, carry))


def loss_gradient(logits_fn: LogitsFn, x: jax.Array, y: jax.Array) -> jax.Array:
    """Gradient of the summed cross-entropy with respect to the inputs (shape of ``x``).

    The sum keeps examples independent: each row is that example's own loss gradient.
    """
    return jax.grad(lambda x: jnp.sum(cross_entropy(logits_fn(x), y)))(x)


def ranked_targets(clean_logits: jax.Array, n_target_classes: int) -> jax.Array:
    """Target classes of the targeted attacks: ranks 2 .. n + 1 of the clean logits.

    Args:
      clean_logits: (B, K) logits at the clean inputs.
      n_target_classes: n in [1, K - 1] (AutoAttack uses 9).

    Returns:
      (n, B) int: row j holds, per example, the class with the (j + 2)-th largest logit.
    """
    check_positive_int("n_target_classes", n_target_classes)
    classes = clean_logits.shape[-1]
    if n_target_classes > classes - 1:
        raise ValueError(
            f"n_target_classes must be in [1, K - 1] = [1, {classes - 1}], got {n_target_classes}"
        )
    ranked = jnp.flip(jnp.argsort(clean_logits, axis=-1), axis=-1)
    return ranked[:, 1 : n_target_classes + 1].T


def fgsm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, eps: float) -> jax.Array:
    """FGSM (Goodfellow et al. 2015): ``clip(x + eps * sign(grad_x CE), 0, 1)``.

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K).
      x: clean inputs in [0, 1]; y: integer labels (B,).
      eps: L-inf radius, in (0, 1].

    Returns:
      Adversarial inputs, same shape and dtype as ``x``.
    """
    check_attack_inputs(x, y, logits_fn=logits_fn, eps=eps, norm="linf")
    return project_linf(x + eps * jnp.sign(loss_gradient(logits_fn, x, y)), x, eps)


def attack_loss(name: str, logits: jax.Array, y: jax.Array, targets: jax.Array | None):
    """Per-example loss ``name`` to maximize; targeted losses need ``targets`` (B,).

    "ce" (cross-entropy; targeted: minus the CE of the target), "margin" (C&W; targeted:
    target logit minus the largest other), "dlr" (targeted: the targeted DLR).
    """
    if targets is None:
        losses = {"ce": cross_entropy, "margin": margin_loss, "dlr": dlr_loss}
        return losses[name](logits, y)
    if name == "ce":
        return -cross_entropy(logits, targets)
    if name == "margin":
        return -margin_loss(logits, targets)
    return targeted_dlr_loss(logits, y, targets)


LOSSES = ("ce", "margin", "dlr")


def pgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    step_size: float,
    steps: int,
    restarts: int = 1,
    norm: str = "linf",
    loss: str = "ce",
    targeted: bool = False,
    targets: jax.Array | None = None,
    random_start: bool = True,
    unroll: bool | None = None,
) -> jax.Array:
    """PGD (Madry et al. 2018): projected steepest ascent on a loss, with restarts.

    Each step moves ``step_size`` along sign(grad) (L-inf) or grad / ||grad||_2 (L2) and
    projects onto the eps-ball and [0, 1]. With several restarts each example keeps the
    worst point found: a misclassified one (reaching the target, if targeted) wins, then
    the higher loss.

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K).
      x: clean inputs in [0, 1]; y: integer labels (B,).
      key: PRNG key for the random starts.
      eps: radius, in (0, 1] for L-inf; step_size: positive; steps: positive int (static).
      restarts: independent random starts (each adds ``steps`` forward and backward passes
        and, when there are several, one forward pass to compare them).
      norm: "linf" or "l2".
      loss: "ce" (cross-entropy), "margin" (C&W: PGD on the margin loss) or "dlr".
      targeted: move towards ``targets`` (B,) instead of away from ``y``.
      random_start: start at a random point of the ball (default) or at ``x``.
      unroll: unroll the step loop; ``None`` takes :func:`default_unroll`.

    Returns:
      Adversarial inputs, same shape and dtype as ``x``.
    """
    check_attack_inputs(
        x,
        y,
        key=key,
        logits_fn=logits_fn,
        targets=targets,
        eps=eps,
        step_size=step_size,
        norm=norm,
        steps=steps,
        restarts=restarts,
    )
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if targeted != (targets is not None):
        raise ValueError("targets must be given exactly when targeted=True")

    def objective(x_adv):
        return attack_loss(loss, logits_fn(x_adv), y, targets)

    def grad_fn(x_adv, carry):
        return jax.grad(lambda x_adv: jnp.sum(objective(x_adv)))(x_adv), carry

    best = best_score = None
    for restart in range(restarts):
        k = jax.random.fold_in(key, restart)
        x_start = random_init(k, x, eps, norm) if random_start else x
        x_adv, _ = gradient_ascent(
            grad_fn,
            x,
            x_start,
            None,
            eps=eps,
            step_size=step_size,
            steps=steps,
            norm=norm,
            unroll=unroll,
        )
        if restarts == 1:
            return x_adv
        logits = logits_fn(x_adv)
        success = jnp.argmax(logits, -1) == targets if targeted else jnp.argmax(logits, -1) != y
        score = jnp.where(success, jnp.inf, attack_loss(loss, logits, y, targets))
        if best is None:
            best, best_score = x_adv, score
        else:
            better = score > best_score
            best = jnp.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv, best)
            best_score = jnp.maximum(score, best_score)
    return best


def cw_linf(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    step_size: float,
    steps: int,
    restarts: int = 1,
    unroll: bool | None = None,
) -> jax.Array:
    """The C&W-style L-inf attack (Carlini & Wagner 2017): PGD on the margin loss.

    The margin is the largest other logit minus the true one; see :func:`pgd` for the args.
    """
    return pgd(
        logits_fn,
        x,
        y,
        key,
        eps=eps,
        step_size=step_size,
        steps=steps,
        restarts=restarts,
        loss="margin",
        unroll=unroll,
    )
