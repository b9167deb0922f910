"""FAB: the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), L-inf and L2.

"Minimally distorted adversarial examples with a fast adaptive boundary attack",
F. Croce and M. Hein, ICML 2020. FAB looks for the adversarial point of smallest norm:
at each step it linearizes the decision boundary between the true class and a target class
(or, untargeted, the closest linearized boundary of all other classes), projects both the
current point and the original point onto that hyperplane intersected with the box [0, 1],
and moves to a biased combination of the two projections, extrapolated by ``eta``. A point
that is adversarial is recorded if it beats the best norm so far and is then pulled back
toward the original by ``beta``. :func:`fab_t` is FAB-T, the targeted version that
AutoAttack runs, over the target classes ranked 2 .. n_target_classes + 1 by clean logit.

The convention of every attack (:mod:`apart_jax.attacks.core`): ``attack(logits_fn, x, y,
key, *, eps, ...)``; the result has the shape and dtype of ``x``, lies in [0, 1] and in the
``norm`` ball of radius ``eps`` around ``x``. A returned point differs from ``x`` only where
FAB found a misclassified point of norm <= eps (FAB reports only successes within eps);
everywhere else it is ``x`` itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from apart_jax.attacks.box_projection import hyperplane_box_projection
from apart_jax.attacks.checks import check_attack_inputs, check_interval
from apart_jax.attacks.core import LogitsFn, loop, outer_form, random_init, ranked_targets

#: Floor on the norms of the two projection steps in the bias weight (reference value).
_MIN_STEP_NORM = 1e-8


def _norm(delta: jax.Array, norm: str) -> jax.Array:
    """Per-row L-inf or L2 norm of a flat batch (B, n) -> (B,)."""
    if norm == "linf":
        return jnp.max(jnp.abs(delta), axis=1)
    return jnp.sqrt(jnp.sum(jnp.square(delta), axis=1))


def _dual_norm(g: jax.Array, norm: str) -> jax.Array:
    """The dual norm over the last axis: L1 for L-inf, L2 for L2."""
    if norm == "linf":
        return jnp.sum(jnp.abs(g), axis=-1)
    return jnp.sqrt(jnp.sum(jnp.square(g), axis=-1))


def _boundary(logits, vjp_fn, x_lin, x1, y, targets, norm):
    """The linearized boundary ``w . z = b`` to project on, from the pass at ``x_lin``.

    ``f(z) ~ f(x_lin) + g . (z - x_lin)`` with ``f = z_t - z_y`` (targeted; 1 backward pass)
    or, untargeted, the ``f = z_c - z_y`` over c != y whose linearized boundary is closest to
    the current point ``x1`` (1 backward pass per other class). Returns ``(w, b)`` with
    ``w = g`` and ``b = g . x_lin - f(x_lin)``.
    """
    batch, classes = logits.shape
    rows = jnp.arange(batch)

    def linearized(other):
        cotangent = jax.nn.one_hot(other, classes, dtype=logits.dtype) - jax.nn.one_hot(
            y, classes, dtype=logits.dtype
        )
        (g,) = vjp_fn(cotangent)
        return g, jnp.sum(g * x_lin, axis=1) - (logits[rows, other] - logits[rows, y])

    if targets is not None:
        return linearized(targets)
    best_dist = best_w = best_b = None
    for j in range(classes - 1):
        g, b = linearized(jnp.where(j < y, j, j + 1))  # the j-th class other than y
        dist = jnp.abs(jnp.sum(g * x1, axis=1) - b) / (1e-12 + _dual_norm(g, norm))
        if best_dist is None:
            best_dist, best_w, best_b = dist, g, b
        else:
            closer = dist < best_dist
            best_dist = jnp.where(closer, dist, best_dist)
            best_w = jnp.where(closer[:, None], g, best_w)
            best_b = jnp.where(closer, b, best_b)
    return best_w, best_b


def _fab_search(
    logits_fn, x, y, key, targets, *, eps, norm, steps, restarts, alpha_max, eta, beta, unroll
):
    """The FAB search: ``(best_adv (B, n), best_norm (B,))``, inf norm where none found.

    Passes: per restart ``steps + 1`` forward and ``steps`` backward (targeted) or
    ``steps * (K - 1)`` backward (untargeted) passes.
    """
    shape = x.shape
    batch = shape[0]
    x0 = x.reshape(batch, -1)
    best = x0
    best_norm = jnp.full((batch,), jnp.inf, x0.dtype)

    def record(x1, logits, best, best_norm, active):
        """Keeps adversarial ``x1`` that beat the best norm; pulls them back by beta."""
        adversarial = (jnp.argmax(logits, axis=-1) != y) & active
        size = _norm(x1 - x0, norm)
        better = adversarial & (size < best_norm)
        best = jnp.where(better[:, None], x1, best)
        best_norm = jnp.where(better, size, best_norm)
        x1 = jnp.where(adversarial[:, None], x0 + beta * (x1 - x0), x1)
        return x1, best, best_norm

    for restart in range(restarts):
        if restart == 0:
            x_start = x0
        else:
            radius = 0.5 * jnp.minimum(best_norm, eps)
            x_start = random_init(
                jax.random.fold_in(key, restart), x0, radius, norm, on_sphere=True
            )

        def body(k, state, check_start=restart == 0):
            x1, best, best_norm = state
            x_lin = x1
            logits, vjp_fn = jax.vjp(lambda z: logits_fn(z.reshape(shape)), x_lin)
            # Step k checks the point made by step k - 1 (restart 0 also checks x itself;
            # the reference never checks a random start).
            active = jnp.logical_or(k > 0, check_start)
            x1, best, best_norm = record(x1, logits, best, best_norm, active)
            # The boundary linearized at x_lin; a pulled-back x1 is projected onto it too.
            w, b = _boundary(logits, vjp_fn, x_lin, x1, y, targets, norm)
            d = hyperplane_box_projection(
                jnp.concatenate([x1, x0]),
                jnp.concatenate([w, w]),
                jnp.concatenate([b, b]),
                norm=norm,
            )
            d1, d2 = d[:batch], d[batch:]
            a1 = jnp.maximum(_norm(d1, norm), _MIN_STEP_NORM)
            a2 = jnp.maximum(_norm(d2, norm), _MIN_STEP_NORM)
            alpha = jnp.minimum(a1 / (a1 + a2), alpha_max)[:, None]
            x1 = jnp.clip((x1 + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
            return x1, best, best_norm

        x1, best, best_norm = loop(steps, body, (x_start, best, best_norm), unroll, "fab")
        logits = logits_fn(x1.reshape(shape))
        _, best, best_norm = record(x1, logits, best, best_norm, True)
    return best, best_norm


def _finish(x, best, best_norm, eps):
    """The best point where its norm is <= eps, else the clean x; shape and dtype of x."""
    ok = best_norm <= eps
    flat = x.reshape(x.shape[0], -1)
    return jnp.where(ok[:, None], best, flat).reshape(x.shape).astype(x.dtype)


def fab(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    targets: jax.Array | None = None,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    unroll: bool | int | str | None = None,
) -> jax.Array:
    """FAB (Croce & Hein, ICML 2020): the smallest-norm adversarial point it finds, within eps.

    Each step linearizes ``f = z_t - z_y`` at the current point ``x_k`` (targeted), or the
    ``f = z_c - z_y`` whose linearized boundary is closest over c != y (untargeted), projects
    ``x_k`` and the original ``x`` onto the hyperplane ``f = 0`` intersected with [0, 1]
    (:func:`hyperplane_box_projection`, steps ``d_k`` and ``d_orig``), and moves to
    ``clip((x_k + eta d_k)(1 - a) + (x + eta d_orig) a, 0, 1)`` with
    ``a = min(||d_k|| / (||d_k|| + ||d_orig||), alpha_max)``. A misclassified point
    (argmax != y, also when targeted, as in the reference) is recorded when its norm beats the
    best so far and is pulled back, ``x + beta (x_k - x)``. Restart 0 starts at ``x``; restart
    r > 0 at a random point on the sphere of radius ``min(best norm, eps) / 2`` (clipped to
    [0, 1]) with key ``fold_in(key, r)``.

    Passes through ``logits_fn`` (one pass = one call on the whole batch), as measured by
    :func:`~apart_jax.attacks.counting`:

    * targeted: ``restarts * (steps + 1)`` forward and ``restarts * steps`` backward;
    * untargeted: ``restarts * (steps + 1)`` forward and ``restarts * steps * (K - 1)``
      backward (one vector-Jacobian product per other class).

    Each step's single forward pass both gives the gradient and tells whether the point made
    by the previous step is adversarial; one more forward pass per restart checks the last
    point. The reference spends a second forward pass per step on that check and takes the
    gradient after the beta pull-back; here a point found adversarial is pulled back and
    projected onto the boundary linearized at the point before the pull-back (untargeted:
    the closest such boundary from the pulled-back point); identical for a model linear in
    its input. Untargeted FAB takes K - 1 vector-Jacobian products per step where the
    reference takes the full Jacobian (K).

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K).
      x: clean inputs (B, ...) in [0, 1]; y: integer labels (B,).
      key: PRNG key, used by the random restarts only.
      eps: the radius of the reported successes: in (0, 1] for L-inf, positive for L2.
      norm: "linf" or "l2".
      steps: iterations per restart (positive int, static).
      restarts: number of runs (positive int, static); the first starts at ``x``.
      targets: target classes (B,), int, each != y; ``None`` for untargeted FAB.
      alpha_max: cap on the weight of the projection from the original point, in [0, 1].
      eta: extrapolation factor of the projection steps (> 0; 1.05 in the paper).
      beta: pull-back factor towards ``x`` for adversarial points, in (0, 1].
      unroll: the loop form over the steps (``loop`` in :mod:`apart_jax.attacks.core`);
        None: the fastest on the backend.

    Returns:
      ``x_adv`` of the shape and dtype of ``x``: per example the smallest-norm misclassified
      point found if its norm is <= eps, else ``x``. Examples misclassified clean return
      ``x`` (their smallest adversarial norm is 0).
    """
    check_attack_inputs(
        x,
        y,
        key=key,
        logits_fn=logits_fn,
        targets=targets,
        eps=eps,
        norm=norm,
        unroll=unroll,
        steps=steps,
        restarts=restarts,
    )
    check_interval("alpha_max", alpha_max, "[0, 1]")
    check_interval("eta", eta, "(0, inf)")
    check_interval("beta", beta, "(0, 1]")
    best, best_norm = _fab_search(
        logits_fn,
        x,
        y,
        key,
        targets,
        eps=eps,
        norm=norm,
        steps=steps,
        restarts=restarts,
        alpha_max=alpha_max,
        eta=eta,
        beta=beta,
        unroll=unroll,
    )
    return _finish(x, best, best_norm, eps)


def fab_t(
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
    """FAB-T, AutoAttack's targeted FAB (Croce & Hein 2020): targeted :func:`fab` per rank.

    For each target rank t = 2 .. n_target_classes + 1 (the class with the t-th largest
    clean logit, per example) it runs targeted :func:`fab` (alpha_max 0.1, eta 1.05,
    beta 0.9; restart r of rank t uses key ``fold_in(fold_in(key, t), r)``) and keeps per
    example the smallest-norm misclassified point over all ranks. The ranks run in a
    rolled ``lax.fori_loop``, so the program holds one copy of the attack (a Python loop
    with ``unroll="host"``).

    Passes through ``logits_fn``: ``1 + n_target_classes * restarts * (steps + 1)`` forward
    (one for the clean logits that rank the targets) and
    ``n_target_classes * restarts * steps`` backward.

    Args:
      logits_fn: inputs (B, ...) in [0, 1] -> logits (B, K).
      x: clean inputs (B, ...) in [0, 1]; y: integer labels (B,).
      key: PRNG key for the random restarts.
      eps, norm, steps, restarts, unroll: as for :func:`fab`.
      n_target_classes: number of target ranks, an int in [1, K - 1].

    Returns:
      ``x_adv`` of the shape and dtype of ``x``: per example the smallest-norm misclassified
      point over all targets if its norm is <= eps, else ``x``.
    """
    check_attack_inputs(
        x,
        y,
        key=key,
        logits_fn=logits_fn,
        eps=eps,
        norm=norm,
        unroll=unroll,
        steps=steps,
        restarts=restarts,
    )
    targets_by_rank = ranked_targets(logits_fn(x), n_target_classes)  # (n, B)
    batch = x.shape[0]

    def run_rank(i, state):
        best, best_norm = state
        rank = i + 2
        targets = targets_by_rank[i]
        adv, size = _fab_search(
            logits_fn,
            x,
            y,
            jax.random.fold_in(key, rank),
            targets,
            eps=eps,
            norm=norm,
            steps=steps,
            restarts=restarts,
            alpha_max=0.1,
            eta=1.05,
            beta=0.9,
            unroll=unroll,
        )
        better = size < best_norm
        return jnp.where(better[:, None], adv, best), jnp.where(better, size, best_norm)

    flat = x.reshape(batch, -1)
    init = (flat, jnp.full((batch,), jnp.inf, flat.dtype))
    best, best_norm = loop(n_target_classes, run_rank, init, outer_form(unroll), "fab")
    return _finish(x, best, best_norm, eps)
