"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based random search.

"Square Attack: a query-efficient black-box adversarial attack via random search". No gradients:
every iteration proposes one random square-shaped change of the current best point of each
example, queries the model once on the whole batch and keeps, per example, the change if it
lowers the margin ``logit_true - max_other`` (the reference minimizes this margin; it is minus
:func:`~apart_jax.attacks.losses.margin_loss`). Examples whose margin is already <= 0
(misclassified) are no longer updated, and once every example of the batch is, the remaining
iterations skip their forward pass (the reference stops there too).

This follows the authors' reference implementation (github.com/max-andr/square-attack, also
AutoAttack's ``square.py``) with fixed shapes for ``jit``: squares are applied through masks
built from iota comparisons, the side length comes from a static per-iteration table, and the
loop is the attacks' shared ``loop``. Differences, all deliberate:

* The square's corner is uniform over all ``H - s + 1`` (``W - s + 1``) positions; the
  reference draws ``randint(0, H - s)``, which never reaches the last row and column.
* The square's position (and, for L2, the orientation of its pattern) is drawn per example;
  the reference's L2 version and AutoAttack share one per batch.
* There are ``queries - 1`` iterations after the initial query for both norms (the reference's
  L2 loop and AutoAttack run ``queries`` iterations, one query more than their budget).
