"""Digests of saved arrays: silent corruption of a checkpoint is caught on restore.

Orbax verifies no checksums, so a flipped bit in an array file that keeps its length
restores as a wrong weight. Every checkpoint therefore records, in its JSON metadata, a
64-bit digest of each array it saves (:func:`tree_digests`), computed on the devices from
the arrays' bits; a restore recomputes them and compares (:func:`digest_mismatches`).

The digest of an array with bits ``w_0, w_1, ...`` (its elements' bytes read as unsigned
32-bit words; 8- and 16-bit elements widened, 64-bit ones split in two) is the pair of
sums, modulo 2**32,

    a = sum_i w_i * (2 i + 1),        b = sum_i w_i * (((i + 1) * 0x9E3779B9) | 1).

Both multipliers are odd, hence invertible modulo 2**32: any change to a single element,
one flipped bit or a whole garbled word, changes both sums, always. Integer sums do not
depend on the order of summation, so the digest is the same on any number of devices and
under any sharding: a checkpoint written on 4 devices verifies on 1. It is a checksum
against accidental corruption (storage, transfer), not a cryptographic hash.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive indices over all bits


def array_words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as a flat uint32 vector (one word per element of at most 4 bytes,
    two per 8-byte element; booleans and PRNG keys by their raw data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def array_digest(x: jax.Array) -> jax.Array:
    """The digest ``(a, b)`` of ``x`` (module docstring) as a uint32 vector of shape (2,)."""
    words = array_words(x)
    index = jnp.arange(words.size, dtype=jnp.uint32)
    a = jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)
    b = jnp.sum(words * (((index + 1) * jnp.uint32(_GOLDEN)) | 1), dtype=jnp.uint32)
    return jnp.stack([a, b])


@jax.jit
def _digests(tree: PyTree) -> PyTree:
    return jax.tree.map(array_digest, tree)


def leaf_name(path: tuple) -> str:
    """A leaf's path as ``params/conv1/kernel`` (the same for a dataclass field and a dict
    key, so a partial restore names its leaves like the whole state)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def tree_digests(tree: PyTree) -> dict[str, str]:
    """Every array of ``tree`` by :func:`leaf_name`: its digest as 16 hex digits.

    Computed on the arrays' devices; with several processes every process must call it
    (the digests of global arrays are reduced across all of them), and all get the same.
    """
    digests = _digests(tree)
    leaves, _ = jax.tree_util.tree_flatten_with_path(digests)
    return {
        leaf_name(path): "".join(f"{int(w):08x}" for w in np.asarray(d.addressable_data(0)))
        for path, d in leaves
    }


def digest_mismatches(tree: PyTree, recorded: dict[str, str]) -> list[str]:
    """The names of ``tree``'s arrays whose digest differs from ``recorded`` (or that
    ``recorded`` lacks), in tree order; empty when all match."""
    actual = tree_digests(tree)
    return [name for name, digest in actual.items() if recorded.get(name) != digest]
