"""FGSM, PGD and the shared pieces: analytic optima on a linear classifier, invariants, jit
and loop forms."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LINEAR_FEATURES, CompileCounter, linear_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from apart_jax.attacks import (
    attack_loss,
    clip_with_grad,
    cross_entropy,
    dlr_loss,
    fgsm,
    gradient_ascent,
    loop,
    loss_gradient,
    make_attack,
    margin_loss,
    pgd,
    random_init,
    targeted_dlr_loss,
)
from apart_jax.attacks.core import CPU_UNROLL

KEY = jax.random.key(0)


def binary_optimum(w, x, y, eps):
    """For two classes, CE grows with the margin (w_other - w_true) . x: the L-inf optimum."""
    direction = w[:, 1 - y].T - w[:, y].T
    return x + eps * jnp.sign(direction)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.01, 0.25))
def test_fgsm_reaches_the_linear_optimum(seed, eps):
    logits_fn, w, x, y = linear_problem(seed)
    np.testing.assert_allclose(
        fgsm(logits_fn, x, y, KEY, eps=eps), binary_optimum(w, x, y, eps), atol=1e-6
    )


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.01, 0.25))
def test_pgd_reaches_the_linear_optimum_from_a_random_start(seed, eps):
    logits_fn, w, x, y = linear_problem(seed)
    x_adv = pgd(logits_fn, x, y, jax.random.key(seed), eps=eps, step_size=eps / 2, steps=5)
    np.testing.assert_allclose(x_adv, binary_optimum(w, x, y, eps), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    eps=st.floats(0.001, 1.0),
    step_size=st.floats(0.001, 0.5),
    steps=st.integers(1, 4),
    classes=st.integers(2, 5),
)
def test_pgd_stays_in_the_ball_and_the_unit_box(seed, eps, step_size, steps, classes):
    logits_fn, _, _, y = linear_problem(seed, classes=classes)
    # Inputs at and near the box's faces, where clipping binds.
    x = jax.random.choice(
        jax.random.key(seed + 1), jnp.array([0.0, 0.01, 0.5, 0.99, 1.0]), (6, LINEAR_FEATURES)
    )
    x_adv = pgd(logits_fn, x, y, jax.random.key(seed), eps=eps, step_size=step_size, steps=steps)
    assert jnp.all(jnp.abs(x_adv - x) <= eps + 1e-6)
    assert jnp.all((x_adv >= 0.0) & (x_adv <= 1.0))


def test_pgd_one_step_from_zero_init_of_size_eps_is_fgsm():
    logits_fn, _, x, y = linear_problem(3, classes=4)
    x_pgd = pgd(
        logits_fn, x, y, jax.random.key(0), eps=0.1, step_size=0.1, steps=1, random_start=False
    )
    np.testing.assert_array_equal(x_pgd, fgsm(logits_fn, x, y, KEY, eps=0.1))


def test_pgd_is_deterministic_in_its_key_and_jit_and_loop_forms_agree():
    logits_fn, _, x, y = linear_problem(5, classes=3)

    def attack(key, unroll):
        return pgd(logits_fn, x, y, key, eps=0.1, step_size=0.02, steps=7, unroll=unroll)

    key = jax.random.key(1)
    reference = attack(key, True)
    np.testing.assert_array_equal(attack(key, True), reference)
    np.testing.assert_allclose(jax.jit(attack, static_argnums=1)(key, True), reference, atol=1e-6)
    np.testing.assert_allclose(attack(key, False), reference, atol=1e-6)
    assert not jnp.allclose(attack(jax.random.key(2), True), reference)


def test_batched_attack_equals_per_example_attack():
    logits_fn, _, x, y = linear_problem(7, classes=3)
    key = jax.random.key(0)
    batched = pgd(logits_fn, x, y, key, eps=0.1, step_size=0.03, steps=4, random_start=False)
    for i in range(len(y)):
        single = pgd(
            logits_fn,
            x[i : i + 1],
            y[i : i + 1],
            key,
            eps=0.1,
            step_size=0.03,
            steps=4,
            random_start=False,
        )
        np.testing.assert_allclose(single[0], batched[i], atol=1e-6)


def test_gradient_ascent_threads_its_carry_once_per_step():
    logits_fn, _, x, y = linear_problem(1)

    def grad_fn(x_adv, count):
        return loss_gradient(logits_fn, x_adv, y), count + 1

    for unroll in (True, False):
        _, count = gradient_ascent(
            grad_fn, x, x, 0, eps=0.1, step_size=0.01, steps=6, unroll=unroll
        )
        assert int(count) == 6


def test_clip_with_grad_passes_gradient_inside_and_at_the_bounds_only():
    x = jnp.array([-0.5, 0.0, 0.3, 1.0, 1.5])
    grad = jax.grad(lambda x: jnp.sum(clip_with_grad(x, 0.0, 1.0)))(x)
    np.testing.assert_array_equal(grad, [0.0, 1.0, 1.0, 1.0, 0.0])
    np.testing.assert_array_equal(clip_with_grad(x, 0.0, 1.0), jnp.clip(x, 0.0, 1.0))


def test_fgsm_output_shape_and_dtype():
    logits_fn, _, x, y = linear_problem(0)
    chex.assert_equal_shape([fgsm(logits_fn, x, y, KEY, eps=0.1), x])
    assert fgsm(logits_fn, x, y, KEY, eps=0.1).dtype == x.dtype


def test_losses_on_hand_computed_logits():
    logits = jnp.array([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 5.0]])
    y, t = jnp.array([0, 1]), jnp.array([1, 2])
    np.testing.assert_allclose(margin_loss(logits, y), [1.0 - 3.0, 5.0 - 2.0])
    # DLR: margin / (z_pi1 - z_pi3); sorted rows are (3, 1, 0, -1) and (5, 2, 1, 0).
    np.testing.assert_allclose(dlr_loss(logits, y), [-2.0 / 3.0, 3.0 / 4.0], rtol=1e-6)
    # Targeted DLR: (z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2).
    np.testing.assert_allclose(
        targeted_dlr_loss(logits, y, t), [(1.0 - 3.0) / 3.5, (1.0 - 2.0) / 4.5], rtol=1e-6
    )
    np.testing.assert_allclose(dlr_loss(10 * logits + 7, y), dlr_loss(logits, y), rtol=1e-5)


def test_l2_pgd_reaches_the_linear_optimum():
    logits_fn, w, x, y = linear_problem(11)
    direction = w[:, 1 - y].T - w[:, y].T
    optimum = x + 0.5 * direction / jnp.linalg.norm(direction, axis=1, keepdims=True)
    x_adv = pgd(
        logits_fn,
        x,
        y,
        jax.random.key(0),
        eps=0.5,
        step_size=0.2,
        steps=4,
        norm="l2",
        random_start=False,
    )
    np.testing.assert_allclose(x_adv, optimum, atol=1e-5)
    randomized = pgd(logits_fn, x, y, jax.random.key(0), eps=0.5, step_size=0.2, steps=3, norm="l2")
    assert float(jnp.max(jnp.linalg.norm(randomized - x, axis=1))) <= 0.5 + 1e-5


def test_restarts_keep_the_worst_point_per_example():
    logits_fn, _, x, y = linear_problem(12, batch=64, classes=5)
    kwargs = dict(eps=0.05, step_size=0.02, steps=2, loss="margin")
    key = jax.random.key(3)
    single = pgd(logits_fn, x, y, key, **kwargs)
    several = pgd(logits_fn, x, y, key, restarts=4, **kwargs)
    fooled_single = jnp.argmax(logits_fn(single), -1) != y
    fooled_several = jnp.argmax(logits_fn(several), -1) != y
    assert bool(jnp.all(fooled_several | ~fooled_single))  # restart 0 is the single run
    unfooled = ~fooled_several
    gain = margin_loss(logits_fn(several), y) - margin_loss(logits_fn(single), y)
    assert bool(jnp.all(jnp.where(unfooled, gain, 0.0) >= -1e-6))
    assert int(jnp.sum(fooled_several)) >= int(jnp.sum(fooled_single))


def test_targeted_pgd_reaches_the_target_and_cw_is_pgd_on_the_margin():
    logits_fn, _, x, y = linear_problem(13, batch=8, classes=3)
    targets = (y + 1) % 3
    x_adv = pgd(logits_fn, x, y, KEY, eps=1.0, step_size=0.1, steps=20, targets=targets)
    np.testing.assert_array_equal(jnp.argmax(logits_fn(x_adv), -1), targets)
    key = jax.random.key(4)
    eps = 24 / 255
    np.testing.assert_array_equal(
        make_attack("cw", eps=eps)(logits_fn, x, y, key),
        pgd(logits_fn, x, y, key, eps=eps, step_size=eps / 4, steps=20, loss="margin"),
    )


def test_attack_loss_dispatches_untargeted_and_targeted_losses():
    logits = jnp.array([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 5.0]])
    y, t = jnp.array([0, 1]), jnp.array([1, 2])
    expected = {
        ("ce", False): cross_entropy(logits, y),
        ("margin", False): margin_loss(logits, y),
        ("dlr", False): dlr_loss(logits, y),
        ("ce", True): -cross_entropy(logits, t),
        ("margin", True): -margin_loss(logits, t),
        ("dlr", True): targeted_dlr_loss(logits, y, t),
    }
    for (name, targeted), value in expected.items():
        got = attack_loss(name, logits, y, t if targeted else None)
        np.testing.assert_array_equal(got, value)
    # Untargeted losses grow as the true class loses; targeted ones as the target wins.
    assert attack_loss("margin", logits, y)[0] < 0 < attack_loss("margin", logits, y)[1]


def test_random_init_in_the_ball_and_on_the_sphere():
    x = jnp.full((64, 12), 0.5)
    for norm, size in (
        ("linf", lambda d: jnp.max(jnp.abs(d), axis=1)),
        ("l2", lambda d: jnp.linalg.norm(d, axis=1)),
    ):
        inside = random_init(KEY, x, 0.1, norm) - x
        assert float(jnp.max(size(inside))) <= 0.1 + 1e-6
        assert float(jnp.min(size(inside))) < 0.09  # a spread of radii, not the sphere
        on_sphere = random_init(KEY, x, 0.1, norm, on_sphere=True) - x
        np.testing.assert_allclose(size(on_sphere), 0.1, rtol=1e-5)
        np.testing.assert_array_equal(random_init(KEY, x, 0.1, norm, on_sphere=True) - x, on_sphere)


def test_host_loop_runs_the_iterations_and_compiles_one_program_per_computation():
    def body_scaled_by(scale):
        def body(i, carry):
            return {"total": carry["total"] * scale + i, "steps": carry["steps"] + 1}

        return body

    def expected(scale, steps):
        total = 0.0
        for i in range(steps):
            total = total * scale + i
        return total

    start = {"total": jnp.float32(0.0), "steps": jnp.int32(0)}
    out = loop(7, body_scaled_by(jnp.float32(2.0)), start, "host", "apgd")
    assert (float(out["total"]), int(out["steps"])) == (expected(2.0, 7), 7)
    with CompileCounter() as compiled:
        # Another closure over another array of the same shape, and another step count:
        # the same computation, so the compiled iteration is reused.
        out = loop(5, body_scaled_by(jnp.float32(3.0)), start, "host", "apgd")
    assert (float(out["total"]), int(out["steps"])) == (expected(3.0, 5), 5)
    assert compiled.names == []
    # Weights placed on a mesh (as restored checkpoints are): the carry starts where the
    # iteration returns it, so one new placement compiles once, not again at step 2.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    on_mesh = jax.device_put(jnp.float32(3.0), jax.sharding.NamedSharding(mesh, P()))
    with CompileCounter() as compiled:
        out = loop(5, body_scaled_by(on_mesh), start, "host", "apgd")
    assert (float(out["total"]), compiled.names) == (expected(3.0, 5), ["jit(run)"])
    with pytest.raises(ValueError, match='unroll="host" drives the loop from Python'):
        jax.jit(lambda c: loop(3, body_scaled_by(2.0), c, "host", "apgd"))(start)


def test_loop_forms_run_the_same_iterations():
    def body(i, carry):
        return carry * 2.0 + i

    expected = 0.0
    for i in range(7):
        expected = expected * 2.0 + i
    for unroll in (True, False, 1, 3, 7, None):
        assert float(loop(7, body, jnp.float32(0.0), unroll, "apgd")) == expected

    def loops(unroll, attack):  # loops in the program (fori_loop lowers to a scan)
        program = str(jax.make_jaxpr(lambda c: loop(20, body, c, unroll, attack))(0.0))
        return program.count("scan[") + program.count("while[")

    assert (loops(True, "pgd"), loops(False, "pgd"), loops(4, "pgd")) == (0, 1, 1)
    # None: the measured form of each attack on this backend.
    rolled = jax.default_backend() != "cpu" or CPU_UNROLL["square"] is not True
    assert loops(None, "square") == int(rolled)
    assert loops(None, "pgd") == int(
        jax.default_backend() != "cpu" or CPU_UNROLL["pgd"] is not True
    )