* Side lengths are capped at ``min(H, W) - 1`` (the reference assumes square images and
  would fail for L2 squares that do not fit), and the L2 initialization's tiles
  (side ``max(H // 5, 1)``) also work for images smaller than 5x5.
* Clean misclassified inputs are not filtered out (the reference attacks only correctly
  classified points): the attack returns its best queried point for every example, and the
  clean input itself is never queried.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from apart_jax.attacks.checks import check_attack_inputs, check_interval
from apart_jax.attacks.core import LogitsFn, l2_norm, loop
from apart_jax.attacks.losses import margin_loss

#: Iterations (on the reference's 10,000-query scale) after which ``p`` halves.
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, iteration: int, queries: int) -> float:
    """The fraction ``p`` of pixels a square covers at ``iteration`` (0-based).

    The reference's piecewise-constant schedule: the iteration is rescaled to a budget of
    10,000 queries, ``int(iteration / queries * 10000)``, and ``p`` halves after each of
    :data:`P_HALVINGS`, from ``p_init`` down to ``p_init / 512``.
    """
    it = int(iteration / queries * 10000)
    return p_init / 2 ** sum(it > t for t in P_HALVINGS)


def square_side(p: float, height: int, width: int, norm: str) -> int:
    """The side of the square covering a fraction ``p`` of an ``height x width`` image.

    ``round(sqrt(p * H * W))``, at least 1 (L-inf) or 3 and odd (L2), as in the reference,
    and at most ``min(H, W) - 1`` (at least 1).
    """
    s = int(round(math.sqrt(p * height * width)))
    if norm == "linf":
        s = max(s, 1)
    else:
        s = max(s, 3)
        s += 1 - s % 2
    return max(min(s, min(height, width) - 1), 1)


def _eta_rectangle(rows: int, cols: int) -> np.ndarray:
    """The reference's ``pseudo_gaussian_pert_rectangles``: nested rectangles, unit norm."""
    delta = np.zeros((rows, cols))
    top, left = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[
            max(top, 0) : min(top + 2 * k + 1, rows), max(left, 0) : min(left + 2 * k + 1, cols)
        ] += 1.0 / (k + 1) ** 2
        top -= 1
        left -= 1
    norm = np.sqrt(np.sum(delta**2))
    return delta / norm if norm > 0 else delta


def eta(s: int) -> np.ndarray:
    """The L2 square's pattern (s, s): a positive bump over a negative one, unit L2 norm.

    The reference's ``meta_pseudo_gaussian_pert`` (before its random transposition).
    """
    delta = np.zeros((s, s))
    delta[: s // 2] = _eta_rectangle(s // 2, s)
    delta[s // 2 :] = -_eta_rectangle(s - s // 2, s)
    return delta / np.sqrt(np.sum(delta**2))


def _place(
    pattern: jax.Array, top: jax.Array, left: jax.Array, side: jax.Array, shape, transpose=None
):
    """Per example, ``pattern``'s top-left ``side x side`` block moved to (top, left).

    Args:
      pattern: (S, S) with S >= side, or None for a mask only.
      top, left: (B,) int corners; side: scalar int (traced).
      shape: (H, W) of the image.
      transpose: (B,) bool, place the block transposed.

    Returns:
      ``(values (B, H, W) or None, inside (B, H, W) bool)``.
    """
    height, width = shape
    rows = jnp.arange(height)[None, :] - top[:, None]
    cols = jnp.arange(width)[None, :] - left[:, None]
    inside = ((rows >= 0) & (rows < side))[:, :, None] & ((cols >= 0) & (cols < side))[:, None, :]
    if pattern is None:
        return None, inside
    last = pattern.shape[0] - 1
    r = jnp.clip(rows, 0, last)[:, :, None]
    c = jnp.clip(cols, 0, last)[:, None, :]
    values = jnp.where(transpose[:, None, None], pattern[c, r], pattern[r, c])
    return jnp.where(inside, values, 0.0), inside


def _corner(u: jax.Array, side: jax.Array, size: int) -> jax.Array:
    """A uniform corner in [0, size - side] (every position a side-``side`` square fits)."""
    return jnp.minimum(jnp.floor(u * (size - side + 1)).astype(jnp.int32), size - side)


def _signs(u: jax.Array) -> jax.Array:
    return jnp.where(u < 0.5, 1.0, -1.0)


def _nonzero_flips(u_first: jax.Array, u_rest: jax.Array) -> jax.Array:
    """Uniform over the 2^C - 1 nonzero bool vectors of length C, from uniforms (B,), (B, C).

    The first set bit is at j for 2^(C-1-j) of them (a static CDF); later bits are uniform.
    """
    channels = u_rest.shape[-1]
    weights = 2.0 ** -np.arange(1, channels + 1)  # proportional to 2^(C-1-j)
    cdf = np.cumsum(weights) / np.sum(weights)
    cdf[-1] = 1.0
    first = jnp.minimum(jnp.searchsorted(jnp.asarray(cdf, u_first.dtype), u_first), channels - 1)
    j = jnp.arange(channels)[None, :]
    return (j == first[:, None]) | ((j > first[:, None]) & (u_rest < 0.5))


def _linf_init(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """Vertical stripes: ``x + eps * sign`` with one random sign per (example, column, channel)."""
    batch, _, width, channels = x.shape
    signs = _signs(jax.random.uniform(key, (batch, 1, width, channels))).astype(x.dtype)
    return jnp.clip(x + eps * signs, 0.0, 1.0)


def _linf_proposal(u, x, x_best, vertices, side):
    """One L-inf candidate per example: a square set to ``clip(x +- eps)``, one sign a channel.

    As in the reference, the signs are redrawn until the square differs from ``x_best``: when
    some sign pattern would leave it unchanged, the signs are uniform over the other patterns.
    """
    x_plus, x_minus = vertices
    batch, height, width, channels = x.shape
    # u (B, 3 + C): the corner, the first flipped channel, then one uniform a channel.
    top, left = _corner(u[:, 0], side, height), _corner(u[:, 1], side, width)
    _, inside = _place(None, top, left, side, (height, width))
    inside = inside[..., None]

    def matches(vertex):  # (B, C): the square of channel c already equals this vertex
        return jnp.all(jnp.where(inside, jnp.abs(x_best - vertex) < 1e-7, True), axis=(1, 2))

    plus, minus = matches(x_plus), matches(x_minus)
    unchanged_exists = jnp.all(plus | minus, axis=-1, keepdims=True)
    unchanged = jnp.where(plus, 1.0, -1.0)
    flips = _nonzero_flips(u[:, 2], u[:, 3:])
    excluded = jnp.where(flips, -unchanged, unchanged)
    signs = jnp.where(unchanged_exists, excluded, _signs(u[:, 3:]))[:, None, None, :]
    return jnp.where(inside, jnp.where(signs > 0, x_plus, x_minus), x_best)


def _l2_init(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """A grid of side-``max(H // 5, 1)`` pattern tiles with random signs, scaled to norm eps."""
    batch, height, width, channels = x.shape
    s = max(height // 5, 1)
    tile = eta(s)
    starts = [max((n - 5 * s) // 2, 0) for n in (height, width)]
    tiles, tiles_t = [], []
    for i in range(height // s):
        for j in range(width // s):
            top, left = starts[0] + i * s, starts[1] + j * s
            for pattern, out in ((tile, tiles), (tile.T, tiles_t)):
                canvas = np.zeros((height + s, width + s))
                canvas[top : top + s, left : left + s] = pattern
                out.append(canvas[:height, :width])
    tiles, tiles_t = jnp.asarray(np.stack(tiles), x.dtype), jnp.asarray(np.stack(tiles_t), x.dtype)
    u = jax.random.uniform(key, (batch, len(tiles), channels + 1))
    signs = _signs(u[..., 1:]).astype(x.dtype)
    transpose = u[..., :1] < 0.5
    delta = jnp.einsum("khw,bkc->bhwc", tiles, jnp.where(transpose, 0.0, signs)) + jnp.einsum(
        "khw,bkc->bhwc", tiles_t, jnp.where(transpose, signs, 0.0)
    )
    delta = delta / (l2_norm(delta) + 1e-12)[:, None, None, None]
    return jnp.clip(x + eps * delta, 0.0, 1.0)


def _l2_proposal(u, x, x_best, eps, side, pattern):
    """One L2 candidate per example, as the reference's ``square_attack_l2`` iteration.

    A second square's perturbation is moved into the first, which gets the pattern ``eta``
    with a random sign per channel plus its old (normalized) content, rescaled per channel to
    use the budget left; the whole perturbation is then rescaled to L2 norm eps.
    """
    batch, height, width, channels = x.shape
    # u (B, 5 + C): two corners, the pattern's orientation, one sign a channel.
    top, left = _corner(u[:, 0], side, height), _corner(u[:, 1], side, width)
    bump, inside_1 = _place(pattern, top, left, side, (height, width), u[:, 4] < 0.5)
    top_2, left_2 = _corner(u[:, 2], side, height), _corner(u[:, 3], side, width)
    _, inside_2 = _place(None, top_2, left_2, side, (height, width))
    inside_1, inside_2 = inside_1[..., None], inside_2[..., None]

    def channel_norms(a):  # (B, 1, 1, C)
        return jnp.sqrt(jnp.sum(jnp.square(a), axis=(1, 2), keepdims=True))

    delta = x_best - x
    old = jnp.where(inside_1, delta, 0.0)
    norm_image = l2_norm(delta)[:, None, None, None]
    norm_windows = channel_norms(jnp.where(inside_1 | inside_2, delta, 0.0))
    signs = _signs(u[:, None, None, 5:]).astype(x.dtype)
    new = bump[..., None].astype(x.dtype) * signs + old / (1e-10 + channel_norms(old))
    budget = jnp.maximum(eps**2 - norm_image**2, 0.0) / channels + norm_windows**2
    new = new / (channel_norms(new) + 1e-12) * jnp.sqrt(budget)
    delta = jnp.where(inside_1, new, jnp.where(inside_2, 0.0, delta))
    delta = delta / (l2_norm(delta) + 1e-12)[:, None, None, None]
    return jnp.clip(x + eps * delta, 0.0, 1.0)


def square(
    logits_fn: LogitsFn,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    queries: int = 5000,
    p_init: float = 0.8,
    unroll: bool | int | str | None = None,
) -> jax.Array:
    """Square Attack (Andriushchenko et al., ECCV 2020), untargeted, on the margin loss.

    Score-based: it only evaluates ``logits_fn``, never differentiates it, so gradient masking
    does not stop it. L-inf: starts at vertical stripes of +-eps and changes one random square
    per iteration to ``x +- eps`` (one sign per channel), so every coordinate of the result is
    ``clip(x + eps, 0, 1)`` or ``clip(x - eps, 0, 1)``. L2: starts at a grid of +-bumps and
    moves mass between two random squares, at L2 norm eps before the [0, 1] clip. The square's
    side follows the reference schedule (:func:`p_schedule`, :func:`square_side`): it covers
    a fraction ``p_init`` of the pixels at first and p halves after iterations 10, 50, 200,
    500, 1000, 2000, 4000, 6000 and 8000 (counted on a 10,000-query scale). Each example keeps
    the candidate if it lowers its margin ``logit_true - max_other``; an example with margin
    <= 0 (misclassified) is left alone from then on.

    Passes: one forward pass (one query on the whole batch) for the start and one per
    iteration, ``queries`` in all, no backward pass; once every example of the batch is
    misclassified the remaining iterations are skipped, so the count can be lower (with
    ``jax.vmap`` over this function the skip turns into a select and all ``queries`` run).

    Args:
      logits_fn: inputs (B, H, W, C) in [0, 1] -> logits (B, K).
      x: clean images (B, H, W, C) (NHWC) in [0, 1]; y: integer labels (B,).
      key: PRNG key for the start and the squares.
      eps: radius, in (0, 1] for "linf" and positive for "l2".
      norm: "linf" or "l2".
      queries: forward passes allowed, a positive int (static); ``queries - 1`` iterations.
      p_init: initial fraction of pixels in a square, in (0, 1]; AutoAttack uses 0.8.
      unroll: the loop form over the iterations (``loop`` in :mod:`apart_jax.attacks.core`);
        None: the fastest on the backend (never ``True`` for thousands of queries: the
        program would hold every iteration).

    Returns:
      Per example the lowest-margin point queried (the first misclassified one, if any),
      same shape and dtype as ``x``, inside the eps-ball around ``x`` and inside [0, 1].
    """
    check_attack_inputs(
        x,
        y,
        key=key,
        logits_fn=logits_fn,
        eps=eps,
        norm=norm,
        unroll=unroll,
        images=True,
        queries=queries,
    )
    check_interval("p_init", p_init, "(0, 1]")
    x = jnp.asarray(x)
    height, width = x.shape[1:3]

    sides = [
        square_side(p_schedule(p_init, i, queries), height, width, norm) for i in range(queries - 1)
    ]
    side_table = jnp.asarray(np.asarray(sides + [1], np.int32))
    k_init, k_loop = jax.random.split(key)
    keys = jax.random.split(k_loop, max(queries - 1, 1))  # one uniform draw per iteration

    def margin(x_adv):  # the reference's margin: logit_true - max_other
        return -margin_loss(logits_fn(x_adv), y).astype(jnp.float32)

    if norm == "linf":
        x_best = _linf_init(k_init, x, eps)
        vertices = (jnp.clip(x + eps, 0.0, 1.0), jnp.clip(x - eps, 0.0, 1.0))
        draws = 3 + x.shape[-1]

        def propose(u, x_best, side):
            return _linf_proposal(u, x, x_best, vertices, side)
    else:
        x_best = _l2_init(k_init, x, eps)
        largest = max(sides, default=1)
        # eta(s) for every side s in the schedule, in the top-left corner of an S x S block.
        patterns = np.zeros((largest + 1, largest, largest))
        for s in set(sides):
            patterns[s, :s, :s] = eta(s)
        patterns = jnp.asarray(patterns, x.dtype)
        draws = 5 + x.shape[-1]

        def propose(u, x_best, side):
            return _l2_proposal(u, x, x_best, eps, side, patterns[side])

    def step(i, carry):
        x_best, best = carry
        u = jax.random.uniform(keys[i], (x.shape[0], draws))
        x_new = propose(u, x_best, side_table[i])
        new = margin(x_new)
        better = (best > 0) & (new < best)
        return jnp.where(better[:, None, None, None], x_new, x_best), jnp.where(better, new, best)

    def body(i, carry):
        return jax.lax.cond(jnp.any(carry[1] > 0), lambda c: step(i, c), lambda c: c, carry)

    carry = (x_best, margin(x_best))
    x_best, _ = loop(queries - 1, body, carry, unroll, "square")
    return x_best
