"""The release's cyclic SGD against a hand-written PyTorch-style recurrence."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from apart_jax.optim import cyclic_sgd, triangle


def test_triangle_rises_to_one_at_mid_cycle_and_restarts():
    tri = triangle(8)
    values = [float(tri(t)) for t in range(17)]
    np.testing.assert_allclose(values[:9], [0, 0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25, 0])
    np.testing.assert_allclose(values[8:], values[:9])


def test_triangle_rejects_empty_cycles():
    with pytest.raises(ValueError, match="cycle_steps"):
        triangle(0)


def test_cyclic_sgd_equals_pytorch_sgd_with_cyclic_lr_and_momentum():
    peak, cycle, wd, m_max, m_min = 0.2, 6, 0.05, 0.9, 0.8
    grads = [0.3, -1.0, 0.5, 2.0, -0.7, 0.1, 0.4, -0.2, 1.1]
    tx = cyclic_sgd(peak, cycle, weight_decay=wd, momentum_max=m_max, momentum_min=m_min)
    params = jnp.array(1.5)
    state = tx.init(params)
    p, buf = 1.5, None
    for t, g in enumerate(grads):
        updates, state = tx.update(jnp.array(g), state, params)
        params = optax.apply_updates(params, updates)
        # torch.optim.SGD(momentum, weight_decay) stepped by CyclicLR(base_lr=0, max_lr=peak).
        scale = 1 - abs(2 * (t % cycle) / cycle - 1)
        lr, momentum = peak * scale, m_max - (m_max - m_min) * scale
        d = g + wd * p
        buf = d if buf is None else momentum * buf + d
        p -= lr * buf
        np.testing.assert_allclose(float(params), p, rtol=1e-6)
    assert p != 1.5


def pytorch_cyclic_scale(t: int, cycle: int) -> float:
    """CyclicLR's triangular scale at step t, as PyTorch computes it (Python floats, float64),
    for step_size_up = step_size_down = cycle / 2 (the release's setting)."""
    up = cycle / 2
    ratio = up / cycle
    position = 1.0 + t / cycle
    x = position - np.floor(position)
    return x / ratio if x <= ratio else (x - 1) / (ratio - 1)


@pytest.mark.parametrize("cycle", [11_730, 11_731])  # the release's 30 x 391 steps; odd
def test_triangle_rounds_once_against_pytorchs_float64_schedule(cycle):
    steps = np.arange(2 * cycle + 3)
    ours = np.asarray(triangle(cycle)(jnp.asarray(steps)), np.float64)
    assert ours.dtype == np.float64 and triangle(cycle)(jnp.asarray(1)).dtype == jnp.float32
    reference = np.array([pytorch_cyclic_scale(int(t), cycle) for t in steps])
    # Exact integers and one division: within one float32 ulp, 2**-23 relative (measured 6.05e-8
    # at most: XLA:CPU may divide through a reciprocal, so two roundings). The former
    # 1 - |2 t / T - 1| in float32 was 1.5e-4 off at t = 1.
    np.testing.assert_allclose(ours, reference, rtol=2.0**-23, atol=0)
    assert ours[0] == 0.0 and ours[cycle] == 0.0 and ours[cycle // 2] == pytest.approx(1.0, 1e-4)


def test_triangle_is_float64_under_x64():
    import jax

    with jax.enable_x64(True):
        value = triangle(11_730)(jnp.asarray(1))
        assert value.dtype == jnp.float64
        assert float(value) == pytest.approx(pytorch_cyclic_scale(1, 11_730), rel=1e-15)
