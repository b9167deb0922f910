"""Square Attack: invariants, a linear classifier's analytic optimum, gradient masking, counts."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apart_jax.attacks import counting, margin_loss, pgd
from apart_jax.attacks.square import eta, p_schedule, square, square_side

SHAPE = (8, 8, 1)
CLASSES = 10


def linear_images(seed: int, batch: int = 64, shape=SHAPE, classes: int = CLASSES):
    """A linear classifier on flattened images, labels = its clean predictions (all correct).

    Pixels lie on the 1/255 grid inside [0.25, 0.75], so an eps <= 0.25 never meets the box.
    """
    k_w, k_x = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(k_w, (int(np.prod(shape)), classes))
    x = jax.random.uniform(k_x, (batch, *shape), minval=0.25, maxval=0.75)
    x = jnp.round(x * 255) / 255

    def logits_fn(z):
        return z.reshape(z.shape[0], -1) @ w

    return logits_fn, w, x, jnp.argmax(logits_fn(x), -1)


def optimal_margin(logits_fn, w, x, y, eps, norm):
    """The largest C&W margin (max other - true) in the eps-ball, ignoring the box (B,).

    For class j the margin is linear in x, so its maximum over the ball adds eps times the
    dual norm of w_j - w_y: L1 for L-inf, L2 for L2.
    """
    diff = w[:, :, None] - w[:, None, :]  # (F, j, y)
    dual = jnp.abs(diff).sum(0) if norm == "linf" else jnp.sqrt(jnp.square(diff).sum(0))
    z = logits_fn(x)
    best = z - z[jnp.arange(len(y)), y][:, None] + eps * dual[:, y].T
    return jnp.where(jax.nn.one_hot(y, w.shape[1], dtype=bool), -jnp.inf, best).max(-1)


def fooled(logits_fn, x_adv, y):
    return np.asarray(jnp.argmax(logits_fn(x_adv), -1) != y)


def box_images(seed: int, shape):
    """Images with pixels at and near the faces of [0, 1], where clipping binds."""
    values = jnp.array([0.0, 0.01, 0.3, 0.5, 0.99, 1.0])
    return jax.random.choice(jax.random.key(seed), values, (5, *shape))


@settings(max_examples=4, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    eps=st.floats(0.01, 1.0),
    channels=st.sampled_from([1, 3]),
    queries=st.integers(1, 30),
)
def test_linf_stays_on_the_vertices_of_the_ball_and_is_deterministic(seed, eps, channels, queries):
    shape = (5, 6, channels)  # not square
    logits_fn, _, _, _ = linear_images(seed, shape=shape, classes=3)
    x = box_images(seed, shape)
    y = jnp.arange(5) % 3

    def attack(key):
        return square(logits_fn, x, y, key, eps=eps, queries=queries)

    key = jax.random.key(seed)
    jitted = jax.jit(attack)
    x_adv = jitted(key)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert jnp.all(jnp.abs(x_adv - x) <= eps + 1e-6)
    assert jnp.all((x_adv >= 0.0) & (x_adv <= 1.0))
    # Every coordinate is x + eps or x - eps, up to the [0, 1] clip.
    on_vertex = (x_adv == jnp.clip(x + eps, 0.0, 1.0)) | (x_adv == jnp.clip(x - eps, 0.0, 1.0))
    assert bool(jnp.all(on_vertex))
    np.testing.assert_array_equal(jitted(key), x_adv)
    np.testing.assert_allclose(attack(key), x_adv, atol=1e-6)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.05, 3.0), queries=st.integers(1, 30))
def test_l2_stays_in_the_ball_and_the_box(seed, eps, queries):
    shape = (6, 6, 3)
    logits_fn, _, _, _ = linear_images(seed, shape=shape, classes=3)
    x = box_images(seed, shape)
    y = jnp.arange(5) % 3

    def attack(key):
        return square(logits_fn, x, y, key, eps=eps, norm="l2", queries=queries)

    key = jax.random.key(seed)
    jitted = jax.jit(attack)
    x_adv = jitted(key)
    norms = jnp.sqrt(jnp.sum(jnp.square(x_adv - x), axis=(1, 2, 3)))
    assert jnp.all(norms <= eps * (1 + 1e-5))
    assert jnp.all((x_adv >= 0.0) & (x_adv <= 1.0))
    np.testing.assert_array_equal(jitted(key), x_adv)
    np.testing.assert_allclose(attack(key), x_adv, atol=1e-6)


@pytest.mark.parametrize("norm, eps", [("linf", 8 / 255), ("l2", 0.15)])
def test_fools_the_attackable_examples_of_a_linear_classifier_and_no_others(norm, eps):
    logits_fn, w, x, y = linear_images(0)
    attackable = np.asarray(optimal_margin(logits_fn, w, x, y, eps, norm) > 0)
    assert 0.3 < attackable.mean() < 0.9  # both kinds are present
    x_adv = square(logits_fn, x, y, jax.random.key(1), eps=eps, norm=norm, queries=400)
    hit = fooled(logits_fn, x_adv, y)
    assert not np.any(hit & ~attackable)
    # Most attackable examples fall with a modest budget; with some slack, nearly all do.
    assert hit[attackable].mean() >= (0.9 if norm == "linf" else 0.75)
    easy = np.asarray(optimal_margin(logits_fn, w, x, y, 0.7 * eps, norm) > 0)
    assert hit[easy].mean() >= 0.9


def test_misclassified_points_are_kept_and_no_point_gets_worse_than_the_start():
    # Two classes with a clean margin of 0.05 along a random direction v: random stripes
    # already flip about half of the examples.
    x = jax.random.uniform(jax.random.key(0), (32, *SHAPE), minval=0.25, maxval=0.75)
    v = jax.random.normal(jax.random.key(1), SHAPE)
    y = jnp.zeros(32, jnp.int32)

    def logits_fn(z):
        score = jnp.sum((z - x) * v, axis=(1, 2, 3))
        return jnp.stack([jnp.full_like(score, 0.05), score], axis=-1)

    key = jax.random.key(3)
    start = square(logits_fn, x, y, key, eps=0.05, queries=1)  # the initial stripes
    x_adv = square(logits_fn, x, y, key, eps=0.05, queries=100)
    start_margin = margin_loss(logits_fn(start), y)
    fooled_at_start = np.asarray(start_margin >= 0)
    assert 0 < fooled_at_start.sum() < 32
    np.testing.assert_array_equal(x_adv[fooled_at_start], start[fooled_at_start])
    assert jnp.all(margin_loss(logits_fn(x_adv), y) >= start_margin)
    assert fooled(logits_fn, x_adv, y).all()


def test_square_breaks_gradient_masking_that_stops_pgd():
    logits_fn, w, x, y = linear_images(5)

    def masked(z):
        # 8-bit quantization: jnp.round has a zero gradient, so every input gradient is 0.
        return logits_fn(jnp.round(z * 255) / 255)

    eps = 12 / 255
    np.testing.assert_array_equal(jax.grad(lambda z: masked(z).sum())(x), 0.0)
    attackable = np.asarray(optimal_margin(logits_fn, w, x, y, eps, "linf") > 0)
    assert attackable.mean() > 0.9
    key = jax.random.key(5)
    x_pgd = pgd(masked, x, y, key, eps=eps, step_size=eps / 4, steps=10)
    x_square = square(masked, x, y, key, eps=eps, queries=300)
    accuracy_pgd = 1 - fooled(masked, x_pgd, y).mean()
    accuracy_square = 1 - fooled(masked, x_square, y).mean()
    assert accuracy_pgd >= 0.85  # only its random start moves
    assert accuracy_square <= 0.1
    # Without the mask PGD finds those points as well: the gap is the masking.
    x_pgd_plain = pgd(logits_fn, x, y, key, eps=eps, step_size=eps / 4, steps=10)
    assert 1 - fooled(logits_fn, x_pgd_plain, y).mean() <= 0.1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pass_counts_are_queries_and_stop_once_every_example_is_fooled(norm):
    logits_fn, _, x, y = linear_images(6, batch=8)
    label_bonus = 100.0 * jax.nn.one_hot(y, CLASSES)
    eps = 0.1 if norm == "linf" else 1.0
    counts = []

    @functools.partial(jax.jit, static_argnames="unroll")
    def run(bonus, unroll=1):
        # One compiled program for every bonus; its count is made (once) while tracing.
        counted, count = counting(lambda z: logits_fn(z) + bonus)
        counts.append(count)
        return square(
            counted, x, y, jax.random.key(0), eps=eps, norm=norm, queries=37, unroll=unroll
        )

    def passes(bonus, unroll=1):
        out = jax.block_until_ready(run(bonus, unroll))
        jax.effects_barrier()
        count = dataclasses.replace(counts[-1])
        counts[-1].forward = counts[-1].backward = 0
        return out, (count.forward, count.backward)

    # Never fooled: the full budget, one forward pass per query, no backward pass.
    robust_out, count = passes(label_bonus)
    assert count == (37, 0)
    # Fooled at the first query: nothing more is spent.
    assert passes(-label_bonus)[1] == (1, 0)
    # Fooled along the way: fewer passes than queries.
    out, (forward, backward) = passes(0.0 * label_bonus)
    assert 1 < forward < 37 and backward == 0
    assert fooled(logits_fn, out, y).all()
    if norm == "linf":  # the unrolled loop counts and computes the same
        unrolled_out, count = passes(label_bonus, unroll=4)
        assert count == (37, 0)
        np.testing.assert_allclose(unrolled_out, robust_out, atol=1e-6)
    # Driven from the host, the same points.
    host_out = square(
        lambda z: logits_fn(z) + label_bonus, x, y, jax.random.key(0), eps=eps, norm=norm,
        queries=37, unroll="host",
    )  # fmt: skip
    np.testing.assert_allclose(host_out, robust_out, atol=1e-6)


def test_p_schedule_and_square_sides_follow_the_reference():
    # Iterations are rescaled to 10,000 queries; p halves after 10, 50, ..., 8000.
    assert p_schedule(0.8, 10, 10_000) == 0.8
    assert p_schedule(0.8, 11, 10_000) == 0.4
    assert p_schedule(0.8, 6, 5_000) == 0.4  # int(6 / 5000 * 10000) = 12
    assert p_schedule(0.8, 201, 10_000) == 0.1
    assert p_schedule(0.8, 9_999, 10_000) == 0.8 / 512
    # CIFAR-10 size with AutoAttack's p_init = 0.8: round(sqrt(0.8 * 1024)) = 29.
    assert square_side(0.8, 32, 32, "linf") == 29
    assert square_side(0.8 / 512, 32, 32, "linf") == 1
    assert square_side(0.4, 32, 32, "l2") == 21  # round(20.24) = 20, made odd
    assert square_side(0.8 / 512, 32, 32, "l2") == 3
    assert square_side(1.0, 8, 8, "linf") == 7  # at most min(H, W) - 1


def test_l2_pattern_is_the_reference_double_bump():
    pattern = eta(5)
    np.testing.assert_allclose(np.sum(pattern**2), 1.0)
    assert np.all(pattern[:2] > 0) and np.all(pattern[2:] < 0)
    # Nested rectangles around the centre of each half: 1 + 1/4 + 1/9 against 1/4 + 1/9.
    np.testing.assert_allclose(pattern[1, 2] / pattern[0, 2], (1 + 1 / 4 + 1 / 9) / (1 / 4 + 1 / 9))
    np.testing.assert_allclose(pattern[0, 0] / pattern[0, 2], (1 / 9) / (1 / 4 + 1 / 9))
