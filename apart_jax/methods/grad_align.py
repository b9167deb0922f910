"""GradAlign (Andriushchenko & Flammarion 2020): FGSM training plus a gradient-alignment
penalty, differentiated through the input gradient (double backpropagation).

The step: docs/algorithm.md#grad_align. Per step, for a batch x with labels y:

1. x0 = x (FGSM) or x + eta1, eta1 ~ U[-eps, eps] clipped to [0, 1] (FGSM-RS base);
   pass 1: g1 = grad_x CE(x0), a constant.
2. x_adv = project(x0 + step * sign(g1)) onto the eps-ball and [0, 1].
3. Pass 2: CE(x_adv) for the weights. Pass 3: g2 = grad_x CE(x + eta2), eta2 ~ U[-eps, eps]
   (not clipped, as in the release), kept differentiable in the weights.
4. The weights descend on CE(x_adv) + lambda * (1 - mean_i cos(g1_i, g2_i)), the mean over
   the examples whose g1 and g2 are both non-zero.

Cost: passes 1 and 2 as FGSM, pass 3's forward and backward, and the backward through
pass 3 (double backpropagation, about two more passes): ``passes_per_step`` counts 5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from apart_jax.attacks import project
from apart_jax.methods.base import (
    AttackThenDescend,
    Metrics,
    PyTree,
    apply_weight_gradients,
    forward_train,
    input_gradient,
    mean_cross_entropy,
    step_metrics,
)
from apart_jax.state import StepContext, StepInputs, TrainState


def released_lambda(eps: float) -> float:
    """The release's lambda for radius ``eps`` in (0, 1]: 0.02 * 10 ** (255 eps / 8), the
    log-linear schedule of its CIFAR-10 scripts (0.2 at 8/255, 2.0 at 16/255)."""
    return 0.02 * 10.0 ** (255.0 * eps / 8.0)


def gradient_cosines(g1: jax.Array, g2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example cosine of two gradient batches (B, ...) and where it is defined.

    Returns ``(cos, defined)``: (B,) cosines (0 where undefined) and (B,) bools, True where
    both gradients are non-zero. Differentiable in both arguments where defined.
    """
    g1, g2 = g1.reshape(g1.shape[0], -1), g2.reshape(g2.shape[0], -1)
    sq1, sq2 = jnp.sum(g1 * g1, -1), jnp.sum(g2 * g2, -1)
    defined = (sq1 > 0) & (sq2 > 0)
    norms = jnp.sqrt(jnp.where(defined, sq1 * sq2, 1.0))
    return jnp.where(defined, jnp.sum(g1 * g2, -1) / norms, 0.0), defined


def alignment_penalty(g1: jax.Array, g2: jax.Array) -> jax.Array:
    """1 - mean cos(g1_i, g2_i) over the examples where both are non-zero (0 if none)."""
    cos, defined = gradient_cosines(g1, g2)
    count = jnp.sum(defined)
    return 1.0 - jnp.sum(cos) / jnp.maximum(count, 1)


@dataclasses.dataclass(frozen=True)
class GradAlign:
    """A one-step base method (FGSM or FGSM-RS) plus ``lam`` times the alignment penalty.

    ``lam == 0`` is exactly the base method (the third pass is not built).
    """

    base: AttackThenDescend
    lam: float
    name: str = "grad_align"
    label: str = "GradAlign"
    learns_psi = False
    uses_omega = False

    @property
    def passes_per_step(self) -> int:
        return self.base.passes_per_step + (3 if self.lam else 0)

    def step(
        self, ctx: StepContext, state: TrainState, inputs: StepInputs
    ) -> tuple[TrainState, Metrics]:
        if not self.lam:
            return self.base.step(ctx, state, inputs)
        x, y = inputs.x, inputs.y
        start_key, align_key = jax.random.split(inputs.key)
        x0 = self.base.start(ctx, inputs._replace(key=start_key))
        g1, stats = input_gradient(ctx, state.params, state.batch_stats, x0, y)
        g1 = jax.lax.stop_gradient(g1)
        x_adv = project(x0 + self.base.step_size * jnp.sign(g1), x, ctx.eps, "linf")
        x_noisy = x + jax.random.uniform(align_key, x.shape, x.dtype, -ctx.eps, ctx.eps)

        def loss_fn(params: PyTree):
            logits, adv_stats = forward_train(ctx, params, stats, x_adv)
            g2, noisy_stats = input_gradient(ctx, params, adv_stats, x_noisy, y)
            loss = mean_cross_entropy(logits, y) + self.lam * alignment_penalty(g1, g2)
            return loss, (logits, noisy_stats)

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = apply_weight_gradients(ctx, state.replace(batch_stats=stats), grads)
        return state.replace(step=state.step + 1), step_metrics(loss, logits, y)


def grad_align(base: AttackThenDescend, lam: float) -> GradAlign:
    """GradAlign on ``base`` (a one-step :class:`AttackThenDescend`) with weight ``lam`` >= 0."""
    if base.steps != 1 or not base.projected:
        raise ValueError("GradAlign's base must be a projected one-step method (FGSM, FGSM-RS)")
    if lam < 0:
        raise ValueError(f"grad_align_lambda must be >= 0, got {lam}")
    return GradAlign(base, float(lam))
