"""Training methods: equivalences between them, an independent reference APART, and learning."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from apart_jax.augment import Augmentation
from apart_jax.methods.grad_align import alignment_penalty, gradient_cosines
from apart_jax.models import SITES
from apart_jax.optim import cyclic_sgd
from apart_jax.run import create_train_state, setup_run
from apart_jax.state import StepInputs
from apart_jax.step import Batch, draw_batch, make_train_step

EPS = 8 / 255


def build(digits, method, **overrides):
    """A run on the digits with flips on (so that every transform is exercised)."""
    return setup_run(tiny_config(method=method, flip=True, **overrides), digits)


def fixed_batch(size=16, seed=0, pad=1):
    rng = np.random.default_rng(seed)
    return Batch(
        jnp.asarray(rng.choice(1438, size, replace=False), jnp.int32),
        Augmentation(
            jnp.asarray(rng.integers(0, 2 * pad + 1, (size, 2)), jnp.int32),
            jnp.asarray(rng.integers(0, 2, size).astype(bool)),
        ),
    )


def with_optimizers(run, psi=None, **ctx_changes):
    """The run's method with other optimizers (or options), from a fresh state."""
    ctx = dataclasses.replace(run.ctx, **ctx_changes)
    state = create_train_state(
        run.config,
        run.model,
        run.method,
        ctx,
        image_shape=run.dataset.image_shape,
        num_train=len(run.dataset.y_train),
        pad=run.augment.pad,
    )
    if psi is not None:
        psi = jax.tree.map(jnp.copy, psi)  # steps donate their state: never share arrays
        state = state.replace(psi=psi)
        state = state.replace(
            psi_opt_state=ctx.psi_tx.init(psi),
            psi_decay_state=ctx.weight_tx.init(psi) if ctx.psi_in_weight_optimizer else (),
        )
    return state, make_train_step(run.method, ctx, run.augment, run.mesh)


def set_psi(psi, alpha, alpha_omega, layer_alpha):
    return {
        k: (
            {"alpha": jnp.float32(layer_alpha)}
            if isinstance(v, dict)
            else jnp.float32(alpha if k == "alpha" else alpha_omega)
        )
        for k, v in psi.items()
    }


def assert_trees_close(a, b, **tolerance):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tolerance), a, b)


