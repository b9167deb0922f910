"""Attacks over datasets in mini-batches, robust accuracy and the perturbation check."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apart_jax.attacks import (
    attack_in_batches,
    check_perturbation,
    fgsm,
    pgd,
    predict,
    robust_accuracy,
)


def linear_model(seed=0, features=10, classes=3):
    w = jax.random.normal(jax.random.key(seed), (features, classes))
    x = np.asarray(jax.random.uniform(jax.random.key(seed + 1), (23, features)))
    return (lambda v, x: x @ v), w, x


FGSM = functools.partial(fgsm, eps=0.05)


@pytest.mark.parametrize("batch_size", [1, 4, 7, 23, 100])
def test_any_batch_size_gives_the_full_batch_result(batch_size):
    apply_fn, w, x = linear_model()
    y = predict(apply_fn, w, x, batch_size=5)
    full = np.asarray(FGSM(lambda z: apply_fn(w, z), x, y, jax.random.key(0)))
    batched, predicted = attack_in_batches(
        apply_fn, w, FGSM, x, y, jax.random.key(0), batch_size=batch_size, predictions=True
    )
    np.testing.assert_allclose(batched, full, atol=1e-6)
    np.testing.assert_array_equal(predicted, predict(apply_fn, w, batched, batch_size=5))
    np.testing.assert_array_equal(predict(apply_fn, w, x, batch_size=batch_size), y)


def test_robust_accuracy_requires_clean_and_adversarial_correctness():
    apply_fn, w, x = linear_model(3)
    y = np.asarray(predict(apply_fn, w, x))
    y[:5] = (y[:5] + 1) % 3  # five clean mistakes
    attack = functools.partial(pgd, eps=0.05, step_size=0.02, steps=5)
    result = robust_accuracy(apply_fn, w, attack, x, y, jax.random.key(1), batch_size=6)
    adv_correct = predict(apply_fn, w, result.x_adv) == y
    clean_correct = predict(apply_fn, w, x) == y
    np.testing.assert_array_equal(result.robust, adv_correct & clean_correct)
    assert not result.robust[:5].any()
    assert result.accuracy == pytest.approx(np.mean(result.robust))
    check_perturbation(result.x_adv, x, eps=0.05, norm="linf")


def test_check_perturbation_names_what_is_wrong():
    x = np.full((4, 3), 0.5, np.float32)
    check_perturbation(x + 0.1, x, eps=0.1, norm="linf")
    check_perturbation(x + 0.05, x, eps=0.1, norm="l2")
    with pytest.raises(ValueError, match="exceed eps"):
        check_perturbation(x + 0.2, x, eps=0.1, norm="linf")
    with pytest.raises(ValueError, match="exceed eps"):
        check_perturbation(x + 0.1, x, eps=0.1, norm="l2")  # L2 norm 0.17
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_perturbation(x * 0 - 0.01, x * 0, eps=0.1, norm="linf")
    with pytest.raises(ValueError, match="shape"):
        check_perturbation(x[:2], x, eps=0.1, norm="linf")


def test_empty_inputs_are_fine():
    apply_fn, w, x = linear_model()
    assert predict(apply_fn, w, x[:0]).shape == (0,)
    out = attack_in_batches(apply_fn, w, FGSM, x[:0], np.zeros(0, int), jax.random.key(0))
    assert out.shape == (0, 10)
    assert float(jnp.sum(out)) == 0
    out, predicted = attack_in_batches(
        apply_fn, w, FGSM, x[:0], np.zeros(0, int), jax.random.key(0), predictions=True
    )
    assert out.shape == (0, 10) and predicted.shape == (0,)


def test_progress_bars_do_not_flood_a_log(capsys):
    apply_fn, w, x = linear_model()
    y = predict(apply_fn, w, x)
    attack_in_batches(apply_fn, w, FGSM, x, y, jax.random.key(0), batch_size=1, progress=True)
    # pytest captures stderr (not a terminal): the bar is drawn when it opens and when it
    # closes, not once per batch (23 batches here).
    drawn = [line for line in capsys.readouterr().err.split("\r") if line.strip()]
    assert 1 <= len(drawn) <= 2
    attack_in_batches(apply_fn, w, FGSM, x, y, jax.random.key(0), batch_size=1)
    assert capsys.readouterr().err == ""  # progress=False: no bar at all
