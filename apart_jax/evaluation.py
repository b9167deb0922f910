"""Clean and PGD accuracy of a model: the one evaluation program, and the trainer's
per-epoch pass of it over the test split.

:func:`clean_and_robust` is the program (BN in inference mode is the caller's closure);
:func:`make_eval_step` compiles it over the device mesh for uint8 test batches and
:func:`evaluate` runs it over the whole split, batch ``i`` with ``fold_in(key, i)``;
:func:`run_evaluation` sets this up from a run's ``eval_*`` settings for the trainer.
``experiments.robustness_drop`` compiles the same program for its own inputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from apart_jax.attacks import pgd
from apart_jax.compiling import jit
from apart_jax.data import to_device, to_unit_range
from apart_jax.parallel import replicated, shard_batch
from apart_jax.state import TrainState
from apart_jax.step import EVAL_STREAM

if TYPE_CHECKING:
    from apart_jax.run import Run


def clean_and_robust(
    logits_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    step_size: float,
    steps: int,
    unroll: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Which examples the model gets right, clean and under L-inf PGD.

    x: (B, H, W, C) float32 in [0, 1]; y: (B,) int labels; PGD takes ``steps`` steps of
    ``step_size`` within ``eps`` from one uniform random start drawn with ``key``.
    Returns ``(clean, robust)``, both (B,) bool: ``robust`` is right clean and at PGD's point.
    """
    clean = jnp.argmax(logits_fn(x), -1) == y
    x_adv = pgd(logits_fn, x, y, key, eps=eps, step_size=step_size, steps=steps, unroll=unroll)
    robust = clean & (jnp.argmax(logits_fn(x_adv), -1) == y)
    return clean, robust


class EvalData(NamedTuple):
    """Test images (M', H, W, C) uint8, labels (M',) and a mask (M',) of real examples.

    M' is M rounded up to a whole number of evaluation batches; padding is masked out.
    """

    images: jax.Array
    labels: jax.Array
    mask: jax.Array


def make_eval_data(x: np.ndarray, y: np.ndarray, batch_size: int, sharding) -> EvalData:
    """Pads the test split to a multiple of ``batch_size`` and copies it to the device(s)."""
    total = math.ceil(len(y) / batch_size) * batch_size
    extra = total - len(y)
    mask = np.concatenate([np.ones(len(y), bool), np.zeros(extra, bool)])
    images = np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)])
    labels = np.concatenate([y, np.zeros(extra, y.dtype)])
    device = to_device(images, labels, sharding)
    return EvalData(device.images, device.labels, jax.device_put(mask, sharding))


def make_eval_step(
    apply_fn: Callable[..., Any],
    *,
    eps: float,
    step_size: float,
    steps: int,
    unroll: bool | None,
    mesh: Mesh,
) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """A jitted ``(params, batch_stats, images, labels, mask, key) -> (clean, robust)`` counter.

    BN runs in inference mode; the batch is split over ``mesh``. ``clean`` and ``robust``
    (int32 scalars) count the masked examples :func:`clean_and_robust` marks.
    """

    def eval_batch(params, batch_stats, images, labels, mask, key):
        x, y, mask = shard_batch((to_unit_range(images), labels, mask), mesh)

        def logits_fn(x):
            return apply_fn({"params": params, "batch_stats": batch_stats}, x, train=False)

        clean, robust = clean_and_robust(
            logits_fn, x, y, key, eps=eps, step_size=step_size, steps=steps, unroll=unroll
        )
        return jnp.sum(clean & mask), jnp.sum(robust & mask)

    return jit(eval_batch)


def evaluate(
    eval_step: Callable[..., tuple[jax.Array, jax.Array]],
    state: TrainState,
    test: EvalData,
    batch_size: int,
    key: jax.Array,
) -> dict[str, float]:
    """Clean and PGD accuracy of ``state``'s model over the test split, in [0, 1]:
    ``clean_acc`` and ``pgd20_acc``.

    ``eval_step`` is :func:`make_eval_step`'s counter; batch ``i`` uses ``fold_in(key, i)``.
    """
    clean = robust = 0
    for i, start in enumerate(range(0, len(test.labels), batch_size)):
        part = (a[start : start + batch_size] for a in test)
        c, r = eval_step(state.params, state.batch_stats, *part, jax.random.fold_in(key, i))
        clean, robust = clean + c, robust + r
    total = int(jnp.sum(test.mask))
    return {"clean_acc": int(clean) / total, "pgd20_acc": int(robust) / total}


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The per-epoch evaluation of a run: the padded test split, the compiled counter, the
    batch size (a multiple of the device count) and the PGD key."""

    test: EvalData
    step: Callable[..., Any]
    batch_size: int
    key: jax.Array

    def __call__(self, state: TrainState) -> dict[str, float]:
        return evaluate(self.step, state, self.test, self.batch_size, self.key)


def run_evaluation(run: Run) -> Evaluation:
    """The run's :class:`Evaluation`: its test split and its ``eval_*`` settings."""
    config, mesh, dataset = run.config, run.mesh, run.dataset
    batch_size = math.ceil(min(config.eval_batch_size, len(dataset.y_test)) / mesh.size)
    batch_size *= mesh.size
    return Evaluation(
        test=make_eval_data(dataset.x_test, dataset.y_test, batch_size, replicated(mesh)),
        step=make_eval_step(
            run.model.apply,
            eps=config.eval_eps,
            step_size=config.eval_pgd_step_size,
            steps=config.eval_pgd_steps,
            unroll=config.unroll,
            mesh=mesh,
        ),
        batch_size=batch_size,
        key=jax.random.fold_in(jax.random.key(config.seed), EVAL_STREAM),
    )