def trees_differ(a, b, atol):
    return any(
        not np.allclose(u, v, atol=atol)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


SGD = optax.chain(optax.add_decayed_weights(2e-4), optax.sgd(0.1, momentum=0.9))


def test_apart_with_psi_frozen_at_fgsm_values_takes_the_fgsm_step(digits):
    fgsm_run = build(digits, "fgsm", model="preact_resnet18")
    apart_run = build(digits, "apart", model="preact_resnet18")
    frozen = dict(weight_tx=SGD, psi_tx=optax.set_to_zero(), psi_in_weight_optimizer=False)
    fgsm_state, fgsm_step = with_optimizers(fgsm_run, weight_tx=SGD)
    fgsm_psi = set_psi(fgsm_state.psi, alpha=EPS, alpha_omega=0.0, layer_alpha=0.0)
    frozen_values = jax.device_get(fgsm_psi)  # steps donate their input state
    apart_state, apart_step = with_optimizers(apart_run, psi=fgsm_psi, **frozen)
    weaker_psi = set_psi(fgsm_state.psi, alpha=EPS / 2, alpha_omega=0.0, layer_alpha=0.0)
    weaker_state, _ = with_optimizers(apart_run, psi=weaker_psi, **frozen)
    for seed in (0, 1):  # two steps, so that momentum takes part
        batch = fixed_batch(seed=seed)
        fgsm_state, _ = fgsm_step.on_batch(fgsm_state, fgsm_run.data, batch)
        apart_state, _ = apart_step.on_batch(apart_state, apart_run.data, batch)
        weaker_state, _ = apart_step.on_batch(weaker_state, apart_run.data, batch)
    assert_trees_close(apart_state.params, fgsm_state.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(apart_state.batch_stats, fgsm_state.batch_stats, rtol=1e-5, atol=1e-6)
    assert_trees_close(apart_state.psi, frozen_values, rtol=0, atol=0)
    # The comparison can fail: another step size leads elsewhere.
    assert trees_differ(weaker_state.params, fgsm_state.params, atol=1e-4)


def test_fgsm_plus_equals_apart_with_the_layer_noise_off(digits):
    psi_tx = optax.sgd(1e-3, momentum=0.9)
    plus_run, apart_run = build(digits, "fgsm_plus"), build(digits, "apart")
    plus_state, plus_step = with_optimizers(plus_run, weight_tx=SGD, psi_tx=psi_tx)
    off = set_psi(plus_state.psi, 0.02, 0.01, 0.0)
    on = set_psi(plus_state.psi, 0.02, 0.01, 0.05)
    plus_state, plus_step = with_optimizers(plus_run, psi=off, weight_tx=SGD, psi_tx=psi_tx)
    apart_off, apart_step = with_optimizers(apart_run, psi=off, weight_tx=SGD, psi_tx=psi_tx)
    apart_on, _ = with_optimizers(apart_run, psi=on, weight_tx=SGD, psi_tx=psi_tx)
    batch = fixed_batch(seed=3)
    plus_state, plus_metrics = plus_step.on_batch(plus_state, plus_run.data, batch)
    apart_off, apart_metrics = apart_step.on_batch(apart_off, apart_run.data, batch)
    apart_on, _ = apart_step.on_batch(apart_on, apart_run.data, batch)
    for field in ("params", "batch_stats", "omega"):
        assert_trees_close(
            getattr(apart_off, field), getattr(plus_state, field), rtol=1e-5, atol=1e-6
        )
    for name in ("alpha", "alpha_omega"):
        np.testing.assert_allclose(apart_off.psi[name], plus_state.psi[name], rtol=1e-5)
    np.testing.assert_allclose(apart_metrics["loss"], plus_metrics["loss"], rtol=1e-6)
    # Only APART learns the layer alphas; with them non-zero the steps differ.
    assert float(apart_off.psi["stage1_block1"]["alpha"]) != 0.0
    assert float(plus_state.psi["stage1_block1"]["alpha"]) == 0.0
    assert trees_differ(apart_on.params, plus_state.params, atol=1e-5)


def test_learned_steps_below_both_radii_train_the_same_at_both(digits):
    """eps enters APART (and FGSM+, APART without layer noise) only as the clip of the input
    perturbation: while |delta| <= alpha + alpha_omega stays below 8/255 the runs at 8/255
    and 16/255 take the same steps (the fast-AT study's runs at both radii, docs/results.md)."""
    runs = [build(digits, "apart", eps=eps) for eps in (EPS, 2 * EPS)]
    ends = {}
    for alpha in (EPS / 3, 1.5 * EPS):  # below 8/255 with alpha_omega; above it
        for run in runs:
            psi = set_psi(run.state.psi, alpha, EPS / 6, 0.01)
            state, step = with_optimizers(run, psi=psi, weight_tx=SGD)
            for seed in (0, 1):  # two steps, so that momentum and Omega's update take part
                state, _ = step.on_batch(state, run.data, fixed_batch(seed=seed))
            ends[alpha, run.config.eps] = jax.device_get(state)
    for field in ("params", "batch_stats", "psi", "omega"):
        below = [getattr(ends[EPS / 3, eps], field) for eps in (EPS, 2 * EPS)]
        assert_trees_close(*below, rtol=0, atol=0)
    above = [ends[1.5 * EPS, eps].params for eps in (EPS, 2 * EPS)]
    assert trees_differ(*above, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A reference APART step written independently from its description in docs/algorithm.md#apart,
# with NumPy crops and a hand-written PyTorch SGD, to check the library's step against it.


def torch_clamp(x, lo, hi):
    return jnp.where((x >= lo) & (x <= hi), x, jax.lax.stop_gradient(jnp.clip(x, lo, hi)))


def crop(frame, offset, flip, size):
    window = frame[offset[0] : offset[0] + size, offset[1] : offset[1] + size]
    return window[:, ::-1] if flip else window


def reference_gradients(model, params, stats, psi, x, om, y, layer_noise):
    """Steps 1-6 of docs/algorithm.md#apart for one batch.

    Returns the BN statistics after pass 2 and L1's gradients for weights, psi and input.
    """

    def forward(params, stats, x_in, sites):
        variables = {"params": params, "batch_stats": stats}
        if sites is not None:
            variables[SITES] = sites
        logits, mutated = model.apply(variables, x_in, train=True, mutable=["batch_stats"])
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        return loss, mutated["batch_stats"]

    def delta_0(psi):
        return torch_clamp(psi["alpha_omega"] * om, -EPS, EPS)

    x0 = torch_clamp(x + delta_0(psi), 0.0, 1.0)
    _, site_shapes = model.apply(
        {"params": params, "batch_stats": stats}, x0, train=True, mutable=[SITES, "batch_stats"]
    )
    zeros = jax.tree.map(jnp.zeros_like, site_shapes[SITES])
    (_, stats1), (g_x, g_sites) = jax.value_and_grad(
        lambda xi, s: forward(params, stats, xi, s), argnums=(0, 1), has_aux=True
    )(x0, zeros)

    def loss1(params, psi, x_probe):
        delta = torch_clamp(delta_0(psi) + psi["alpha"] * jnp.sign(g_x), -EPS, EPS)
        x_adv = torch_clamp(x + delta, 0.0, 1.0) + x_probe
        sites = None
        if layer_noise:
            sites = {
                b: {"preact": psi[b]["alpha"] * jnp.sign(g["preact"])} for b, g in g_sites.items()
            }
        return forward(params, stats1, x_adv, sites)

    (_, stats2), grads = jax.value_and_grad(loss1, argnums=(0, 1, 2), has_aux=True)(
        params, psi, jnp.zeros_like(x)
    )
    return stats2, grads


class TorchSGD:
    """torch.optim.SGD(momentum, weight_decay) on a pytree, rate and momentum given per step."""

    def __init__(self, weight_decay):
        self.weight_decay, self.buffer = weight_decay, None

    def step(self, value, grad, lr, momentum):
        d = jax.tree.map(lambda g, p: g + self.weight_decay * p, grad, value)
        if self.buffer is None:
            self.buffer = d
        else:
            self.buffer = jax.tree.map(lambda b, d: momentum * b + d, self.buffer, d)
        return jax.tree.map(lambda p, b: p - lr * b, value, self.buffer)


def reference_apart(run, state, batches, *, peak_w, peak_p, cycle, layer_noise, quirk):
    params, stats, psi = state.params, state.batch_stats, state.psi
    omega_all = np.array(state.omega)
    images = np.asarray(run.dataset.x_train, np.float32) / 255
    weights_sgd = TorchSGD(run.config.weight_decay)
    psi_sgd = TorchSGD(run.config.psi_weight_decay)
    psi_in_weights_sgd = TorchSGD(run.config.weight_decay)
    for t, batch in enumerate(batches):
        idx = np.asarray(batch.indices)
        offsets, flips = np.asarray(batch.aug.offsets), np.asarray(batch.aug.flips)
        padded = np.pad(images[idx], ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=0.5)
        x = np.stack([crop(padded[b], offsets[b], flips[b], 8) for b in range(len(idx))])
        om = np.stack([crop(omega_all[i], offsets[b], flips[b], 8) for b, i in enumerate(idx)])
        y = jnp.asarray(run.dataset.y_train[idx])
        new_stats, (g_w, g_psi, g_in) = reference_gradients(
            run.model, params, stats, psi, jnp.asarray(x), jnp.asarray(om), y, layer_noise
        )
        ratio = psi["alpha"] / (psi["alpha_omega"] + 1e-7)
        new_om = np.asarray(jnp.clip(om + ratio * jnp.sign(g_in), -1, 1))
        for b, i in enumerate(idx):
            row, col = offsets[b]
            window = new_om[b][:, ::-1] if flips[b] else new_om[b]
            omega_all[i, row : row + 8, col : col + 8] = window

        tri = 1 - abs(2 * (t % cycle) / cycle - 1)
        momentum = 0.9 - 0.1 * tri
        stats = new_stats
        params = weights_sgd.step(params, g_w, peak_w * tri, momentum)
        psi = psi_sgd.step(psi, jax.tree.map(jnp.negative, g_psi), peak_p * tri, momentum)
        if quirk:
            no_grad = jax.tree.map(jnp.zeros_like, psi)
            psi = psi_in_weights_sgd.step(psi, no_grad, peak_w * tri, momentum)
    return params, stats, psi, omega_all


@pytest.mark.parametrize("method, quirk", [("apart", True), ("apart", False), ("fgsm_plus", True)])
def test_step_matches_a_reference_written_from_the_spec(digits, method, quirk):
    """Three library steps equal three steps of :func:`reference_apart`.

    The reference is a second, independent implementation of the step described in
    docs/algorithm.md#apart (NumPy crops and write-back, PyTorch-style SGD written out).
    """
    run = build(digits, method)
    peak_w, peak_p, cycle = 0.2, 2e-4, 4
    ctx = dict(
        weight_tx=cyclic_sgd(peak_w, cycle, weight_decay=run.config.weight_decay),
        psi_tx=cyclic_sgd(peak_p, cycle, weight_decay=run.config.psi_weight_decay),
        psi_in_weight_optimizer=quirk,
    )
    state, step = with_optimizers(run, psi=set_psi(run.state.psi, 0.01, 0.02, 0.003), **ctx)
    batches = [fixed_batch(seed=s) for s in (4, 5, 6)]
    expected = reference_apart(
        run,
        state,
        batches,
        peak_w=peak_w,
        peak_p=peak_p,
        cycle=cycle,
        layer_noise=method == "apart",
        quirk=quirk,
    )
    for batch in batches:
        state, _ = step.on_batch(state, run.data, batch)
    params, stats, psi, omega = expected
    assert_trees_close(state.params, params, rtol=1e-4, atol=1e-6)
    assert_trees_close(state.batch_stats, stats, rtol=1e-4, atol=1e-6)
    assert_trees_close(state.psi, psi, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(state.omega, omega, atol=1e-5)
    assert not np.allclose(state.omega, run.state.omega)


def test_psi_ascends_the_loss_unless_its_decay_dominates(digits):
    run = build(digits, "apart")
    psi_tx = optax.chain(optax.add_decayed_weights(400.0), optax.sgd(1e-6))
    small, step = with_optimizers(
        run,
        psi=set_psi(run.state.psi, 1e-4, 1e-4, 0.0),
        psi_tx=psi_tx,
        psi_in_weight_optimizer=False,
    )
    # Above eps every clip binds: the loss no longer depends on alpha, only decay acts.
    large, _ = with_optimizers(
        run,
        psi=set_psi(run.state.psi, 0.5, 1e-4, 0.0),
        psi_tx=psi_tx,
        psi_in_weight_optimizer=False,
    )
    batch = fixed_batch(seed=7)
    small_after, _ = step.on_batch(small, run.data, batch)
    large_after, _ = step.on_batch(large, run.data, batch)
    # A larger FGSM step raises the loss of a fresh model: alpha grows.
    assert float(small_after.psi["alpha"]) > 1e-4
    np.testing.assert_allclose(large_after.psi["alpha"], 0.5 * (1 - 1e-6 * 400), rtol=1e-6)


@pytest.mark.parametrize(
    "method", ["fgsm", "fgsm_rs", "fgsm_plus", "apart", "pgd", "nfgsm", "grad_align"]
)
def test_each_method_lowers_its_loss_on_a_fixed_batch(digits, method):
    run = build(digits, method, pgd_steps=3)
    state, step = with_optimizers(run, weight_tx=optax.sgd(0.2, momentum=0.9))
    batch = fixed_batch(size=32, seed=8)
    losses = []
    for _ in range(10):
        state, metrics = step.on_batch(state, run.data, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 10
    assert losses[-1] < 0.9 * losses[0], losses


def test_drawn_step_equals_the_explicit_step_on_the_drawn_batch(digits):
    run = build(digits, "fgsm_rs")
    order = jnp.arange(1438, dtype=jnp.int32)[::-1]
    batch = draw_batch(run.state, order, jnp.int32(32), 32, run.augment)
    np.testing.assert_array_equal(batch.indices, order[32:64])
    drawn, drawn_metrics = run.train_step.in_epoch(
        jax.tree.map(jnp.copy, run.state), run.data, order, jnp.int32(32), batch_size=32
    )
    explicit, explicit_metrics = run.train_step.on_batch(run.state, run.data, batch)
    assert_trees_close(drawn.params, explicit.params, rtol=0, atol=0)
    assert float(drawn_metrics["loss"]) == float(explicit_metrics["loss"])


def test_passes_per_step(digits):
    expected = {"clean": 1, "fgsm": 2, "fgsm_rs": 2, "fgsm_plus": 2, "apart": 2, "pgd": 11}
    expected.update(nfgsm=2, grad_align=5)
    for name, passes in expected.items():
        assert build(digits, name).method.passes_per_step == passes


# ---------------------------------------------------------------------------------------------
# N-FGSM and GradAlign.


def step_inputs(run, seed=0, size=16):
    """A batch of the run's training images as a method step sees it (no augmentation)."""
    batch = fixed_batch(size=size, seed=seed, pad=0)
    x = run.data.images[batch.indices].astype(jnp.float32) / 255.0
    return StepInputs(x, run.data.labels[batch.indices], batch.indices, batch.aug,
                      jax.random.key(seed))  # fmt: skip


def test_nfgsm_without_noise_and_with_projection_is_fgsm(digits):
    fgsm_run = build(digits, "fgsm")
    fgsm_state, fgsm_step = with_optimizers(fgsm_run, weight_tx=SGD)
    nfgsm_run = build(digits, "nfgsm", nfgsm_noise_scale=0.0)
    projected = dataclasses.replace(nfgsm_run.method, projected=True)
    nfgsm_state, _ = with_optimizers(nfgsm_run, weight_tx=SGD)
    ctx = dataclasses.replace(nfgsm_run.ctx, weight_tx=SGD)
    nfgsm_step = make_train_step(projected, ctx, nfgsm_run.augment, nfgsm_run.mesh)
    unprojected_state, unprojected_step = with_optimizers(nfgsm_run, weight_tx=SGD)
    for seed in (0, 1):
        batch = fixed_batch(seed=seed)
        fgsm_state, _ = fgsm_step.on_batch(fgsm_state, fgsm_run.data, batch)
        nfgsm_state, _ = nfgsm_step.on_batch(nfgsm_state, nfgsm_run.data, batch)
        unprojected_state, _ = unprojected_step.on_batch(unprojected_state, nfgsm_run.data, batch)
    assert_trees_close(nfgsm_state.params, fgsm_state.params, rtol=0, atol=0)
    assert_trees_close(nfgsm_state.batch_stats, fgsm_state.batch_stats, rtol=0, atol=0)
    # With k = 0 the step of eps from x stays in the ball: projecting changes nothing.
    assert_trees_close(unprojected_state.params, fgsm_state.params, rtol=0, atol=0)


@pytest.mark.parametrize("eps", [8 / 255, 16 / 255])
def test_nfgsm_steps_alpha_from_the_noisy_start_and_does_not_project(digits, eps):
    run = build(digits, "nfgsm", eps=eps)
    ctx = dataclasses.replace(run.ctx, eps=eps)
    inputs = step_inputs(run)
    x = inputs.x
    start = run.method.start(ctx, inputs)
    x_adv, _ = run.method.attack(ctx, run.state, inputs)
    noise = start - x
    assert float(jnp.max(jnp.abs(noise))) <= 2 * eps + 1e-7
    assert float(jnp.max(jnp.abs(noise))) > 1.5 * eps  # k = 2: the noise leaves the ball
    step = x_adv - start
    inside = (x_adv > 0) & (x_adv < 1)  # where [0, 1] did not clip, the step is +-alpha
    np.testing.assert_allclose(jnp.abs(step)[inside], eps, rtol=1e-5)
    assert float(jnp.max(jnp.abs(x_adv - x))) > 2 * eps  # not projected back to the ball
    assert float(jnp.min(x_adv)) >= 0 and float(jnp.max(x_adv)) <= 1


def test_gradient_cosines_of_known_pairs():
    g1 = jnp.array([[1.0, 0.0], [1.0, 2.0], [3.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    g2 = jnp.array([[0.0, 5.0], [2.0, 4.0], [-1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    cos, defined = gradient_cosines(g1, g2)
    np.testing.assert_allclose(cos, [0.0, 1.0, -1.0, 0.0, 2**-0.5], rtol=1e-6)
    np.testing.assert_array_equal(defined, [True, True, True, False, True])
    # The zero gradient is left out of the mean: 1 - (0 + 1 - 1 + 0.7071) / 4.
    np.testing.assert_allclose(alignment_penalty(g1, g2), 1 - 2**-0.5 / 4, rtol=1e-6)
    grads = jax.grad(lambda g: alignment_penalty(g, g2))(g1)
    assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads[3]).sum()) == 0.0


@pytest.mark.parametrize("base", ["fgsm", "fgsm_rs"])
def test_grad_align_with_lambda_zero_is_its_base_method(digits, base):
    base_run = build(digits, base)
    align_run = build(digits, "grad_align", grad_align_lambda=0.0, grad_align_base=base)
    assert align_run.method.passes_per_step == 2
    base_state, base_step = with_optimizers(base_run, weight_tx=SGD)
    align_state, align_step = with_optimizers(align_run, weight_tx=SGD)
    for seed in (0, 1):
        batch = fixed_batch(seed=seed)
        base_state, _ = base_step.on_batch(base_state, base_run.data, batch)
        align_state, _ = align_step.on_batch(align_state, align_run.data, batch)
    assert_trees_close(align_state.params, base_state.params, rtol=0, atol=0)
    assert_trees_close(align_state.batch_stats, base_state.batch_stats, rtol=0, atol=0)


def reference_grad_align(run, params, stats, inputs, lam):
    """The release's GradAlign step (FGSM base, zero init) written from its code: the loss
    CE(x_adv) + lam * (1 - mean cos(g1, g2)) and the BN statistics after its three passes.

    g1 is FGSM's gradient at x (a constant), g2 the gradient at x + eta2 with eta2 drawn
    from the step key's second half (the library's key split), differentiated through.
    """
    x, y, eps = inputs.x, inputs.y, run.ctx.eps

    def forward(params, stats, x):
        logits, mutated = run.model.apply(
            {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        return logits, mutated["batch_stats"]

    def mean_ce(logits):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    def input_grad(params, stats, x):
        return jax.grad(lambda x: mean_ce(forward(params, stats, x)[0]))(x)

    g1 = input_grad(params, stats, x)
    stats = forward(params, stats, x)[1]
    x_adv = jnp.clip(x + eps * jnp.sign(g1), 0, 1)
    eta2 = jax.random.uniform(jax.random.split(inputs.key)[1], x.shape, x.dtype, -eps, eps)

    def loss(params):
        logits, adv_stats = forward(params, stats, x_adv)
        g2 = input_grad(params, adv_stats, x + eta2)
        a, b = g1.reshape(len(y), -1), g2.reshape(len(y), -1)
        keep = (jnp.linalg.norm(a, axis=1) != 0) & (jnp.linalg.norm(b, axis=1) != 0)
        cos = jnp.sum(a * b, 1) / (jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1))
        penalty = 1.0 - jnp.sum(jnp.where(keep, cos, 0.0)) / jnp.sum(keep)
        return mean_ce(logits) + lam * penalty, forward(params, adv_stats, x + eta2)[1]

    (value, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, grads, new_stats


def test_grad_align_step_matches_the_release_formulation(digits):
    lam, lr = 0.5, 0.1
    run = build(digits, "grad_align", grad_align_lambda=lam)
    ctx = dataclasses.replace(run.ctx, weight_tx=optax.sgd(lr))
    inputs = step_inputs(run, seed=5, size=32)
    params, stats = jax.device_get(run.state.params), jax.device_get(run.state.batch_stats)
    reference = jax.jit(lambda *args: reference_grad_align(run, *args))
    value, grads, ref_stats = reference(params, stats, inputs, lam)
    state = run.state.replace(opt_state=ctx.weight_tx.init(run.state.params))
    new_state, metrics = jax.jit(run.method.step, static_argnums=0)(ctx, state, inputs)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    expected = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    # Tolerance: float32 sums of the same terms in another order (observed <= 2e-7).
    assert_trees_close(new_state.params, expected, rtol=1e-5, atol=2e-6)
    assert_trees_close(new_state.batch_stats, ref_stats, rtol=1e-5, atol=1e-6)
    # The penalty's gradient is not negligible: without it the update differs.
    _, plain_grads, _ = reference(params, stats, inputs, 0.0)
    assert trees_differ(grads, plain_grads, atol=1e-4)
