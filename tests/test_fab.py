"""FAB: minimal norms on linear classifiers, the exact box-hyperplane projection, invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apart_jax.attacks import counting, fab, fab_t
from apart_jax.attacks.box_projection import _bisect_below, hyperplane_box_projection

NUM_FEATURES = 12
ORD = {"linf": np.inf, "l2": 2}
DUAL = {"linf": 1, "l2": 2}


def linear_problem(seed: int, batch: int = 8, classes: int = 2):
    """``x -> (x - 0.5) W`` with x in [0.4, 0.6]: the minimal perturbations stay inside [0, 1].

    Labels are the clean predictions, so every example is correctly classified.
    """
    k_w, k_x = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(k_w, (NUM_FEATURES, classes))
    x = jax.random.uniform(k_x, (batch, NUM_FEATURES), minval=0.4, maxval=0.6)

    def logits_fn(z):
        return (z - 0.5) @ w

    return logits_fn, w, x, jnp.argmax(logits_fn(x), -1)


def minimal_norms(logits_fn, w, x, y, norm):
    """Per target class, the distance |z_y - z_t| / ||w_y - w_t||_dual to the boundary (B, K).

    For a linear classifier whose boundary points lie in the box, this is the smallest
    ``norm`` of a perturbation that reaches class t's boundary (inf for t = y).
    """
    z = np.asarray(logits_fn(x), np.float64)
    w = np.asarray(w, np.float64)
    y = np.asarray(y)
    rows = np.arange(len(y))
    normals = w[:, y].T[:, None, :] - w.T[None, :, :]  # (B, K, n), zero for t = y
    dist = (z[rows, y][:, None] - z) / np.linalg.norm(normals, ord=DUAL[norm], axis=-1).clip(1e-30)
    dist[rows, y] = np.inf
    # The boundary points must lie inside [0, 1] for the box to be irrelevant.
    for t in range(w.shape[1]):
        normal = normals[:, t]
        if norm == "linf":
            step = np.sign(normal) / np.abs(normal).sum(-1, keepdims=True).clip(1e-30)
        else:
            step = normal / (np.linalg.norm(normal, axis=-1, keepdims=True) ** 2).clip(1e-30)
        point = np.asarray(x) - (z[rows, y] - z[:, t])[:, None] * step
        inside = (point >= 0) & (point <= 1)
        assert np.all(inside | (t == y)[:, None])
    return dist


def norms(x_adv, x, norm):
    return np.linalg.norm(np.asarray(x_adv - x).reshape(len(x), -1), ord=ORD[norm], axis=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_minimal_perturbation_of_a_binary_linear_classifier(norm):
    logits_fn, w, x, y = linear_problem(0)
    minimum = minimal_norms(logits_fn, w, x, y, norm).min(axis=1)
    key = jax.random.key(1)
    kwargs = dict(norm=norm, steps=10)
    for x_adv in (
        fab(logits_fn, x, y, key, eps=1.0, **kwargs),
        fab(logits_fn, x, y, key, eps=1.0, targets=1 - y, **kwargs),
        fab_t(logits_fn, x, y, key, eps=1.0, n_target_classes=1, **kwargs),
    ):
        found = norms(x_adv, x, norm)
        assert np.all(jnp.argmax(logits_fn(x_adv), -1) != y)
        assert np.all(found >= minimum * (1 - 1e-4))
        assert np.all(found <= minimum * 1.05)
    # Below the minimum there is nothing to find: x comes back unchanged.
    below = 0.9 * float(minimum.min())
    np.testing.assert_array_equal(fab(logits_fn, x, y, key, eps=below, **kwargs), x)
    np.testing.assert_array_equal(
        fab_t(logits_fn, x, y, key, eps=below, n_target_classes=1, **kwargs), x
    )


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_keeps_the_closest_target_of_a_multiclass_linear_classifier(norm):
    classes = 4
    logits_fn, w, x, y = linear_problem(3, classes=classes)
    dist = minimal_norms(logits_fn, w, x, y, norm)
    minimum = dist.min(axis=1)
    key = jax.random.key(0)
    untargeted = norms(fab(logits_fn, x, y, key, eps=1.0, norm=norm, steps=10), x, norm)
    every_target = norms(
        fab_t(logits_fn, x, y, key, eps=1.0, norm=norm, steps=10, n_target_classes=classes - 1),
        x,
        norm,
    )
    for found in (untargeted, every_target):
        assert np.all(found >= minimum * (1 - 1e-4))
        assert np.all(found <= minimum * 1.05)
    # One target, the runner-up class: FAB-T finds at most its boundary distance.
    runner_up = jnp.argsort(logits_fn(x), -1)[:, -2]
    one_target = norms(
        fab_t(logits_fn, x, y, key, eps=1.0, norm=norm, steps=10, n_target_classes=1),
        x,
        norm,
    )
    assert np.all(one_target >= minimum * (1 - 1e-4))
    assert np.all(one_target <= dist[np.arange(len(y)), runner_up] * 1.05)


def reference_projection(t, w, b, norm):
    """The same problem in float64 by bisection on the step size (the reference's method).

    Per row: ``|d_i| = min(lam, room_i)`` (L-inf) or ``min(lam |w_i|, room_i)`` (L2),
    moving against sign(w . t - b) sign(w_i); the corner when the hyperplane misses the box.
    """
    out = np.zeros_like(t)
    for i in range(len(t)):
        gap = w[i] @ t[i] - b[i]
        wi = w[i] if gap >= 0 else -w[i]
        room = np.where(wi > 0, t[i], 1 - t[i]) * (wi != 0)
        slope = np.ones_like(wi) if norm == "linf" else np.abs(wi)

        def step(lam, wi=wi, room=room, slope=slope):
            return -np.sign(wi) * np.minimum(lam * slope, room)

        if -(wi @ step(1e12)) < abs(gap):
            out[i] = step(1e12)
            continue
        lo, hi = 0.0, 1e6
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if -(wi @ step(mid)) < abs(gap) else (lo, mid)
        out[i] = step(hi)
    return out


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    n=st.integers(1, 6),
    norm=st.sampled_from(["linf", "l2"]),
    spread=st.sampled_from([0.1, 1.0, 5.0]),
)
def test_hyperplane_box_projection_is_exact(seed, n, norm, spread):
    rng = np.random.default_rng(seed)
    rows = 16
    t = rng.choice([0.0, 0.05, 0.3, 0.5, 0.9, 1.0], size=(rows, n))
    t = np.where(rng.random((rows, n)) < 0.5, rng.random((rows, n)), t)
    w = rng.normal(size=(rows, n)) * (rng.random((rows, n)) > 0.2)  # some zero weights
    b = (w * t).sum(1) + spread * rng.normal(size=rows)  # feasible and infeasible rows
    d = np.asarray(
        hyperplane_box_projection(
            jnp.asarray(t, jnp.float32),
            jnp.asarray(w, jnp.float32),
            jnp.asarray(b, jnp.float32),
            norm=norm,
        ),
        np.float64,
    )
    expected = reference_projection(t, w, b, norm)
    np.testing.assert_allclose(d, expected, atol=2e-5)
    assert np.all((t + d >= -1e-6) & (t + d <= 1 + 1e-6))
    # Where the hyperplane meets the box, no random point of it in the box is closer.
    reachable = np.abs((w * expected).sum(1) + (w * t).sum(1) - b) < 1e-6
    for i in np.flatnonzero(reachable & (np.abs(w).sum(1) > 0)):
        j = np.argmax(np.abs(w[i]))
        z = rng.random((2000, n))
        z[:, j] = (b[i] - z @ w[i] + z[:, j] * w[i, j]) / w[i, j]
        z = z[(z[:, j] >= 0) & (z[:, j] <= 1)]
        if len(z):
            closest = np.linalg.norm(z - t[i], ord=ORD[norm], axis=1).min()
            assert np.linalg.norm(d[i], ord=ORD[norm]) <= closest + 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bisection_finds_the_largest_float_short_of_the_target(dtype):
    # change(lam) = lam: the float just below need (the largest finite one below inf);
    # none falls short of need = 0 (-1).
    need = np.array([0.75, 3.0, 0.0, np.inf], dtype)
    with jax.enable_x64(dtype == np.float64):
        found = _bisect_below(lambda lam: lam, jnp.asarray(need), dtype)
        assert found.dtype == dtype
    below = np.nextafter(need[:2], dtype(0))
    np.testing.assert_array_equal(np.asarray(found), [*below, -1.0, np.finfo(dtype).max])


def test_hyperplane_box_projection_in_float64_is_exact_to_float64():
    rng = np.random.default_rng(7)
    t = rng.random((32, 50))
    w = rng.normal(size=(32, 50)) * (rng.random((32, 50)) > 0.2)
    b = (w * t).sum(1) + rng.normal(size=32)
    for norm in ("linf", "l2"):
        with jax.enable_x64(True):
            d = hyperplane_box_projection(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b), norm=norm)
            assert d.dtype == jnp.float64
        # The float64 reference bisects 200 times in float64: they agree to float64 rounding
        # (measured: at most 1.5e-16 over seeds 0-7 of this problem, both norms).
        np.testing.assert_allclose(d, reference_projection(t, w, b, norm), atol=1e-14)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_box_projection_closed_form_when_the_box_does_not_bind(norm):
    rng = np.random.default_rng(0)
    t = rng.uniform(0.4, 0.6, size=(5, 10))
    w = rng.normal(size=(5, 10))
    b = (w * t).sum(1) + 0.01 * rng.normal(size=5)
    gap = (w * t).sum(1) - b
    if norm == "linf":
        expected = -np.sign(w) * (gap / np.abs(w).sum(1))[:, None]
    else:
        expected = -w * (gap / (w * w).sum(1))[:, None]
    d = hyperplane_box_projection(
        jnp.asarray(t, jnp.float32),
        jnp.asarray(w, jnp.float32),
        jnp.asarray(b, jnp.float32),
        norm=norm,
    )
    np.testing.assert_allclose(d, expected, atol=1e-6)


def mlp_problem(seed: int, batch: int = 6, classes: int = 4):
    """A small tanh MLP and inputs at and near the faces of the box."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    w1 = jax.random.normal(k1, (NUM_FEATURES, 16))
    w2 = jax.random.normal(k2, (16, classes))

    def logits_fn(z):
        return jnp.tanh((z - 0.5) @ w1) @ w2

    x = jax.random.choice(k3, jnp.array([0.0, 0.02, 0.5, 0.98, 1.0]), (batch, NUM_FEATURES))
    return logits_fn, x, jnp.argmax(logits_fn(x), -1)


@pytest.mark.parametrize("norm, eps", [("linf", 0.15), ("l2", 0.6)])
def test_fab_invariants(norm, eps):
    logits_fn, x, y = mlp_problem(2)
    key = jax.random.key(5)

    def attack(key, targeted):
        if targeted:
            return fab_t(
                logits_fn, x, y, key, eps=eps, norm=norm, steps=8, n_target_classes=2, restarts=2
            )
        return fab(logits_fn, x, y, key, eps=eps, norm=norm, steps=8, restarts=2)

    for targeted in (False, True):
        x_adv = attack(key, targeted)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert np.all(norms(x_adv, x, norm) <= eps + 1e-5)
        assert np.all((x_adv >= 0) & (x_adv <= 1))
        moved = np.any(np.asarray(x_adv != x), axis=1)
        assert np.all(np.asarray(jnp.argmax(logits_fn(x_adv), -1) != y)[moved])
        assert moved.any()
        np.testing.assert_array_equal(attack(key, targeted), x_adv)
    # The jitted attack computes the same (checked on FAB-T, which runs fab inside).
    np.testing.assert_allclose(jax.jit(attack, static_argnums=1)(key, True), x_adv, atol=1e-5)


def test_fab_unroll_and_misclassified_points():
    logits_fn, x, y = mlp_problem(4)
    wrong = y.at[1].set((y[1] + 1) % 4)  # example 1 is misclassified clean
    key = jax.random.key(0)
    rolled = fab(logits_fn, x, wrong, key, eps=0.2, steps=5, unroll=False)
    np.testing.assert_array_equal(rolled[1], x[1])
    for unroll in (True, 2, None, "host"):
        np.testing.assert_allclose(
            fab(logits_fn, x, wrong, key, eps=0.2, steps=5, unroll=unroll), rolled, atol=1e-6
        )
    options = dict(eps=0.2, steps=5, n_target_classes=2, restarts=2)
    rolled_t = jax.jit(lambda x: fab_t(logits_fn, x, y, key, **options))(x)
    np.testing.assert_allclose(
        fab_t(logits_fn, x, y, key, unroll="host", **options), rolled_t, atol=1e-6
    )


def test_pass_counts_match_the_docstrings():
    norm = "linf"  # the passes do not depend on the norm
    logits_fn, x, y = mlp_problem(1, classes=5)
    steps, restarts = 3, 2

    def count(attack):
        counted, passes = counting(logits_fn)
        jax.block_until_ready(jax.jit(lambda x: attack(counted, x))(x))
        jax.effects_barrier()
        return passes.forward, passes.backward

    kw = dict(eps=0.1, norm=norm, steps=steps, restarts=restarts)
    key = jax.random.key(0)
    targets = (y + 1) % 5
    assert count(lambda f, x: fab(f, x, y, key, targets=targets, **kw)) == (
        restarts * (steps + 1),
        restarts * steps,
    )
    assert count(lambda f, x: fab(f, x, y, key, **kw)) == (
        restarts * (steps + 1),
        restarts * steps * (5 - 1),
    )
    n = 3
    assert count(lambda f, x: fab_t(f, x, y, key, n_target_classes=n, **kw)) == (
        1 + n * restarts * (steps + 1),
        n * restarts * steps,
    )
