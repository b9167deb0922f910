"""APART and FGSM+: adversarial training with a learnable perturbation generator.

The step, its defaults and the choices behind it: docs/algorithm.md#apart and
docs/algorithm.md#fgsm_plus. One step, for a batch of examples n with augmented images x:

1. omega = Omega[n] cropped and flipped like x.
2. delta0 = clip(alpha_omega * omega, -eps, eps);  x0 = clip(x + delta0, 0, 1).
3. Pass 1 (BN training mode, no layer noise): L0 = CE(x0); input gradient g_x and, for
   APART, the gradient g_i at every block's pre-activated input. No weight gradients.
4. delta = clip(delta0 + alpha * sign(g_x), -eps, eps);  x_adv = clip(x + delta, 0, 1).
5. Pass 2 (BN training mode): APART adds alpha_i * sign(g_i) at block i (no eps bound).
6. Gradients of L1 = CE(pass 2) for the weights, psi (through x_adv and the layer noise;
   clips pass gradient where they do not clip; signs are constants) and the input g'_x.
7. omega <- clip(omega + alpha / (alpha_omega + 1e-7) * sign(g'_x), -1, 1) with the psi of
   before this step, written back into Omega[n] through the inverse flip and crop.
8. Weights descend on L1; psi ascends on L1 with its own SGD and weight decay 400; with
   ``psi_in_weight_optimizer`` psi then also takes the weights' decay-only step.

BN running statistics are updated by both passes. FGSM+ is the same step without layer
noise; this is our reading of the APART release (the paper's FGSM+ text was not available).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from apart_jax.attacks import clip_with_grad
from apart_jax.augment import crop_and_flip, uncrop_and_unflip
from apart_jax.methods.base import (
    Metrics,
    apply_weight_gradients,
    forward_train,
    mean_cross_entropy,
    step_metrics,
)
from apart_jax.models.perturbation import block_alphas, layer_noise, site_zeros
from apart_jax.state import StepContext, StepInputs, TrainState

PyTree = Any

OMEGA_RATIO_EPS = 1e-7

# Omega's storage dtypes by config name; steps compute in the images' dtype either way.
OMEGA_DTYPES: dict[str, jnp.dtype] = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float64": jnp.float64,
}


def init_psi(template: PyTree, *, alpha: float, alpha_omega: float, layer_alpha: float) -> PyTree:
    """psi values for a model's ``perturb`` collection (shapes from ``template``).

    Defaults (docs/algorithm.md#apart): alpha = alpha_omega = 1e-4, every block's alpha = 0.
    """
    top = {"alpha": alpha, "alpha_omega": alpha_omega}
    return {
        name: (
            {"alpha": jnp.float32(layer_alpha)}
            if isinstance(value, Mapping)
            else jnp.float32(top[name])
        )
        for name, value in template.items()
    }


def init_omega(
    key: jax.Array,
    frame_shape: tuple[int, ...],
    std: float = 1e-3,
    *,
    rows: int | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Omega's initial value: ``std * N(0, 1)`` of shape (N, Hp, Wp, C), stored as ``dtype``.

    ``rows`` >= N pads the first axis with zero rows that no example indexes (so that the
    rows split evenly over devices); the N real rows do not depend on the padding.
    """
    omega = std * jax.random.normal(key, frame_shape, jnp.float32)
    padding = (rows or frame_shape[0]) - frame_shape[0]
    if padding < 0:
        raise ValueError(f"rows={rows} is smaller than the {frame_shape[0]} examples")
    omega = jnp.pad(omega, [(0, padding)] + [(0, 0)] * (len(frame_shape) - 1))
    return omega.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Apart:
    """APART (``layer_noise=True``) or FGSM+ (``layer_noise=False``); see the module docstring."""

    name: str = "apart"
    label: str = "APART"
    layer_noise: bool = True
    learns_psi = True
    uses_omega = True

    @property
    def passes_per_step(self) -> int:
        return 2

    def psi_summary(self, psi: PyTree) -> dict[str, Any]:
        """The psi values worth logging: alpha, alpha_omega and (APART) the layer alphas."""
        summary = {"alpha": psi["alpha"], "alpha_omega": psi["alpha_omega"]}
        if self.layer_noise:
            summary["layer_alphas"] = jnp.stack(list(block_alphas(psi).values()))
        return summary

    def step(
        self, ctx: StepContext, state: TrainState, inputs: StepInputs
    ) -> tuple[TrainState, Metrics]:
        x, y, eps = inputs.x, inputs.y, ctx.eps
        psi = state.psi
        frames = state.omega[inputs.indices].astype(x.dtype)
        omega = crop_and_flip(frames, inputs.aug, ctx.image_size)

        def initial_delta(psi):
            return clip_with_grad(psi["alpha_omega"] * omega, -eps, eps)

        # Pass 1: input and layer-site gradients at x0, weights held fixed.
        x0 = clip_with_grad(x + initial_delta(psi), 0.0, 1.0)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        zeros = site_zeros(ctx.apply_fn, variables, x0) if self.layer_noise else None

        def pass1_loss(x_in, sites):
            logits, batch_stats = forward_train(ctx, state.params, state.batch_stats, x_in, sites)
            return mean_cross_entropy(logits, y), batch_stats

        (_, batch_stats), (g_x, g_sites) = jax.value_and_grad(
            pass1_loss, argnums=(0, 1), has_aux=True
        )(x0, zeros)
        sign_gx = jnp.sign(g_x)
        directions = jax.tree.map(jnp.sign, g_sites) if self.layer_noise else None

        # Pass 2: the adversarial input (and layer noise) as functions of psi.
        def pass2_loss(params, psi, probe):
            delta = clip_with_grad(initial_delta(psi) + psi["alpha"] * sign_gx, -eps, eps)
            x_adv = clip_with_grad(x + delta, 0.0, 1.0)
            sites = layer_noise(psi, directions) if self.layer_noise else None
            logits, new_stats = forward_train(ctx, params, batch_stats, x_adv + probe, sites)
            return mean_cross_entropy(logits, y), (logits, new_stats)

        (loss, (logits, batch_stats)), (g_params, g_psi, g_input) = jax.value_and_grad(
            pass2_loss, argnums=(0, 1, 2), has_aux=True
        )(state.params, psi, jnp.zeros_like(x))

        # Omega: ascend along sign(g'_x), with the psi of before this step.
        alpha, alpha_omega = (jnp.asarray(psi[k], x.dtype) for k in ("alpha", "alpha_omega"))
        ratio = alpha / (alpha_omega + OMEGA_RATIO_EPS)
        omega = jnp.clip(omega + ratio * jnp.sign(g_input), -1.0, 1.0)
        frames = uncrop_and_unflip(frames, omega, inputs.aug)
        new_omega = state.omega.at[inputs.indices].set(frames.astype(state.omega.dtype))

        state = apply_weight_gradients(ctx, state.replace(batch_stats=batch_stats), g_params)

        # psi: gradient ascent (the optimizer descends on -dL/dpsi, plus its decay).
        ascent = jax.tree.map(jnp.negative, g_psi)
        updates, psi_opt_state = ctx.psi_tx.update(ascent, state.psi_opt_state, psi)
        psi = optax.apply_updates(psi, updates)
        psi_decay_state = state.psi_decay_state
        if ctx.psi_in_weight_optimizer:
            no_grad = jax.tree.map(jnp.zeros_like, psi)
            updates, psi_decay_state = ctx.weight_tx.update(no_grad, psi_decay_state, psi)
            psi = optax.apply_updates(psi, updates)

        state = state.replace(
            step=state.step + 1,
            psi=psi,
            psi_opt_state=psi_opt_state,
            psi_decay_state=psi_decay_state,
            omega=new_omega,
        )
        return state, step_metrics(loss, logits, y)


def apart() -> Apart:
    """APART: learnable input step, initialization and layer-wise perturbations."""
    return Apart("apart", "APART", layer_noise=True)


def fgsm_plus() -> Apart:
    """FGSM+: learnable input step and initialization, no layer-wise perturbations."""
    return Apart("fgsm_plus", "FGSM+", layer_noise=False)
