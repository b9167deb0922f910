"""Data parallelism: one device mesh with a ``data`` axis, replicated state, sharded batches.

Training steps are ``jit``-compiled over the mesh: the state and the datasets are
replicated, each batch is split along its first axis. XLA inserts the all-reduces, so BN
batch statistics and gradients are global and results do not depend on the device count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices) with axis :data:`DATA_AXIS`."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The sharding that splits the leading (batch) axis over the devices of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Inside ``jit``: constrains every array of ``tree`` to be split along its batch axis."""
    return jax.lax.with_sharding_constraint(tree, batch_sharded(mesh))
