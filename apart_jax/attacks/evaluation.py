"""Running attacks over whole datasets in mini-batches, and checking their outputs.

Models enter as ``apply_fn(variables, x) -> logits`` plus ``variables``, so that the weights
are arguments of the compiled programs rather than constants baked into them. Attacks enter
as ``attack(logits_fn, x, y, key) -> x_adv`` with their hyperparameters already bound
(``functools.partial(pgd, eps=8/255, step_size=2/255, steps=20)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from apart_jax.attacks.core import l2_norm

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
Attack = Callable[..., jax.Array]


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis of ``a`` to ``size`` by repeating its first row."""
    if len(a) == size:
        return a
    return np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)])


def _map_batches(step, arrays, batch_size: int, bar=None) -> np.ndarray:
    """``step(b, *batch)`` over consecutive batches of ``arrays`` (each (N, ...)), concatenated.

    Every batch has ``min(batch_size, N)`` rows (the last one is padded with copies of its
    first row, and the padding dropped from the output), so ``step`` compiles once.
    """
    n = len(arrays[0])
    size = min(batch_size, n)
    parts = []
    for b, start in enumerate(range(0, n, size)):
        stop = min(start + size, n)
        out = step(b, *(_pad_to(a[start:stop], size) for a in arrays))
        parts.append(np.asarray(out)[: stop - start])
        if bar is not None:
            bar.update(stop - start)
    return np.concatenate(parts)


def predict(
    apply_fn: ApplyFn, variables: PyTree, x: np.ndarray, *, batch_size: int = 500
) -> np.ndarray:
    """Predicted classes (N,) int for inputs x (N, ...) in [0, 1], in mini-batches."""
    if len(x) == 0:
        return np.zeros((0,), np.int32)
    classify = jax.jit(lambda v, xb: jnp.argmax(apply_fn(v, xb), -1))
    return _map_batches(lambda b, xb: classify(variables, xb), (x,), batch_size)


def attack_in_batches(
    apply_fn: ApplyFn,
    variables: PyTree,
    attack: Attack,
    x: np.ndarray,
    y: np.ndarray,
    key: jax.Array,
    *,
    batch_size: int = 500,
    desc: str | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Runs ``attack`` over (x, y) in mini-batches of any size; returns x_adv (N, ...).

    The attack is compiled once: the last batch is padded (with copies of its first example)
    to the batch size and the padding is dropped. Batch b uses ``fold_in(key, b)``, so the
    result depends on ``batch_size`` only through the keys.
    """
    if len(x) == 0:
        return x.copy()
    run = jax.jit(lambda v, xb, yb, kb: attack(lambda z: apply_fn(v, z), xb, yb, kb))

    def step(b, xb, yb):
        return run(variables, xb, yb, jax.random.fold_in(key, b))

    bar = tqdm(total=len(x), desc=desc, unit="pt", disable=not progress, leave=False)
    with bar:
        return _map_batches(step, (x, y), batch_size, bar)


@dataclasses.dataclass
class RobustResult:
    """Robust accuracy of a model under one attack.

    accuracy: fraction of examples correct both clean and at x_adv, in [0, 1].
    robust: (N,) bool, per example; x_adv: (N, ...) the attack's points.
    """

    accuracy: float
    robust: np.ndarray
    x_adv: np.ndarray


def robust_accuracy(
    apply_fn: ApplyFn,
    variables: PyTree,
    attack: Attack,
    x: np.ndarray,
    y: np.ndarray,
    key: jax.Array,
    *,
    batch_size: int = 500,
    progress: bool = False,
) -> RobustResult:
    """Robust accuracy under ``attack``: correct on the clean input and on the attack's point."""
    x_adv = attack_in_batches(
        apply_fn, variables, attack, x, y, key, batch_size=batch_size, progress=progress
    )
    robust = (predict(apply_fn, variables, x, batch_size=batch_size) == y) & (
        predict(apply_fn, variables, x_adv, batch_size=batch_size) == y
    )
    return RobustResult(float(np.mean(robust)) if len(y) else math.nan, robust, x_adv)


def perturbation_norms(x_adv: np.ndarray, x: np.ndarray, norm: str) -> np.ndarray:
    """Per-example L-inf or L2 norm (N,) of x_adv - x."""
    delta = jnp.asarray(x_adv, jnp.float32) - jnp.asarray(x, jnp.float32)
    if norm == "linf":
        return np.asarray(jnp.max(jnp.abs(delta.reshape(len(delta), -1)), axis=-1))
    return np.asarray(l2_norm(delta))


def check_perturbation(
    x_adv: np.ndarray, x: np.ndarray, *, eps: float, norm: str, atol: float = 1e-5
) -> None:
    """Raises ValueError unless every x_adv is within ``eps`` (+atol) of x and inside [0, 1]."""
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv has shape {x_adv.shape}, x has {x.shape}")
    norms = perturbation_norms(x_adv, x, norm)
    outside = int(np.sum(norms > eps + atol))
    if outside:
        raise ValueError(
            f"{outside} of {len(x)} perturbations exceed eps={eps} in {norm} (max {norms.max()})"
        )
    if x_adv.min() < -atol or x_adv.max() > 1 + atol:
        raise ValueError(f"x_adv leaves [0, 1]: range [{x_adv.min()}, {x_adv.max()}]")
