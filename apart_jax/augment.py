"""On-device augmentation as explicit arrays: pad, random crop and horizontal flip.

The augmentation of a batch is a pair of arrays (crop offsets, flip bits) so that the very
same transform can be applied to the images and to APART's stored perturbations Omega,
and inverted to write Omega back. Everything here is pure ``jnp`` and runs inside ``jit``.
The pipeline and its defaults: docs/algorithm.md#data-and-augmentation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Augmentation(NamedTuple):
    """Per-example augmentation of a batch of B images.

    offsets: (B, 2) int32, the (row, column) of the crop window's top-left corner in the
      padded frame, each in [0, 2 * pad].
    flips: (B,) bool, whether the cropped window is mirrored left-right.
    """

    offsets: jax.Array
    flips: jax.Array


def draw_augmentation(key: jax.Array, batch: int, pad: int, flip: bool) -> Augmentation:
    """Draws crop offsets uniform in {0, ..., 2 pad} per axis; flips w.p. 0.5 if ``flip``."""
    k_crop, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_crop, (batch, 2), 0, 2 * pad + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(k_flip, 0.5, (batch,)) if flip else jnp.zeros((batch,), bool)
    return Augmentation(offsets, flips)


def identity_augmentation(batch: int) -> Augmentation:
    """The augmentation that changes nothing when ``pad == 0`` (offsets 0, no flip)."""
    return Augmentation(jnp.zeros((batch, 2), jnp.int32), jnp.zeros((batch,), bool))


def pad_images(x: jax.Array, pad: int, value: float) -> jax.Array:
    """Pads images (B, H, W, C) by ``pad`` pixels on each side with ``value``."""
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=value)


def _mirror(x: jax.Array, flips: jax.Array) -> jax.Array:
    """Mirrors left-right the images (B, H, W, C) whose flip bit is set."""
    return jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)


def crop_and_flip(frames: jax.Array, aug: Augmentation, size: tuple[int, int]) -> jax.Array:
    """Crops each padded frame (B, Hp, Wp, C) at its offset to ``size`` (H, W), then mirrors.

    Returns:
      (B, H, W, C) windows, same dtype as ``frames``.
    """

    def crop(frame, offset):
        start = (offset[0], offset[1], jnp.zeros_like(offset[0]))  # one index dtype, also under x64
        return jax.lax.dynamic_slice(frame, start, (*size, frame.shape[-1]))

    return _mirror(jax.vmap(crop)(frames, aug.offsets), aug.flips)


def uncrop_and_unflip(frames: jax.Array, windows: jax.Array, aug: Augmentation) -> jax.Array:
    """Inverse of :func:`crop_and_flip`: writes ``windows`` back into ``frames``.

    Each window (H, W, C) is mirrored back (if its flip bit is set) and written into its
    frame at its crop offset; the rest of the frame keeps its old values.

    Args:
      frames: (B, Hp, Wp, C) the frames the windows were cropped from.
      windows: (B, H, W, C) new values, in augmented (cropped and flipped) orientation.
      aug: the augmentation that produced the windows.

    Returns:
      (B, Hp, Wp, C) updated frames.
    """

    def write(frame, window, offset):
        start = (offset[0], offset[1], jnp.zeros_like(offset[0]))
        return jax.lax.dynamic_update_slice(frame, window, start)

    return jax.vmap(write)(frames, _mirror(windows, aug.flips).astype(frames.dtype), aug.offsets)
