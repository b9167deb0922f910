"""On-device augmentation, and the Omega round trip through crop, flip and their inverse."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from apart_jax.augment import (
    Augmentation,
    crop_and_flip,
    draw_augmentation,
    pad_images,
    uncrop_and_unflip,
)


@st.composite
def frames_and_augmentation(draw):
    batch, size, pad, channels = (
        draw(st.integers(1, 4)),
        draw(st.integers(2, 6)),
        draw(st.integers(0, 3)),
        draw(st.integers(1, 3)),
    )
    offsets = draw(
        st.lists(
            st.tuples(st.integers(0, 2 * pad), st.integers(0, 2 * pad)),
            min_size=batch,
            max_size=batch,
        )
    )
    flips = draw(st.lists(st.booleans(), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 1000))
    frames = jax.random.normal(
        jax.random.key(seed), (batch, size + 2 * pad, size + 2 * pad, channels)
    )
    return frames, Augmentation(jnp.array(offsets, jnp.int32), jnp.array(flips)), (size, size)


@settings(max_examples=25, deadline=None)
@given(frames_and_augmentation())
def test_omega_round_trip_writes_back_only_the_crop_window(case):
    frames, aug, size = case
    windows = crop_and_flip(frames, aug, size)
    # The inverse of the forward transform is the identity on the frames.
    np.testing.assert_array_equal(uncrop_and_unflip(frames, windows, aug), frames)
    # New window values land exactly in the window, in the original orientation.
    new = uncrop_and_unflip(frames, windows + 1.0, aug)
    np.testing.assert_array_equal(crop_and_flip(new, aug, size), windows + 1.0)
    changed = np.asarray(new != frames).any(-1)
    for b, (row, col) in enumerate(np.asarray(aug.offsets)):
        expected = np.zeros(changed.shape[1:], bool)
        expected[row : row + size[0], col : col + size[1]] = True
        np.testing.assert_array_equal(changed[b], expected)


def test_crop_and_flip_matches_numpy_indexing():
    frames = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1)
    aug = Augmentation(jnp.array([[0, 2], [1, 0]], jnp.int32), jnp.array([False, True]))
    out = np.asarray(crop_and_flip(frames, aug, (4, 4)))
    f = np.asarray(frames)
    np.testing.assert_array_equal(out[0], f[0, 0:4, 2:6])
    np.testing.assert_array_equal(out[1], f[1, 1:5, 0:4][:, ::-1])


def test_draw_augmentation_covers_every_offset_and_flips_half_the_time():
    aug = draw_augmentation(jax.random.key(0), 20_000, pad=4, flip=True)
    assert aug.offsets.dtype == jnp.int32
    assert set(np.unique(aug.offsets).tolist()) == set(range(9))
    assert abs(float(jnp.mean(aug.flips)) - 0.5) < 0.02
    assert not draw_augmentation(jax.random.key(0), 100, pad=4, flip=False).flips.any()


def test_pad_images_uses_the_pad_value():
    x = jnp.zeros((1, 2, 2, 3))
    padded = pad_images(x, 4, 0.5)
    assert padded.shape == (1, 10, 10, 3)
    assert float(padded.sum()) == 0.5 * (100 - 4) * 3
