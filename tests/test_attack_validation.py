"""Bad shapes, dtypes, keys and budgets raise a ValueError naming the argument, jit or not."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apart_jax.attacks import (
    apgd,
    apgd_targeted,
    autoattack,
    check_attack_inputs,
    counting,
    cw_linf,
    fab,
    fab_targeted,
    fgsm,
    make_attack,
    pgd,
    random_init,
    run_suite,
    square,
    uniform_start,
)

BATCH, SIDE, CLASSES = 3, 4, 5
EPS = 0.1
W = jax.random.normal(jax.random.key(1), (SIDE * SIDE, CLASSES))
X = jax.random.uniform(jax.random.key(2), (BATCH, SIDE, SIDE, 1), minval=0.25, maxval=0.75)
Y = jnp.arange(BATCH, dtype=jnp.int32)
KEY = jax.random.key(0)


def linear(x):
    return x.reshape(x.shape[0], -1) @ W


def _spec(fn, *, labels=True, key=True, logits=True, steps=None):
    return dict(fn=fn, labels=labels, key=key, logits=logits, steps=steps)


# Each attack as fn(logits_fn, x, y, key, eps, steps), with what it takes.
ATTACKS = {
    "fgsm": _spec(lambda f, x, y, k, eps, n: fgsm(f, x, y, eps=eps), key=False),
    "pgd": _spec(
        lambda f, x, y, k, eps, n: pgd(f, x, y, k, eps=eps, step_size=0.03, steps=n), steps="steps"
    ),
    "cw_linf": _spec(
        lambda f, x, y, k, eps, n: cw_linf(f, x, y, k, eps=eps, step_size=0.03, steps=n),
        steps="steps",
    ),
    "random_init": _spec(
        lambda f, x, y, k, eps, n: random_init(k, x, eps, "l2"), labels=False, logits=False
    ),
    "uniform_start": _spec(
        lambda f, x, y, k, eps, n: uniform_start(k, x, eps), labels=False, logits=False
    ),
    "apgd": _spec(lambda f, x, y, k, eps, n: apgd(f, x, y, k, eps=eps, steps=n), steps="steps"),
    "apgd_targeted": _spec(
        lambda f, x, y, k, eps, n: apgd_targeted(f, x, y, k, eps=eps, steps=n, n_target_classes=2),
        steps="steps",
    ),
    "fab": _spec(lambda f, x, y, k, eps, n: fab(f, x, y, k, eps=eps, steps=n), steps="steps"),
    "fab_targeted": _spec(
        lambda f, x, y, k, eps, n: fab_targeted(f, x, y, k, eps=eps, steps=n, n_target_classes=2),
        steps="steps",
    ),
    "square": _spec(
        lambda f, x, y, k, eps, n: square(f, x, y, k, eps=eps, queries=n), steps="queries"
    ),
}
# make_attack's callables, (logits_fn, x, y, key) with standard budgets; eps goes to make_attack.
ATTACKS.update(
    {
        f"make_attack:{name}": _spec(
            lambda f, x, y, k, eps, n, name=name: make_attack(name, eps=eps)(f, x, y, k)
        )
        for name in ("fgsm", "pgd20", "cw", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
    }
)

# name -> (what it changes, which part of the attack it needs, the message it must raise).
BAD_INPUTS = {
    "int_images": (dict(x=X.astype(jnp.int32)), None, r"^x must"),
    "no_batch_axis": (dict(x=X.reshape(-1)), None, r"^x must"),
    # Dropping the batch of one image leaves a 3-D x of batch SIDE != BATCH: y no longer fits.
    "dropped_batch_axis": (
        dict(x=X[0]),
        "labels",
        r"^x must be 4-D|^y must.*x float32 \(4, 4, 1\)",
    ),
    "float_labels": (dict(y=Y.astype(jnp.float32)), "labels", r"^y must"),
    "2d_labels": (dict(y=Y[:, None]), "labels", r"^y must"),
    "label_count_mismatch": (dict(y=Y[:-1]), "labels", r"^y must"),
    "float_key": (dict(key=jnp.zeros((2,), jnp.float32)), "key", r"^key must"),
    "batch_of_keys": (dict(key=jax.random.split(KEY, 3)), "key", r"^key must"),
    "short_raw_key": (dict(key=jnp.zeros((3,), jnp.uint32)), "key", r"^key must"),
    "negative_eps": (dict(eps=-0.1), None, r"^eps must"),
    "zero_steps": (dict(steps=0), "steps", r"^(steps|queries) must"),
    "logits_1d": (dict(logits_fn=lambda z: linear(z)[0]), "logits", r"^logits_fn must"),
    "logits_wrong_batch": (dict(logits_fn=lambda z: linear(z)[:-1]), "logits", r"^logits_fn must"),
    "logits_fn_fails_on_x": (
        dict(logits_fn=lambda z: z @ W),
        "logits",
        r"^logits_fn failed on x float32 \(3, 4, 4, 1\)",
    ),
}


def _call(spec, *, jit, x=X, y=Y, key=KEY, eps=EPS, steps=2, logits_fn=linear):
    def run(x, y, key):
        return spec["fn"](logits_fn, x, y, key, eps, steps)

    return (jax.jit(run) if jit else run)(x, y, key)


def _applicable(attack, bad):
    spec, (change, needs, _) = ATTACKS[attack], BAD_INPUTS[bad]
    if "eps" in change and attack.startswith("make_attack"):
        return False  # make_attack rejects eps itself (below)
    return needs is None or bool(spec[needs])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    "attack, bad",
    [(a, b) for a in sorted(ATTACKS) for b in sorted(BAD_INPUTS) if _applicable(a, b)],
)
def test_bad_inputs_raise_a_value_error_naming_the_argument(attack, bad, jit):
    change, _, message = BAD_INPUTS[bad]
    with pytest.raises(ValueError, match=message):
        _call(ATTACKS[attack], jit=jit, **change)


@pytest.mark.parametrize(
    "name", ["fgsm", "pgd20", "cw", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"]
)
def test_make_attack_rejects_bad_eps_and_norm(name):
    with pytest.raises(ValueError, match=r"^eps must"):
        make_attack(name, eps=-0.1)
    with pytest.raises(ValueError, match=r"^eps must"):
        make_attack(name, eps=1.5)
    if name not in ("fgsm", "cw"):
        with pytest.raises(ValueError, match=r"^norm must"):
            make_attack(name, eps=0.1, norm="l1")


def _apply(w, z):
    return z.reshape(z.shape[0], -1) @ w


@pytest.mark.parametrize(
    "suite", [functools.partial(run_suite, attacks=("fgsm",)), autoattack], ids=["run_suite", "aa"]
)
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=np.asarray(X).astype(np.int32)), r"^x must"),
        (dict(x=np.asarray(X).reshape(-1)), r"^x must"),
        (dict(y=np.asarray(Y).astype(np.float32)), r"^y must"),
        (dict(y=np.asarray(Y)[:-1]), r"^y must"),
        (dict(key=0), r"^key must"),
        (dict(eps=0.0), r"^eps must"),
        (dict(norm="linf2"), r"^norm must"),
        (dict(batch_size=0), r"^batch_size must"),
        (dict(apply_fn=lambda w, z: _apply(w, z)[:, 0]), r"^apply_fn\(variables, x\) must"),
    ],
)
def test_suites_reject_bad_inputs_before_attacking(suite, change, message):
    args = dict(apply_fn=_apply, x=np.asarray(X), y=np.asarray(Y), key=KEY, eps=EPS, norm="linf")
    args.update(change)
    apply_fn, x, y, key = (args.pop(k) for k in ("apply_fn", "x", "y", "key"))
    with pytest.raises(ValueError, match=message):
        suite(apply_fn, W, x, y, key, **args)


def test_messages_are_one_line_and_say_what_was_given():
    with pytest.raises(ValueError) as info:
        pgd(linear, X.astype(jnp.int32), Y, KEY, eps=EPS, step_size=0.03, steps=1)
    assert str(info.value) == (
        "x must be a floating array (B, ...) with B >= 1, got int32 (3, 4, 4, 1)"
    )
    with pytest.raises(ValueError) as info:
        pgd(linear, X, Y[:2], KEY, eps=EPS, step_size=0.03, steps=1)
    assert str(info.value) == (
        "y must be integer labels of shape (3,) to match the batch of x float32 (3, 4, 4, 1), "
        "got int32 (2,)"
    )
    with pytest.raises(ValueError) as info:
        fab(lambda z: linear(z)[:, :1], X, Y, KEY, eps=EPS, steps=1)
    assert "\n" not in str(info.value) and "got float32 (3, 1)" in str(info.value)


@pytest.mark.parametrize("attack", sorted(a for a in ATTACKS if not a.startswith("make_attack")))
def test_valid_inputs_pass_with_a_raw_key(attack):
    out = _call(ATTACKS[attack], jit=True, key=jax.random.PRNGKey(0))  # typed keys: above
    assert out.shape == X.shape and out.dtype == X.dtype


@pytest.mark.parametrize("attack", ["pgd", "square"])
def test_jit_equals_eager_on_valid_inputs(attack):
    eager = _call(ATTACKS[attack], jit=False)
    jitted = _call(ATTACKS[attack], jit=True)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)


def test_the_checks_add_no_forward_pass():
    counted, count = counting(linear)
    steps = 3
    jax.block_until_ready(
        jax.jit(lambda x: pgd(counted, x, Y, KEY, eps=EPS, step_size=0.03, steps=steps))(X)
    )
    jax.effects_barrier()
    assert (count.forward, count.backward) == (steps, steps)

    counted, count = counting(linear)
    jax.block_until_ready(fgsm(counted, X, Y, eps=EPS))
    jax.effects_barrier()
    assert (count.forward, count.backward) == (1, 1)


@pytest.mark.parametrize(
    "module, attack",
    [("core", "pgd"), ("apgd", "apgd"), ("fab", "fab"), ("square", "square")],
)
def test_the_checks_leave_the_traced_program_unchanged(monkeypatch, module, attack):
    def program():
        fn = functools.partial(_call, ATTACKS[attack], jit=False)
        return str(jax.make_jaxpr(lambda x, y: fn(x=x, y=y))(X, Y))

    checked = program()
    module = importlib.import_module(f"apart_jax.attacks.{module}")
    monkeypatch.setattr(module, "check_attack_inputs", lambda *a, **k: None)
    assert program() == checked


def test_traced_eps_is_not_read():
    out = jax.jit(uniform_start)(KEY, X, jnp.float32(EPS))
    assert out.shape == X.shape
    out = jax.jit(lambda eps: pgd(linear, X, Y, KEY, eps=eps, step_size=eps / 4, steps=1))(EPS)
    assert out.shape == X.shape


def test_check_attack_inputs_directly():
    check_attack_inputs(X, Y, key=KEY, logits_fn=linear, eps=EPS, norm="l2", steps=1)
    check_attack_inputs(np.asarray(X), np.asarray(Y).astype(np.int64), key=jax.random.PRNGKey(3))
    check_attack_inputs(X[:0], Y[:0], logits_fn=linear, allow_empty=True)
    with pytest.raises(ValueError, match=r"^x must"):
        check_attack_inputs(X[:0], Y[:0])
    with pytest.raises(ValueError, match=r"^x must be 4-D"):
        check_attack_inputs(X.reshape(BATCH, -1), images=True)
    with pytest.raises(ValueError, match=r"^targets must"):
        check_attack_inputs(X, Y, targets=Y.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"^restarts must"):
        check_attack_inputs(X, restarts=1.0)
    with pytest.raises(ValueError, match=r"^step_size must"):
        check_attack_inputs(X, step_size=0.0)
    with pytest.raises(ValueError, match=r"^logits_fn must be callable"):
        check_attack_inputs(X, logits_fn=W)
    with pytest.raises(ValueError, match=r"^logits_fn must"):
        check_attack_inputs(X, logits_fn=lambda z: (linear(z), linear(z)))
    with pytest.raises(ValueError, match=r"^logits_fn must"):
        check_attack_inputs(X, logits_fn=lambda z: jnp.argmax(linear(z), -1)[:, None] * Y)
