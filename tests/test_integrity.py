"""Array digests: a NumPy reference, every single-element change caught, all dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apart_jax.integrity import array_digest, digest_mismatches, tree_digests


def reference_digest(words: np.ndarray) -> tuple[int, int]:
    """The module docstring's sums, in Python integers."""
    a = b = 0
    for i, w in enumerate(int(w) for w in words):
        a += w * (2 * i + 1)
        b += w * ((((i + 1) * 0x9E3779B9) % 2**32) | 1)
    return a % 2**32, b % 2**32


@pytest.mark.parametrize(
    "dtype,view", [("float32", np.uint32), ("bfloat16", np.uint16), ("int8", np.uint8)]
)
def test_the_digest_equals_the_documented_sums(dtype, view):
    x = jax.random.normal(jax.random.key(0), (3, 5, 7)).astype(dtype) * 50
    words = np.asarray(x).view(view).reshape(-1).astype(np.uint64)
    assert tuple(int(v) for v in array_digest(x)) == reference_digest(words)


def test_every_single_bit_flip_changes_the_digest():
    """All 32 bits of 64 positions of a float32 array: no flip goes unnoticed."""
    x = np.asarray(jax.random.normal(jax.random.key(1), (8, 8)), np.float32)
    clean = np.asarray(array_digest(x))
    bits = x.view(np.uint32).reshape(-1)
    for position in range(bits.size):
        for bit in range(32):
            flipped = bits.copy()
            flipped[position] ^= np.uint32(1 << bit)
            digest = np.asarray(array_digest(flipped.view(np.float32).reshape(8, 8)))
            assert (digest != clean).all(), (position, bit)


def test_swapped_elements_and_another_shape_change_the_digest():
    x = jnp.arange(12, dtype=jnp.float32)
    digest = tuple(np.asarray(array_digest(x)))
    assert tuple(np.asarray(array_digest(x[::-1]))) != digest
    assert tuple(np.asarray(array_digest(x.reshape(3, 4)))) == digest  # the bits are the same


def test_tree_digests_name_leaves_and_report_the_changed_ones():
    """Float64 (two words per element), booleans and PRNG keys are covered too."""
    with jax.enable_x64(True):
        tree = {
            "params": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.float64)},
            "rng": jax.random.key(3),
            "flag": jnp.array([True, False]),
        }
        digests = tree_digests(tree)
        assert sorted(digests) == ["flag", "params/b", "params/w", "rng"]
        assert all(len(d) == 16 for d in digests.values())
        assert digest_mismatches(tree, digests) == []
        changed = {**tree, "params": {**tree["params"], "b": tree["params"]["b"].at[1].set(1e-300)}}
        assert digest_mismatches(changed, digests) == ["params/b"]
        assert digest_mismatches(tree, {k: v for k, v in digests.items() if k != "rng"}) == ["rng"]
