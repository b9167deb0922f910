"""APGD and APGD-T: analytic optima, the paper's schedule, invariants, strength, pass counts.

(Argument checks: test_attack_validation.py.)"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from conftest import LINEAR_FEATURES, linear_problem
from hypothesis import given, settings
from hypothesis import strategies as st

from apart_jax.attacks import apgd, apgd_t, counting, cross_entropy, pgd
from apart_jax.attacks.apgd import apgd_checkpoints


@functools.partial(jax.jit, static_argnames="options")
def apgd_linear(w, x, y, key, targets=None, *, options):
    """:func:`apgd` on the linear model ``w``, compiled once per ``options`` (sorted items)."""
    return apgd(lambda z: z @ w, x, y, key, targets=targets, **dict(options))


def options(**kwargs):
    return tuple(sorted(kwargs.items()))


def mlp_problem(seed: int = 0, batch: int = 64, features: int = 16, classes: int = 5):
    """A fixed random tanh MLP; labels are its own clean predictions (all correct clean)."""
    k1, k2, k_x = jax.random.split(jax.random.key(seed), 3)
    w1 = jax.random.normal(k1, (features, 32)) * 3 / math.sqrt(features)
    w2 = jax.random.normal(k2, (32, classes)) * 3 / math.sqrt(32)

    def logits_fn(x):
        return jnp.tanh((x - 0.5) @ w1) @ w2

    x = jax.random.uniform(k_x, (batch, features))
    return logits_fn, x, jnp.argmax(logits_fn(x), -1)


def fooled(logits_fn, x_adv, y):
    return jnp.argmax(logits_fn(x_adv), -1) != y


def test_checkpoints_follow_the_paper_schedule():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); w_j = ceil(p_j N).
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    after = [round(100 * q) for q in p[1:]]
    assert after == [22, 41, 57, 70, 80, 87, 93, 99]
    table = apgd_checkpoints(100)
    assert [i + 1 for i, _ in table] == after
    assert [w for _, w in table] == list(np.diff([0] + after))
    for steps in (1, 2, 5, 17, 1000):
        table = apgd_checkpoints(steps)
        assert table and table[0][1] == max(int(0.22 * steps), 1)
        assert all(w >= 1 for _, w in table)
        assert np.all(np.diff([-1] + [i for i, _ in table]) == [w for _, w in table])
        assert table[-1][0] < steps


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.02, 0.25]))
def test_apgd_ce_reaches_the_linf_linear_optimum(seed, eps):
    _, w, x, y = linear_problem(seed, batch=32)
    x_adv = apgd_linear(w, x, y, jax.random.key(seed), options=options(eps=eps, steps=5))
    optimum = x + eps * jnp.sign(w[:, 1 - y].T - w[:, y].T)
    np.testing.assert_allclose(x_adv, optimum, atol=1e-6)
    chex.assert_equal_shape([x_adv, x])
    assert x_adv.dtype == x.dtype


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.1, 0.25]))
def test_apgd_l2_reaches_the_linear_optimum(seed, eps):
    _, w, x, y = linear_problem(seed, batch=32)
    # Logits of order 1: float32 resolves the cross-entropy finely. (With logits of order 5,
    # a CE of 1e-3 is a difference of numbers of order 5, precise only to ~5e-4 relative.)
    w = w / 4
    direction = w[:, 1 - y].T - w[:, y].T
    optimum = x + eps * direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
    x_adv = apgd_linear(
        w, x, y, jax.random.key(seed), options=options(eps=eps, steps=30, norm="l2")
    )
    # The optimal loss is reached to float32 precision. Near the optimum the loss is flat to
    # second order in the angle, so the highest-loss point (returned where no point is
    # misclassified) is resolved to an angle of about 1e-3 (the median is far below).
    loss_adv, loss_opt = cross_entropy(x_adv @ w, y), cross_entropy(optimum @ w, y)
    np.testing.assert_allclose(loss_adv, loss_opt, rtol=1e-5)
    error = jnp.linalg.norm(x_adv - optimum, axis=1) / eps
    assert float(jnp.median(error)) <= 1e-3
    assert float(jnp.max(error)) <= 5e-3


@settings(max_examples=4, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    norm=st.sampled_from(["linf", "l2"]),
    loss=st.sampled_from(["ce", "dlr", "targeted dlr"]),
    eps=st.sampled_from([0.003, 0.1, 1.0]),
)
def test_apgd_stays_in_the_ball_and_the_unit_box(seed, norm, loss, eps):
    _, w, _, y = linear_problem(seed, batch=16, classes=5)
    # Inputs at and near the box's faces, where clipping binds.
    x = jax.random.choice(
        jax.random.key(seed + 1), jnp.array([0.0, 0.01, 0.5, 0.99, 1.0]), (16, LINEAR_FEATURES)
    )
    targets = (y + 1) % 5 if loss == "targeted dlr" else None
    kwargs = options(eps=eps, norm=norm, loss=loss.split()[-1], steps=3, restarts=2)
    x_adv = apgd_linear(w, x, y, jax.random.key(seed), targets, options=kwargs)
    if norm == "linf":
        assert jnp.all(jnp.abs(x_adv - x) <= eps + 1e-6)
    else:
        assert jnp.all(jnp.linalg.norm(x_adv - x, axis=1) <= eps + 1e-6)
    assert jnp.all((x_adv >= 0.0) & (x_adv <= 1.0))
    chex.assert_equal_shape([x_adv, x])


def test_apgd_is_deterministic_in_its_key_and_jit_agrees():
    logits_fn, x, y = mlp_problem(1, batch=8)

    def attack(x, y, key):
        return apgd(logits_fn, x, y, key, eps=0.05, norm="l2", steps=6, restarts=2)

    key = jax.random.key(1)
    reference = attack(x, y, key)
    np.testing.assert_array_equal(attack(x, y, key), reference)
    np.testing.assert_allclose(jax.jit(attack)(x, y, key), reference, atol=1e-6)
    assert not jnp.allclose(attack(x, y, jax.random.key(2)), reference)
    host = apgd(logits_fn, x, y, key, eps=0.05, norm="l2", steps=6, restarts=2, unroll="host")
    np.testing.assert_allclose(host, reference, atol=1e-6)


def test_apgd_t_driven_from_the_host_equals_its_compiled_loops():
    logits_fn, x, y = mlp_problem(2, batch=8)
    key = jax.random.key(4)
    options = dict(eps=0.03, steps=8, n_target_classes=3, restarts=2)
    compiled = jax.jit(lambda x, y, key: apgd_t(logits_fn, x, y, key, **options))(x, y, key)
    host = apgd_t(logits_fn, x, y, key, unroll="host", **options)
    assert fooled(logits_fn, compiled, y).any()  # the comparison covers found points
    np.testing.assert_allclose(host, compiled, atol=1e-6)


def test_examples_are_attacked_independently():
    # Changing the other examples of the batch leaves an example's result unchanged: step
    # sizes, checkpoints and restarts are per example (the random start depends only on the
    # key and the example's position in the batch).
    logits_fn, x, y = mlp_problem(2, batch=8)
    _, x_other, y_other = mlp_problem(3, batch=8)
    key = jax.random.key(0)

    def attack(x, y):
        return apgd(logits_fn, x, y, key, eps=0.05, steps=8, restarts=2)

    batched = attack(x, y)
    even = jnp.arange(8) % 2 == 0
    for keep in (even, ~even):
        mixed = attack(jnp.where(keep[:, None], x, x_other), jnp.where(keep, y, y_other))
        np.testing.assert_allclose(mixed[keep], batched[keep], atol=1e-6)


def test_apgd_is_at_least_as_strong_as_pgd_and_apgd_t_succeeds():
    logits_fn, x, y = mlp_problem(0)
    eps, key = 0.03, jax.random.key(1)
    x_pgd = pgd(logits_fn, x, y, key, eps=eps, step_size=eps / 4, steps=10)
    x_ce = apgd(logits_fn, x, y, key, eps=eps, steps=50)
    x_t = apgd_t(logits_fn, x, y, key, eps=eps, steps=50, n_target_classes=3)
    n_pgd, n_ce, n_t = (int(jnp.sum(fooled(logits_fn, z, y))) for z in (x_pgd, x_ce, x_t))
    assert 0 < n_pgd < len(y)  # the comparison is not all ties at 0 or at 100%
    assert n_ce >= n_pgd  # APGD-CE robust accuracy <= PGD-10's
    assert n_t >= n_ce
    for z in (x_ce, x_t):
        assert jnp.all(jnp.abs(z - x) <= eps + 1e-6)


def test_targeted_dlr_reaches_the_target_and_apgd_t_runs_the_ranked_targets():
    logits_fn, _, x, y = linear_problem(13, batch=8, classes=4)
    targets = (y + 1) % 4
    x_adv = apgd(logits_fn, x, y, jax.random.key(0), eps=1.0, steps=20, loss="dlr", targets=targets)
    assert bool(jnp.all(fooled(logits_fn, x_adv, y)))

    # One target class: the run on the class with the second largest clean logit, rank 2
    # keyed by fold_in(key, 2); the labels are the clean predictions, so no point is skipped.
    logits_fn, x, y = mlp_problem(4, batch=16)
    key = jax.random.key(5)
    second = jnp.argsort(logits_fn(x), -1)[:, -2]
    direct = apgd(
        logits_fn,
        x,
        y,
        jax.random.fold_in(key, 2),
        eps=0.05,
        steps=10,
        loss="dlr",
        targets=second,
    )
    np.testing.assert_allclose(
        apgd_t(logits_fn, x, y, key, eps=0.05, steps=10, n_target_classes=1),
        direct,
        atol=1e-6,
    )


def test_restarts_only_add_runs():
    logits_fn, x, y = mlp_problem(6)
    key = jax.random.key(3)
    single = apgd(logits_fn, x, y, key, eps=0.02, steps=10, loss="dlr")
    several = apgd(logits_fn, x, y, key, eps=0.02, steps=10, loss="dlr", restarts=3)
    fooled_single, fooled_several = fooled(logits_fn, single, y), fooled(logits_fn, several, y)
    assert bool(jnp.all(fooled_several | ~fooled_single))  # restart 0 is the single run
    np.testing.assert_array_equal(several[fooled_single], single[fooled_single])


def test_pass_counts_match_the_docstrings():
    logits_fn, x, y = mlp_problem(7, batch=4)
    steps, restarts, n_targets = 4, 2, 3

    def run(x, y, key):
        counted, count = counting(logits_fn)
        counts.append(count)
        return (
            apgd(counted, x, y, key, eps=0.1, steps=steps, restarts=restarts),
            apgd_t(
                counted, x, y, key, eps=0.1, steps=steps, restarts=1, n_target_classes=n_targets
            ),
        )

    counts = []
    jax.block_until_ready(jax.jit(run)(x, y, jax.random.key(0)))
    jax.effects_barrier()
    # apgd: restarts * (steps + 1) each way; apgd_t: 1 + n * restarts * (steps + 1)
    # forward and n * restarts * (steps + 1) backward.
    assert counts[-1].forward == restarts * (steps + 1) + 1 + n_targets * (steps + 1)
    assert counts[-1].backward == restarts * (steps + 1) + n_targets * (steps + 1)
