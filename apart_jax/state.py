"""The training state and the static context every training step shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from flax import struct

from apart_jax.augment import Augmentation

PyTree = Any


class TrainState(struct.PyTreeNode):
    """Everything a training run changes, as one pytree of arrays.

    step: int32 scalar, updates done so far (drives schedules and per-step keys).
    rng: PRNG key; step t uses ``fold_in(rng, t)``.
    params, batch_stats: the model's weights and BN running statistics.
    psi: the model's ``perturb`` collection (alpha, alpha_omega, one alpha per block).
    opt_state: the weights' optimizer state.
    psi_opt_state: psi's own (ascent) optimizer state; ``()`` for methods without psi.
    psi_decay_state: the weights' optimizer state for psi when psi also sits in the
      weights' optimizer (the release's quirk); ``()`` otherwise.
    omega: (N', Hp, Wp, C), one stored perturbation per training example on the padded
      frame, in [-1, 1] (APART and FGSM+); ``None`` otherwise. Stored as float32 or
      bfloat16 (``omega_dtype``); N' >= N pads the rows to a multiple of the device count,
      over which Omega is split (see :func:`apart_jax.parallel.omega_sharding`).
    """

    step: jax.Array
    rng: jax.Array
    params: PyTree
    batch_stats: PyTree
    psi: PyTree
    opt_state: PyTree
    psi_opt_state: PyTree
    psi_decay_state: PyTree
    omega: jax.Array | None


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Static (compile-time) pieces of a training step.

    apply_fn: the model's ``apply``: ``(variables, x, train=..., mutable=...)``.
    weight_tx: the weights' optimizer; psi_tx: psi's optimizer (applied to -dL/dpsi).
    eps: L-inf radius of the training perturbation, in (0, 1].
    image_size: (H, W) of the model's input; the stored Omega frame is padded around it.
    psi_in_weight_optimizer: also give psi the weights' decay-only step (release quirk).
    unroll: unroll multi-step attack loops (None: backend default).
    """

    apply_fn: Callable[..., Any]
    weight_tx: optax.GradientTransformation
    psi_tx: optax.GradientTransformation
    eps: float
    image_size: tuple[int, int]
    psi_in_weight_optimizer: bool = True
    unroll: bool | None = None


class StepInputs(NamedTuple):
    """One batch as a method step sees it.

    x: (B, H, W, C) float32 augmented clean images in [0, 1]; y: (B,) int32 labels;
    indices: (B,) int32 training-set indices (for Omega); aug: their augmentation;
    key: PRNG key for the method's own noise.
    """

    x: jax.Array
    y: jax.Array
    indices: jax.Array
    aug: Augmentation
    key: jax.Array
