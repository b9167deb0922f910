"""Data parallelism: one device mesh with a ``data`` axis, replicated state, sharded batches.

Training steps are ``jit``-compiled over the mesh: the weights, psi, optimizer states and
the datasets are replicated, each batch is split along its first axis. XLA inserts the
all-reduces, so BN batch statistics and gradients are global and results do not depend on
the device count.

Omega (APART's stored perturbations, one frame per training example: 960 MB in float32
for CIFAR-10) is the one large piece of state. It is split by rows over the ``data`` axis,
so each device holds N / D frames; a step gathers its B frames with a masked local
gather and an all-reduce, and writes them back with an all-gather of B frames (about
2.5 MB per step for CIFAR-10 batch 128), never the whole array.

Several hosts (or several processes on one machine) run JAX's multi-process runtime:
:func:`initialize_distributed` joins them, after which ``jax.devices()`` lists the devices
of every process and the same mesh spans them all. Every process holds the whole
dataset and computes its devices' share of each batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = 100,
) -> None:
    """Joins JAX's multi-process runtime; call once, before any other JAX call.

    On Cloud TPU VMs and under SLURM the first three arguments can be left out (JAX finds
    them). CPU devices talk through gloo collectives (GPUs and TPUs use their own). JAX's
    coordination service ends every process when one has sent no heartbeat for
    ``heartbeat_timeout_seconds`` (an abort with a stack trace); it also installs the
    SIGTERM handler that :class:`apart_jax.runguard.StopRequest` relies on.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )


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


def padded_rows(num_rows: int, mesh: Mesh) -> int:
    """``num_rows`` rounded up to a multiple of the mesh size (rows must split evenly)."""
    return -(-num_rows // mesh.size) * mesh.size
