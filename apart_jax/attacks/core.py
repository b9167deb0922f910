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

from apart_jax.attacks.losses import cross_entropy

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
    noise = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
    return jnp.clip(x + noise, 0.0, 1.0)


def linf_ascent(
    grad_fn: Callable[[jax.Array, Carry], tuple[jax.Array, Carry]],
    x: jax.Array,
    x_start: jax.Array,
    carry: Carry,
    *,
    eps: float,
    step_size: float,
    steps: int,
    unroll: bool | None = None,
) -> tuple[jax.Array, Carry]:
    """``steps`` signed-gradient ascent steps, each projected onto the eps-ball and [0, 1].

    Args:
      grad_fn: ``(x_adv, carry) -> (gradient of the loss at x_adv, new carry)``.
      x: clean inputs in [0, 1].
      x_start: the starting point, inside the ball.
      carry: threaded through ``grad_fn`` (for example BN statistics); any pytree.
      eps, step_size, steps: ball radius, step length, number of steps (static int).
      unroll: unroll the loop into straight-line code (``True``) or run a rolled
        ``lax.fori_loop``; ``None`` takes :func:`default_unroll`.

    Returns:
      ``(x_adv, carry)`` after the last step.
    """

    def body(_, state):
        x_adv, carry = state
        grad, carry = grad_fn(x_adv, carry)
        return project_linf(x_adv + step_size * jnp.sign(grad), x, eps), carry

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


def _check_budget(eps: float, step_size: float | None = None, steps: int | None = None) -> None:
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def fgsm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, eps: float) -> jax.Array:
    """FGSM (Goodfellow et al. 2015): ``clip(x + eps * sign(grad_x CE), 0, 1)``.

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K).
      x: clean inputs in [0, 1]; y: integer labels (B,).
      eps: L-inf radius, in (0, 1].

    Returns:
      Adversarial inputs, same shape and dtype as ``x``.
    """
    _check_budget(eps)
    return project_linf(x + eps * jnp.sign(loss_gradient(logits_fn, x, y)), x, eps)


def pgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    unroll: bool | None = None,
) -> jax.Array:
    """L-inf PGD on the cross-entropy (Madry et al. 2018).

    Each step moves ``step_size * sign(grad)`` and projects onto the eps-ball and [0, 1].

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K).
      x: clean inputs in [0, 1]; y: integer labels (B,).
      key: PRNG key for the random start.
      eps: L-inf radius in (0, 1]; step_size: positive step; steps: positive int (static).
      random_start: start at a uniform point of the ball (default) or at ``x``.
      unroll: unroll the loop; ``None`` takes :func:`default_unroll`.

    Returns:
      Adversarial inputs, same shape and dtype as ``x``.
    """
    _check_budget(eps, step_size, steps)

    def grad_fn(x_adv, carry):
        return loss_gradient(logits_fn, x_adv, y), carry

    x_adv, _ = linf_ascent(
        grad_fn,
        x,
        uniform_start(key, x, eps) if random_start else x,
        None,
        eps=eps,
        step_size=step_size,
        steps=steps,
        unroll=unroll,
    )
    return x_adv
