"""APGD and APGD-T (Croce & Hein 2020): PGD whose step size adapts itself per example.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020; the details follow their reference implementation
(``autoattack/autopgd_base.py``). Like every attack here (see :mod:`apart_jax.attacks.core`)
they are ``attack(logits_fn, x, y, key, *, eps, ...)`` and return adversarial inputs of the
shape and dtype of ``x``, inside the eps-ball around ``x`` and inside [0, 1]; they work under
``jax.jit`` (all hyperparameters are static Python values).

One APGD run, per example (every quantity below is per example):

* start at a random point of the eps-sphere (``random_init(..., on_sphere=True)``): L-inf
  ``x + eps * t / max|t|`` with t ~ U(-1, 1), L2 ``x + eps * g / ||g||_2`` with g Gaussian;
  clipped to [0, 1];
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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apart_jax.attacks.checks import check_attack_inputs, check_interval
from apart_jax.attacks.core import (
    LogitsFn,
    loop,
    outer_form,
    per_example,
    project,
    random_init,
    ranked_targets,
    steepest_direction,
)
from apart_jax.attacks.losses import attack_loss


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
            losses = attack_loss(loss, logits, y, targets)
            return jnp.sum(losses), (losses, logits)

        (_, (losses, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
        return losses, jnp.argmax(logits, axis=-1) != y, grad

    x0 = random_init(key, x, eps, norm, on_sphere=True)
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
        direction = steepest_direction(s.grad, norm)
        z = project(s.x_adv + per_example(s.step, x) * direction, x, eps, norm)
        x_new = project(
            s.x_adv + alpha * (z - s.x_adv) + (1.0 - alpha) * (s.x_adv - s.x_prev), x, eps, norm
        )
        losses, wrong, grad = loss_and_grad(x_new)
        x_best_adv = jnp.where(per_example(wrong, x), x_new, s.x_best_adv)
        improved = losses > s.loss_best
        x_best = jnp.where(per_example(improved, x), x_new, s.x_best)
        grad_best = jnp.where(per_example(improved, x), grad, s.grad_best)
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
            x_adv=jnp.where(per_example(halve, x), x_best, x_new),
            x_prev=s.x_adv,
            grad=jnp.where(per_example(halve, x), grad_best, grad),
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

    s = loop(steps, body, state, unroll, "apgd")
    return s.x_best, s.loss_best, s.x_best_adv, s.fooled


def _merge(best, x_best, loss_best, x_best_adv, fooled):
    """Keeps per example the first misclassified point, else the highest loss."""
    x_out, fooled_out, loss_out = best
    take_adv = ~fooled_out & fooled
    take_best = ~fooled_out & ~fooled & (loss_best > loss_out)
    x_out = jnp.where(
        per_example(take_adv, x_out),
        x_best_adv,
        jnp.where(per_example(take_best, x_out), x_best, x_out),
    )
    loss_out = jnp.where(take_best, loss_best, loss_out).astype(loss_out.dtype)
    return x_out, fooled_out | fooled, loss_out


def _apgd_restarts(logits_fn, x, y, targets, key, best, *, restarts, **kwargs):
    """``restarts`` APGD runs (restart r uses ``fold_in(key, r)``) merged into ``best``."""

    def one(r, best):
        run = _apgd_run(logits_fn, x, y, targets, jax.random.fold_in(key, r), **kwargs)
        return _merge(best, *run)

    return loop(restarts, one, best, outer_form(kwargs["unroll"]), "apgd")


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
    unroll: bool | int | str | None = None,
) -> jax.Array:
    """APGD (Croce & Hein 2020): step-size-free PGD with momentum (see the module docstring).

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K).
      x: clean inputs (B, ...) in [0, 1]; y: integer labels (B,).
      key: PRNG key; restart r starts from a random point drawn with ``fold_in(key, r)``
        (so the first runs of ``restarts=n`` are those of ``restarts=n-1``).
      eps: radius, in (0, 1] for L-inf, positive for L2.
      norm: "linf" or "l2".
      loss: "ce" (cross-entropy), "margin" or "dlr" (needs K >= 3; targeted K >= 4); see
        ``attack_loss``.
      steps: iterations per run (static int >= 1); restarts: independent runs (>= 1).
      targets: target labels (B,) int: the attack is targeted (the targeted DLR for "dlr")
        iff given.
      rho: condition 1 halves the step size when at most ``rho`` of the steps since the last
        checkpoint raised the loss. momentum: the weight alpha of the new step.
      unroll: the loop form over the iterations (``loop`` in :mod:`apart_jax.attacks.core`);
        None: the fastest on the backend.

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
        loss=loss,
        unroll=unroll,
        steps=steps,
        restarts=restarts,
    )
    check_interval("rho", rho, "(0, 1]")
    check_interval("momentum", momentum, "(0, 1]")
    best = (x, jnp.zeros(y.shape, bool), jnp.full(y.shape, -jnp.inf, jnp.float32))
    x_adv, _, _ = _apgd_restarts(
        logits_fn, x, y, targets, key, best, restarts=restarts, eps=eps, norm=norm, loss=loss,
        steps=steps, rho=rho, momentum=momentum, unroll=unroll,
    )  # fmt: skip
    return x_adv


def apgd_t(
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
    unroll: bool | int | str | None = None,
) -> jax.Array:
    """APGD-T (Croce & Hein 2020): targeted APGD on the DLR loss towards each ranked class.

    For target rank t = 2, ..., n_target_classes + 1, each example's target is its class with
    the t-th largest clean logit, and :func:`apgd` runs with ``loss="dlr"`` and these
    ``targets`` (rank t uses ``fold_in(key, t)`` as its key). As in the reference, an example
    misclassified at the clean point keeps ``x``.

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
        x,
        y,
        key=key,
        logits_fn=logits_fn,
        eps=eps,
        norm=norm,
        loss="dlr",
        targeted=True,
        unroll=unroll,
        steps=steps,
        restarts=restarts,
    )
    clean_logits = logits_fn(x)
    targets = ranked_targets(clean_logits, n_target_classes)  # (n_target_classes, B)
    ranks = jnp.arange(2, n_target_classes + 2)

    def one_target(t, best):
        return _apgd_restarts(
            logits_fn, x, y, targets[t], jax.random.fold_in(key, ranks[t]), best,
            restarts=restarts, eps=eps, norm=norm, loss="dlr", steps=steps, rho=0.75,
            momentum=0.75, unroll=unroll,
        )  # fmt: skip

    clean_wrong = jnp.argmax(clean_logits, axis=-1) != y
    best = (x, clean_wrong, jnp.full(y.shape, -jnp.inf, jnp.float32))
    x_adv, _, _ = loop(n_target_classes, one_target, best, outer_form(unroll), "apgd")
    return x_adv
