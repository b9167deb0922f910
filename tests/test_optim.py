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
