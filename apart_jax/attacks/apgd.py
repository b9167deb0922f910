"""APGD and APGD-T (Croce & Hein 2020): PGD whose step size adapts itself per example.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020; the details follow their reference implementation
(``autoattack/autopgd_base.py``). Like every attack here, these are pure functions of a
logits closure ``logits_fn(x) -> logits`` (inputs (B, ...) in [0, 1], logits (B, K)); they
return adversarial inputs of the shape and dtype of ``x``, inside the eps-ball around ``x``
and inside [0, 1], and they work under ``jax.jit`` (all hyperparameters are static Python
values; there is no data-dependent Python control flow).

One APGD run, per example (every quantity below is per example):

* start at a random point of the eps-ball: L-inf ``x + eps * t / max|t|`` with t ~ U(-1, 1),
  L2 ``x + eps * g / ||g||_2`` with g Gaussian; clipped to [0, 1];
* the first step size is ``2 * eps``; step k moves to
  ``z = P(x_k + eta * d_k)`` (d_k = sign(grad) for L-inf, grad / ||grad||_2 for L2) and then
  ``x_{k+1} = P(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_{k-1}))`` with alpha = 1 at
  the first step and ``momentum`` (0.75) afterwards; P projects onto the ball and [0, 1];
* at the checkpoints (see :func:`apgd_checkpoints`) the step size is halved, and the iterate
  and its gradient reset to the best point so far, when (1) at most ``rho`` of the steps since
  the previous checkpoint increased the loss, or (2) the step size was not reduced at the
  previous checkpoint and the best loss has not grown since then;
* the run keeps the point of highest loss and the latest misclassified point; it returns the
  misclassified point if there is one, else the highest-loss point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apart_jax.attacks.checks import check_attack_inputs, check_unroll
from apart_jax.attacks.core import (
    l2_norm,
    l2_normalize,
    project_l2,
    project_linf,
    ranked_targets,
)
from apart_jax.attacks.losses import cross_entropy, dlr_loss, targeted_dlr_loss

LogitsFn = Callable[[jax.Array], jax.Array]
APGD_LOSSES = ("ce", "dlr", "targeted_dlr")


def apgd_checkpoints(steps: int) -> tuple[tuple[int, int], ...]:
    """The step-size checkpoints of an APGD run of ``steps`` iterations.

    Returns ``(iteration, window)`` pairs: after 0-based iteration ``iteration`` the step size
    is checked, ``window`` being the number of iterations since the previous checkpoint. As in
    the reference code the first window is ``max(int(0.22 * steps), 1)`` and each next one
    shrinks by ``max(int(0.03 * steps), 1)`` down to ``max(int(0.06 * steps), 1)``: the
    checkpoints w_j = ceil(p_j * steps) of the paper, with p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06). For 100 steps, the checkpoints come after
    22, 41, 57, 70, 80, 87, 93 and 99 iterations.
    """
    window = max(int(0.22 * steps), 1)
    decrement = max(int(0.03 * steps), 1)
    minimum = max(int(0.06 * steps), 1)
    table, since = [], 0
    for i in range(steps):
        since += 1
        if since == window:
            table.append((i, window))
            window, since = max(window - decrement, minimum), 0
    return tuple(table)


def _per_example(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example vector (B,) to broadcast against ``x`` (B, ...)."""
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _project(x_adv: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    return project_linf(x_adv, x, eps) if norm == "linf" else project_l2(x_adv, x, eps)


def _random_start(key: jax.Array, x: jax.Array, eps: float, norm: str) -> jax.Array:
    """The reference start: a random direction scaled to L-inf (or L2) norm eps, clipped."""
    if norm == "linf":
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
        scale = jnp.max(jnp.abs(t.reshape(x.shape[0], -1)), axis=-1)
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
        scale = l2_norm(t)
    return jnp.clip(x + eps * t / _per_example(scale + 1e-12, x), 0.0, 1.0)


def _objective(loss: str, logits: jax.Array, y: jax.Array, targets: jax.Array | None):
    classes = logits.shape[-1]
    if loss == "ce":
        return cross_entropy(logits, y)
    if loss == "dlr":
        if classes < 3:
            raise ValueError(f"loss='dlr' needs logits with K >= 3 classes, got K={classes}")
        return dlr_loss(logits, y)
    if classes < 4:
        raise ValueError(f"loss='targeted_dlr' needs logits with K >= 4 classes, got K={classes}")
    return targeted_dlr_loss(logits, y, targets)


class _State(NamedTuple):
    x_adv: jax.Array  # the current iterate x_k
    x_prev: jax.Array  # the iterate at the start of the previous step (for the momentum)
    grad: jax.Array  # the gradient at x_adv
    step: jax.Array  # (B,) step sizes
    loss_prev: jax.Array  # (B,) the loss of the latest step's point
    successes: jax.Array  # (B,) int: steps that raised the loss since the last checkpoint
    x_best: jax.Array  # highest-loss point so far
    grad_best: jax.Array
    loss_best: jax.Array
    x_best_adv: jax.Array  # latest misclassified point (the start while there is none)
    fooled: jax.Array  # (B,) bool: some point so far was misclassified
    loss_best_last_check: jax.Array  # (B,) loss_best at the previous checkpoint
    reduced_last_check: jax.Array  # (B,) bool: the step size was halved there


def _apgd_run(logits_fn, x, y, targets, key, *, eps, norm, loss, steps, rho, momentum, unroll):
    """One APGD run: ``(x_best, loss_best, x_best_adv, fooled)``; steps + 1 passes each way."""

    def loss_and_grad(x_adv):
        def total(x_adv):
            logits = logits_fn(x_adv)
            losses = _objective(loss, logits, y, targets)
            return jnp.sum(losses), (losses, logits)

        (_, (losses, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
        return losses, jnp.argmax(logits, axis=-1) != y, grad

    x0 = _random_start(key, x, eps, norm)
    losses0, wrong0, grad0 = loss_and_grad(x0)
    state = _State(
        x_adv=x0,
        x_prev=x0,
        grad=grad0,
        step=jnp.full(y.shape, 2.0 * eps, x.dtype),
        loss_prev=losses0,
        successes=jnp.zeros(y.shape, jnp.int32),
        x_best=x0,
        grad_best=grad0,
        loss_best=losses0,
        x_best_adv=x0,
        fooled=wrong0,
        loss_best_last_check=losses0,
        reduced_last_check=jnp.ones(y.shape, bool),
    )
    # Static per-iteration tables: whether a checkpoint follows, and condition 1's bound.
    is_checkpoint, thresholds = np.zeros(steps, bool), np.zeros(steps, np.float32)
    for i, window in apgd_checkpoints(steps):
        is_checkpoint[i], thresholds[i] = True, rho * window
    is_checkpoint, thresholds = jnp.asarray(is_checkpoint), jnp.asarray(thresholds)

    def body(i, s: _State) -> _State:
        alpha = jnp.where(i > 0, momentum, 1.0).astype(x.dtype)
        direction = jnp.sign(s.grad) if norm == "linf" else l2_normalize(s.grad)
        z = _project(s.x_adv + _per_example(s.step, x) * direction, x, eps, norm)
        x_new = _project(
            s.x_adv + alpha * (z - s.x_adv) + (1.0 - alpha) * (s.x_adv - s.x_prev), x, eps, norm
        )
        losses, wrong, grad = loss_and_grad(x_new)
        x_best_adv = jnp.where(_per_example(wrong, x), x_new, s.x_best_adv)
        improved = losses > s.loss_best
        x_best = jnp.where(_per_example(improved, x), x_new, s.x_best)
        grad_best = jnp.where(_per_example(improved, x), grad, s.grad_best)
        loss_best = jnp.where(improved, losses, s.loss_best)
        successes = s.successes + (losses > s.loss_prev).astype(jnp.int32)

        # Checkpoint: condition 1 (too few successful steps) or condition 2 (no reduction
        # last time and no progress of the best loss since).
        check = is_checkpoint[i]
        oscillating = successes.astype(jnp.float32) <= thresholds[i]
        stalled = ~s.reduced_last_check & (s.loss_best_last_check >= loss_best)
        reduce = oscillating | stalled
        halve = check & reduce
        return _State(
            x_adv=jnp.where(_per_example(halve, x), x_best, x_new),
            x_prev=s.x_adv,
            grad=jnp.where(_per_example(halve, x), grad_best, grad),
            step=jnp.where(halve, 0.5 * s.step, s.step),
            loss_prev=losses,
            successes=jnp.where(check, 0, successes),
            x_best=x_best,
            grad_best=grad_best,
            loss_best=loss_best,
            x_best_adv=x_best_adv,
            fooled=s.fooled | wrong,
            loss_best_last_check=jnp.where(check, loss_best, s.loss_best_last_check),
            reduced_last_check=jnp.where(check, reduce, s.reduced_last_check),
        )

    s = jax.lax.fori_loop(0, steps, body, state, unroll=unroll)
    return s.x_best, s.loss_best, s.x_best_adv, s.fooled


def _merge(best, x_best, loss_best, x_best_adv, fooled):
    """Keeps per example the first misclassified point, else the highest loss."""
    x_out, fooled_out, loss_out = best
    take_adv = ~fooled_out & fooled
    take_best = ~fooled_out & ~fooled & (loss_best > loss_out)
    x_out = jnp.where(
        _per_example(take_adv, x_out),
        x_best_adv,
        jnp.where(_per_example(take_best, x_out), x_best, x_out),
    )
    loss_out = jnp.where(take_best, loss_best, loss_out).astype(loss_out.dtype)
    return x_out, fooled_out | fooled, loss_out


def _apgd_restarts(logits_fn, x, y, targets, key, best, *, restarts, **kwargs):
    """``restarts`` APGD runs (restart r uses ``fold_in(key, r)``) merged into ``best``."""

    def one(best, r):
        run = _apgd_run(logits_fn, x, y, targets, jax.random.fold_in(key, r), **kwargs)
        return _merge(best, *run), None

    best, _ = jax.lax.scan(one, best, jnp.arange(restarts))
    return best


def _check_apgd_args(rho, momentum, unroll):
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum}")
    check_unroll(unroll)


def apgd(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    loss: str = "ce",
    steps: int = 100,
    restarts: int = 1,
    targets: jax.Array | None = None,
    rho: float = 0.75,
    momentum: float = 0.75,
    unroll: int | bool = 1,
) -> jax.Array:
    """APGD (Croce & Hein 2020): step-size-free PGD with momentum (see the module docstring).

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K).
      x: clean inputs (B, ...) in [0, 1]; y: integer labels (B,).
      key: PRNG key; restart r starts from a random point drawn with ``fold_in(key, r)``
        (so the first runs of ``restarts=n`` are those of ``restarts=n-1``).
      eps: radius, in (0, 1] for L-inf, positive for L2.
      norm: "linf" or "l2".
      loss: "ce" (cross-entropy), "dlr" (needs K >= 3) or "targeted_dlr" (needs K >= 4 and
        ``targets``).
      steps: iterations per run (static int >= 1); restarts: independent runs (>= 1).
      targets: target labels (B,) int, for ``loss="targeted_dlr"`` only.
      rho: condition 1 halves the step size when at most ``rho`` of the steps since the last
        checkpoint raised the loss. momentum: the weight alpha of the new step.
      unroll: ``unroll`` of the ``lax.fori_loop`` over the iterations: a positive int, or a
        bool (``True`` unrolls the loop fully, ``False`` is 1).

    Returns:
      Adversarial inputs, same shape and dtype as ``x``: per example a misclassified point
      from the first run that found one (the latest such point of that run), else the
      highest-loss point over all runs.

    Passes: ``restarts * (steps + 1)`` forward and as many backward passes through
    ``logits_fn`` (each run evaluates the loss and its gradient at the start and after each
    step); no other evaluation.
    """
    check_attack_inputs(
        x,
        y,
        key=key,
        logits_fn=logits_fn,
        targets=targets,
        eps=eps,
        norm=norm,
        steps=steps,
        restarts=restarts,
    )
    _check_apgd_args(rho, momentum, unroll)
    if loss not in APGD_LOSSES:
        raise ValueError(f"loss must be one of {APGD_LOSSES}, got {loss!r}")
    if loss == "targeted_dlr":
        if targets is None:
            raise ValueError("loss='targeted_dlr' needs targets (B,) int target labels")
        if jnp.shape(targets) != jnp.shape(y):
            raise ValueError(f"targets must have the shape {jnp.shape(y)} of y")
    elif targets is not None:
        raise ValueError(f"targets are only used with loss='targeted_dlr', not {loss!r}")
    best = (x, jnp.zeros(y.shape, bool), jnp.full(y.shape, -jnp.inf, jnp.float32))
    x_adv, _, _ = _apgd_restarts(
        logits_fn,
        x,
        y,
        targets,
        key,
        best,
        restarts=restarts,
        eps=eps,
        norm=norm,
        loss=loss,
        steps=steps,
        rho=rho,
        momentum=momentum,
        unroll=unroll,
    )
    return x_adv


def apgd_targeted(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    n_target_classes: int = 9,
    restarts: int = 1,
    unroll: int | bool = 1,
) -> jax.Array:
    """APGD-T (Croce & Hein 2020): APGD on the targeted DLR loss, for several target classes.

    For target rank t = 2, ..., n_target_classes + 1, each example's target is its class with
    the t-th largest clean logit, and :func:`apgd` runs with ``loss="targeted_dlr"`` (rank t
    uses ``fold_in(key, t)`` as its key). As in the reference, an example misclassified at
    the clean point keeps ``x``.

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K), K >= 4.
      x: clean inputs (B, ...) in [0, 1]; y: integer labels (B,).
      key: PRNG key.
      eps, norm, steps, restarts, unroll: as for :func:`apgd` (restarts per target class).
      n_target_classes: number of target ranks, in [1, K - 1].

    Returns:
      Adversarial inputs, same shape and dtype as ``x``: per example the first misclassified
      point (clean point first, then target ranks in order), else the point of highest
      targeted DLR loss over all targets and runs.

    Passes: ``1 + n_target_classes * restarts * (steps + 1)`` forward passes (one on the
    clean inputs, to rank the classes) and ``n_target_classes * restarts * (steps + 1)``
    backward passes through ``logits_fn``.
    """
    check_attack_inputs(
        x, y, key=key, logits_fn=logits_fn, eps=eps, norm=norm, steps=steps, restarts=restarts
    )
    _check_apgd_args(0.75, 0.75, unroll)
    clean_logits = logits_fn(x)
    classes = clean_logits.shape[-1]
    if classes < 4:
        raise ValueError(f"apgd_targeted needs logits with K >= 4 classes, got K={classes}")
    targets = ranked_targets(clean_logits, n_target_classes)  # (n_target_classes, B)
    ranks = jnp.arange(2, n_target_classes + 2)

    def one_target(best, rank_and_targets):
        rank, targets_t = rank_and_targets
        best = _apgd_restarts(
            logits_fn,
            x,
            y,
            targets_t,
            jax.random.fold_in(key, rank),
            best,
            restarts=restarts,
            eps=eps,
            norm=norm,
            loss="targeted_dlr",
            steps=steps,
            rho=0.75,
            momentum=0.75,
            unroll=unroll,
        )
        return best, None

    clean_wrong = jnp.argmax(clean_logits, axis=-1) != y
    best = (x, clean_wrong, jnp.full(y.shape, -jnp.inf, jnp.float32))
    (x_adv, _, _), _ = jax.lax.scan(one_target, best, (ranks, targets))
    return x_adv
