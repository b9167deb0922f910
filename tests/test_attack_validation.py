"""Bad arguments raise one ValueError naming the argument, jit or not.

Each case reaches one branch of the argument checks (``apart_jax.attacks.checks`` and the
attacks' own checks); the cases are spread over the attacks, so that every attack's own
arguments are checked as well.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apart_jax.attacks import (
    apgd,
    apgd_t,
    check_attack_inputs,
    counting,
    fab,
    fab_t,
    fgsm,
    make_attack,
    pgd,
    random_init,
    run_suite,
    square,
)
from apart_jax.attacks.box_projection import hyperplane_box_projection

BATCH, SIDE, CLASSES = 3, 4, 5
EPS = 0.1
W = jax.random.normal(jax.random.key(1), (SIDE * SIDE, CLASSES))
X = jax.random.uniform(jax.random.key(2), (BATCH, SIDE, SIDE, 1), minval=0.25, maxval=0.75)
Y = jnp.arange(BATCH, dtype=jnp.int32)
KEY = jax.random.key(0)
X_NP, Y_NP = np.asarray(X), np.asarray(Y)


def linear(x):
    return x.reshape(x.shape[0], -1) @ W


def classes(k):
    """A linear model with k classes."""
    return lambda x: linear(x)[:, :k]


# Every attack with small budgets, called as attack(logits_fn, x, y, key, eps=..., **kwargs).
ATTACKS = {
    "fgsm": fgsm,
    "pgd": functools.partial(pgd, step_size=0.03, steps=2),
    "apgd": functools.partial(apgd, steps=2),
    "apgd_t": functools.partial(apgd_t, steps=2, n_target_classes=2),
    "fab": functools.partial(fab, steps=2),
    "fab_t": functools.partial(fab_t, steps=2, n_target_classes=2),
    "square": functools.partial(square, queries=2),
}


def call(attack, *, jit=False, logits_fn=linear, x=X, y=Y, key=KEY, eps=EPS, **kwargs):
    def run(x, y, key):
        return ATTACKS[attack](logits_fn, x, y, key, eps=eps, **kwargs)

    return (jax.jit(run) if jit else run)(x, y, key)


# (attack, change, the message it must raise); one case per branch.
CASES = {
    "x_not_floating": ("pgd", dict(x=X.astype(jnp.int32)), r"^x must be a floating array"),
    "x_without_batch_axis": ("fgsm", dict(x=X.reshape(-1)), r"^x must be a floating array"),
    "x_empty": ("apgd", dict(x=X[:0], y=Y[:0]), r"^x must .* with B >= 1"),
    "x_not_images": ("square", dict(x=X.reshape(BATCH, -1)), r"^x must be 4-D"),
    "y_not_integer": ("fab", dict(y=Y.astype(jnp.float32)), r"^y must be integer labels"),
    "y_wrong_batch": ("apgd_t", dict(y=Y[:-1]), r"^y must .* got int32 \(2,\)"),
    "targets_not_integer": ("pgd", dict(targets=Y.astype(jnp.float32)), r"^targets must"),
    "targets_wrong_batch": ("fab", dict(targets=Y[:1]), r"^targets must"),
    "key_not_an_array": ("fgsm", dict(key=0), r"^key must be one PRNG key"),
    "key_float": ("square", dict(key=jnp.zeros((2,), jnp.float32)), r"^key must"),
    "key_batch_of_keys": ("fab_t", dict(key=jax.random.split(KEY, 3)), r"^key must"),
    "key_short_raw": ("apgd", dict(key=jnp.zeros((3,), jnp.uint32)), r"^key must"),
    "eps_not_a_number": ("pgd", dict(eps="0.1"), r"^eps must be a positive number, got '0.1'"),
    "eps_linf_above_1": ("fab", dict(eps=1.5), r"^eps must be in \(0, 1\] for norm 'linf'"),
    "eps_l2_negative": ("apgd", dict(eps=-1.0, norm="l2"), r"^eps must be in \(0, inf\)"),
    "norm": ("square", dict(norm="l1"), r"^norm must be one of \('linf', 'l2'\)"),
    "step_size": ("pgd", dict(step_size=0.0), r"^step_size must be a positive number"),
    "steps_zero": ("apgd", dict(steps=0), r"^steps must be a positive int, got 0"),
    "restarts_float": ("fab", dict(restarts=1.0), r"^restarts must be a positive int"),
    "queries_bool": ("square", dict(queries=True), r"^queries must be a positive int"),
    "unroll": ("pgd", dict(unroll=0), r'^unroll must be None, a bool, a positive int or "host"'),
    "loss_name": ("pgd", dict(loss="hinge"), r"^loss must be one of \('ce', 'margin', 'dlr'\)"),
    "loss_dlr_two_classes": (
        "apgd",
        dict(logits_fn=classes(2), loss="dlr"),
        r"^loss='dlr' needs logits with K >= 3 classes, got K=2",
    ),
    "targeted_dlr_three_classes": (
        "apgd_t",
        dict(logits_fn=classes(3)),
        r"^targeted loss='dlr' needs logits with K >= 4 classes, got K=3",
    ),
    "n_target_classes_zero": ("fab_t", dict(n_target_classes=0), r"^n_target_classes must"),
    "n_target_classes_above_k_minus_1": (
        "apgd_t",
        dict(n_target_classes=CLASSES),
        r"^n_target_classes must be in \[1, K - 1\] = \[1, 4\]",
    ),
    "interval_not_a_number": ("apgd", dict(rho="x"), r"^rho must be a number in \(0, 1\]"),
    "interval_open_low": ("apgd", dict(rho=0.0), r"^rho must be in \(0, 1\], got 0.0"),
    "interval_closed_high": ("apgd", dict(momentum=1.5), r"^momentum must be in \(0, 1\]"),
    "interval_closed_low": ("fab", dict(alpha_max=-0.1), r"^alpha_max must be in \[0, 1\]"),
    "interval_open_high": ("fab", dict(eta=float("inf")), r"^eta must be in \(0, inf\)"),
    "beta": ("fab", dict(beta=0.0), r"^beta must be in \(0, 1\]"),
    "p_init": ("square", dict(p_init=1.5), r"^p_init must be in \(0, 1\]"),
    "logits_fn_not_callable": ("pgd", dict(logits_fn=W), r"^logits_fn must be callable"),
    "logits_fn_fails_on_x": (
        "fab",
        dict(logits_fn=lambda z: z @ W),
        r"^logits_fn failed on x float32 \(3, 4, 4, 1\) \(inputs \(B, \.\.\.\)\): TypeError",
    ),
    "logits_1d": ("square", dict(logits_fn=lambda z: linear(z)[0]), r"^logits_fn must return"),
    "logits_wrong_batch": ("apgd", dict(logits_fn=lambda z: linear(z)[:-1]), r"^logits_fn must"),
    "logits_one_class": ("fab_t", dict(logits_fn=classes(1)), r"^logits_fn must return"),
    "logits_integer": (
        "pgd",
        dict(logits_fn=lambda z: jnp.argmax(linear(z), -1)[:, None] * Y),
        r"^logits_fn must return floating logits",
    ),
    "logits_tuple": ("fgsm", dict(logits_fn=lambda z: (linear(z), linear(z))), r"^logits_fn must"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_arguments_raise_a_value_error_naming_them(case):
    attack, change, message = CASES[case]
    with pytest.raises(ValueError, match=message):
        call(attack, **change)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_checks_under_jit_at_trace_time(attack):
    with pytest.raises(ValueError, match=r"^y must"):
        call(attack, jit=True, y=Y[:-1])
    if attack != "fgsm":  # FGSM has no loop
        with pytest.raises(ValueError, match=r"^unroll must"):
            call(attack, jit=True, unroll=-1)


def test_messages_are_one_line_and_say_what_was_given():
    with pytest.raises(ValueError) as info:
        call("pgd", x=X.astype(jnp.int32))
    assert str(info.value) == (
        "x must be a floating array (B, ...) with B >= 1, got int32 (3, 4, 4, 1)"
    )
    with pytest.raises(ValueError) as info:
        call("pgd", y=Y[:2])
    assert str(info.value) == (
        "y must be integer labels of shape (3,) to match the batch of x float32 (3, 4, 4, 1), "
        "got int32 (2,)"
    )
    with pytest.raises(ValueError) as info:
        call("fab", logits_fn=classes(1))
    assert str(info.value) == (
        "logits_fn must return floating logits of shape (3, K) with K >= 2 for x of shape "
        "(3, 4, 4, 1), got float32 (3, 1)"
    )


def test_make_attack_and_the_suite_check_their_own_arguments():
    with pytest.raises(ValueError, match=r"^unknown attack 'deepfool'; choose from \["):
        make_attack("deepfool", eps=EPS)
    with pytest.raises(ValueError, match=r"^attack 'cw' is L-inf only, got norm='l2'"):
        make_attack("cw", eps=0.5, norm="l2")
    with pytest.raises(ValueError, match=r"^eps must be in \(0, 1\]"):
        make_attack("pgd20", eps=1.5)
    with pytest.raises(ValueError, match=r"^norm must"):
        make_attack("square", eps=EPS, norm="l1")

    def apply_fn(w, z):
        return z.reshape(z.shape[0], -1) @ w

    def suite(apply_fn=apply_fn, x=X_NP, y=Y_NP, key=KEY, **kwargs):
        return run_suite(apply_fn, W, x, y, key, eps=EPS, attacks=("fgsm",), **kwargs)

    with pytest.raises(ValueError, match=r"^attacks must be a sequence of attack names"):
        run_suite(apply_fn, W, X_NP, Y_NP, KEY, eps=EPS, attacks="fgsm")
    with pytest.raises(ValueError, match=r"^batch_size must be a positive int"):
        suite(batch_size=0)
    with pytest.raises(ValueError, match=r"^key must"):
        suite(key=0)
    with pytest.raises(ValueError, match=r"^apply_fn\(variables, x\) must return"):
        suite(apply_fn=lambda w, z: apply_fn(w, z)[:, 0])


def test_random_init_and_the_projection_check_their_arguments():
    with pytest.raises(ValueError, match=r"^eps must be in \(0, inf\) for norm 'l2'"):
        random_init(KEY, X, -0.1, "l2")
    with pytest.raises(ValueError, match=r"^key must"):
        random_init(jnp.zeros(2), X, EPS, "linf")
    # (B,) radii on the sphere are arrays, not checked as one eps.
    out = random_init(KEY, X, jnp.full((BATCH,), 0.05), "linf", on_sphere=True)
    np.testing.assert_allclose(jnp.max(jnp.abs(out - X), axis=(1, 2, 3)), 0.05, rtol=1e-6)
    flat = X.reshape(BATCH, -1)
    with pytest.raises(ValueError, match=r"^norm must"):
        hyperplane_box_projection(flat, flat, jnp.zeros(BATCH), norm="l1")
    with pytest.raises(AssertionError):  # a shape mismatch inside the library: chex's check
        hyperplane_box_projection(flat, flat[:, :3], jnp.zeros(BATCH))


def test_valid_inputs_pass_with_a_raw_key():
    for attack in ATTACKS:
        out = call(attack, jit=True, key=jax.random.PRNGKey(0))  # typed keys: everywhere else
        assert out.shape == X.shape and out.dtype == X.dtype


@pytest.mark.parametrize("attack", ["pgd", "square"])
def test_jit_equals_eager_on_valid_inputs(attack):
    np.testing.assert_allclose(call(attack, jit=True), call(attack), atol=1e-6)


def test_the_checks_add_no_forward_pass():
    counted, count = counting(linear)
    jax.block_until_ready(jax.jit(lambda x: call("pgd", logits_fn=counted, x=x, steps=3))(X))
    jax.effects_barrier()
    assert (count.forward, count.backward) == (3, 3)

    counted, count = counting(linear)
    jax.block_until_ready(call("fgsm", logits_fn=counted))
    jax.effects_barrier()
    assert (count.forward, count.backward) == (1, 1)


@pytest.mark.parametrize(
    "module, attack",
    [("core", "pgd"), ("apgd", "apgd"), ("fab", "fab"), ("square", "square")],
)
def test_the_checks_leave_the_traced_program_unchanged(monkeypatch, module, attack):
    def program():
        return str(jax.make_jaxpr(lambda x, y: call(attack, x=x, y=y))(X, Y))

    checked = program()
    module = importlib.import_module(f"apart_jax.attacks.{module}")
    monkeypatch.setattr(module, "check_attack_inputs", lambda *a, **k: None)
    assert program() == checked


def test_traced_eps_is_not_read():
    out = jax.jit(lambda eps: random_init(KEY, X, eps, "linf"))(jnp.float32(EPS))
    assert out.shape == X.shape
    out = jax.jit(lambda eps: pgd(linear, X, Y, KEY, eps=eps, step_size=eps / 4, steps=1))(EPS)
    assert out.shape == X.shape


def test_check_attack_inputs_directly():
    check_attack_inputs(X, Y, key=KEY, logits_fn=linear, eps=EPS, norm="l2", steps=1)
    check_attack_inputs(np.asarray(X), np.asarray(Y).astype(np.int64), key=jax.random.PRNGKey(3))
    check_attack_inputs(X[:0], Y[:0], logits_fn=linear, allow_empty=True)
    # A closure that reads its input's values cannot be traced abstractly: shapes unchecked.
    check_attack_inputs(X, Y, logits_fn=lambda z: linear(z) * float(z[0, 0, 0, 0]))
