"""The training state, the static context every training step shares, and the running sums
of an epoch."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from apart_jax.augment import Augmentation
from apart_jax.parallel import replicated

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


class EpochTotals(NamedTuple):
    """Running sums over the current epoch: training loss and correct predictions (f32 scalars).

    Each step adds its batch mean times its batch size; dividing by the examples seen
    gives the epoch means logged as ``train_loss`` and ``train_acc``. Checkpointed with the
    state, so that a run resumed mid-epoch reports the same means.
    """

    loss_sum: jax.Array
    correct_sum: jax.Array


def zero_totals(mesh: Mesh) -> EpochTotals:
    """:class:`EpochTotals` of an epoch not yet started, replicated over ``mesh``, in JAX's
    float dtype (float32, or float64 under x64, the dtype of a float64 run's metrics)."""
    zero = jax.device_put(np.zeros((), jax.dtypes.canonicalize_dtype(np.float64)), replicated(mesh))
    return EpochTotals(zero, zero)
