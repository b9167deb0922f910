"""The training step: which examples a step trains on, their augmentation, and the one
jit-compiled, data-parallel step builder that wraps every method's ``step``.

Data flows one way::

    DeviceData (uint8) -> gather + pad + crop/flip (in the step) -> method.step -> TrainState

Every random choice of a run derives from its seed through one stream per purpose
(``fold_in(key(seed), STREAM)``): the initial weights, Omega's initial values, the per-step
keys, the epoch orders and the evaluation's PGD starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from apart_jax.augment import Augmentation, crop_and_flip, draw_augmentation, pad_images
from apart_jax.compiling import jit
from apart_jax.data import DATASETS, DeviceData, to_unit_range
from apart_jax.health import nonfinite_code
from apart_jax.methods import Method
from apart_jax.parallel import batch_sharded, replicated, shard_batch
from apart_jax.state import StepContext, StepInputs, TrainState

Metrics = dict[str, jax.Array]

INIT_STREAM, OMEGA_STREAM, STEP_STREAM, ORDER_STREAM, EVAL_STREAM = range(5)


class Batch(NamedTuple):
    """Which examples a step trains on and how they are augmented.

    indices: (B,) int32 training-set indices; aug: their crop offsets and flip bits.
    """

    indices: jax.Array
    aug: Augmentation


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """Padding in pixels per side, the pad value in [0, 1], and whether to flip."""

    pad: int
    pad_value: float
    flip: bool


def augment_spec(config: ml_collections.ConfigDict) -> AugmentSpec:
    """The run's augmentation: ``config.pad``, ``pad_value`` and ``flip``, where None takes
    the dataset's default (:data:`apart_jax.data.DATASETS`)."""
    info = DATASETS[config.dataset]
    return AugmentSpec(
        pad=info.pad if config.pad is None else config.pad,
        pad_value=info.pad_value if config.pad_value is None else config.pad_value,
        flip=info.flip if config.flip is None else config.flip,
    )


def epoch_batch_sizes(num_train: int, batch_size: int, drop_remainder: bool) -> list[int]:
    """The batch size of each step of an epoch over ``num_train`` examples: full batches,
    then the remainder as a smaller last batch unless ``drop_remainder``."""
    sizes = [batch_size] * (num_train // batch_size)
    if num_train % batch_size and not drop_remainder:
        sizes.append(num_train % batch_size)
    return sizes


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the step ``state.step`` (augmentation and method noise derive from it)."""
    return jax.random.fold_in(state.rng, state.step)


def draw_batch(
    state: TrainState, order: jax.Array, start: jax.Array, batch_size: int, augment: AugmentSpec
) -> Batch:
    """The batch at position ``start`` of the epoch's ``order`` (N,), with a fresh augmentation."""
    indices = jax.lax.dynamic_slice(order, (start,), (batch_size,))
    aug_key = jax.random.fold_in(step_key(state), 0)
    return Batch(indices, draw_augmentation(aug_key, batch_size, augment.pad, augment.flip))


def gather_batch(
    data: DeviceData, batch: Batch, augment: AugmentSpec
) -> tuple[jax.Array, jax.Array]:
    """Gathers the batch's images and applies its augmentation: (B, H, W, C) in [0, 1], (B,)."""
    images = to_unit_range(data.images[batch.indices])
    frames = pad_images(images, augment.pad, augment.pad_value)
    return crop_and_flip(frames, batch.aug, images.shape[1:3]), data.labels[batch.indices]


def epoch_order(seed: int, epoch: int, num_train: int) -> jax.Array:
    """The permutation (N,) int32 of training examples for ``epoch`` (1-based)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ORDER_STREAM), epoch)
    return jax.random.permutation(key, num_train).astype(jnp.int32)


def device_order(seed: int, epoch: int, num_train: int, mesh: Mesh) -> jax.Array:
    """:func:`epoch_order` placed on every device of ``mesh`` (one host round trip per epoch)."""
    return jax.device_put(np.asarray(epoch_order(seed, epoch, num_train)), replicated(mesh))


class TrainStep(NamedTuple):
    """The jit-compiled training step of one method, in two call forms sharing one body.

    on_batch(state, data, batch) -> (state, metrics): trains on an explicit :class:`Batch`
      (indices, crop offsets, flip bits), to replay another implementation step for step.
    in_epoch(state, data, order, start, batch_size) -> (state, metrics): draws the batch at
      ``start`` of ``order`` and its augmentation inside the step; ``batch_size`` is static.

    Both donate the incoming state; ``in_epoch(s, d, o, i, b)`` equals
    ``on_batch(s, d, draw_batch(s, o, i, b, augment))``.
    """

    on_batch: Callable[..., tuple[TrainState, Metrics]]
    in_epoch: Callable[..., tuple[TrainState, Metrics]]


def state_shardings(mesh: Mesh, uses_omega: bool) -> TrainState:
    """Where a :class:`TrainState` lives: Omega split by rows over the mesh, the rest replicated.

    Returns a prefix tree of shardings (one per field) for ``jit``'s ``out_shardings``.
    """
    everywhere = replicated(mesh)
    fields = {f.name: everywhere for f in dataclasses.fields(TrainState)}
    return TrainState(**{**fields, "omega": batch_sharded(mesh) if uses_omega else None})


def make_train_step(
    method: Method,
    ctx: StepContext,
    augment: AugmentSpec,
    mesh: Mesh,
    *,
    skip_nonfinite: bool = False,
) -> TrainStep:
    """Builds the data-parallel training step of ``method`` over ``mesh``.

    The state keeps its shardings (:func:`state_shardings`); the metrics are replicated and
    include ``nonfinite`` (:func:`apart_jax.health.nonfinite_code`). With ``skip_nonfinite``
    a step whose code is not 0 is discarded: the state only counts the step, and its loss
    and accuracy are reported as 0.
    """

    def on_batch(state: TrainState, data: DeviceData, batch: Batch):
        x, y = shard_batch(gather_batch(data, batch, augment), mesh)
        key = jax.random.fold_in(step_key(state), 1)
        inputs = StepInputs(x, y, batch.indices, batch.aug, key)
        new_state, metrics = method.step(ctx, state, inputs)
        code = nonfinite_code(metrics["loss"], new_state)
        if skip_nonfinite:
            new_state = jax.lax.cond(
                code > 0, lambda: state.replace(step=state.step + 1), lambda: new_state
            )
            metrics = {k: jnp.where(code > 0, jnp.zeros_like(v), v) for k, v in metrics.items()}
        return new_state, {**metrics, "nonfinite": code}

    def in_epoch(state: TrainState, data: DeviceData, order, start, batch_size: int):
        return on_batch(state, data, draw_batch(state, order, start, batch_size, augment))

    jit_args = dict(
        donate_argnums=0,
        out_shardings=(state_shardings(mesh, method.uses_omega), replicated(mesh)),
    )
    return TrainStep(
        jit(on_batch, **jit_args),
        jit(in_epoch, static_argnames="batch_size", **jit_args),
    )
