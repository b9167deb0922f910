"""Running attacks over whole datasets in mini-batches, and checking their outputs.

Models enter as ``apply_fn(variables, x) -> logits`` plus ``variables``, so that the weights
are arguments of the compiled programs rather than constants baked into them. Attacks enter
as ``attack(logits_fn, x, y, key) -> x_adv`` with their hyperparameters already bound
(``functools.partial(pgd, eps=8/255, step_size=2/255, steps=20)``, or ``make_attack``).
Each runner compiles once per model, attack and batch shape, and reuses that program in
later calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apart_jax.attacks.core import l2_norm
from apart_jax.compiling import jit
from apart_jax.progress import progress_bar

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
Attack = Callable[..., jax.Array]


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    """Pads the leading axis of ``a`` to ``size`` by repeating its first row."""
    if len(a) == size:
        return a
    return np.concatenate([a, np.repeat(a[:1], size - len(a), axis=0)])


def _map_batches(step, arrays, batch_size: int, bar=None) -> tuple[np.ndarray, ...]:
    """``step(b, *batch) -> outputs`` over consecutive batches of ``arrays`` (each (N, ...)).

    Every batch has ``min(batch_size, N)`` rows (the last one is padded with copies of its
    first row, and the padding dropped from the outputs), so ``step`` compiles once. Returns
    each output of ``step`` concatenated over the batches (N, ...).
    """
    n = len(arrays[0])
    size = min(batch_size, n)
    parts = []
    for b, start in enumerate(range(0, n, size)):
        stop = min(start + size, n)
        outputs = step(b, *(_pad_to(a[start:stop], size) for a in arrays))
        parts.append([np.asarray(out)[: stop - start] for out in outputs])
        if bar is not None:
            bar.update(stop - start)
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


# The compiled programs of the runners. The model and the attack are static arguments, so jit
# compiles once per (apply_fn, attack, input shapes) and reuses the program on every later
# call: pass the same callables (``make_attack`` returns the same one for the same settings).
@functools.partial(jit, static_argnums=0)
def _classify(apply_fn: ApplyFn, variables: PyTree, x: jax.Array) -> jax.Array:
    return jnp.argmax(apply_fn(variables, x), -1)


@functools.partial(jit, static_argnums=(0, 1, 2))
def _attack_batch(apply_fn, attack, with_predictions, variables, x, y, key, b):
    """The attack on batch ``b`` with key ``fold_in(key, b)``; with its predictions if asked."""
    x_adv = attack(lambda z: apply_fn(variables, z), x, y, jax.random.fold_in(key, b))
    if with_predictions:
        return x_adv, jnp.argmax(apply_fn(variables, x_adv), -1)
    return (x_adv,)


# A plain jax.jit: host-driven attacks trace it into their compiled iterations, and the
# project's jit (compiler options) may only be the outermost one.
@functools.partial(jax.jit, static_argnums=0)
def _logits(apply_fn: ApplyFn, variables: PyTree, x: jax.Array) -> jax.Array:
    return apply_fn(variables, x)


def _attack_batch_from_host(apply_fn, attack, with_predictions, variables, x, y, key, b):
    """:func:`_attack_batch` called eagerly, for attacks whose loops the host drives."""
    logits_fn = functools.partial(_logits, apply_fn, variables)
    x_adv = attack(logits_fn, jnp.asarray(x), jnp.asarray(y), jax.random.fold_in(key, b))
    if with_predictions:
        return x_adv, _classify(apply_fn, variables, x_adv)
    return (x_adv,)


def predict(
    apply_fn: ApplyFn, variables: PyTree, x: np.ndarray, *, batch_size: int = 500
) -> np.ndarray:
    """Predicted classes (N,) int for inputs x (N, ...) in [0, 1], in mini-batches."""
    if len(x) == 0:
        return np.zeros((0,), np.int32)
    (classes,) = _map_batches(lambda b, xb: (_classify(apply_fn, variables, xb),), (x,), batch_size)
    return classes


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
    predictions: bool = False,
    host_loop: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Runs ``attack`` over (x, y) in mini-batches of any size; returns x_adv (N, ...).

    The attack compiles once per ``(apply_fn, attack)`` and batch shape, also across calls:
    the last batch is padded (with copies of its first example) to the batch size and the
    padding is dropped. Batch b uses ``fold_in(key, b)``, so the result depends on
    ``batch_size`` only through the keys. ``progress`` shows a bar (one line when the output
    is not a terminal). With ``predictions``, returns ``(x_adv, the predicted classes at x_adv
    (N,) int)``, from the attack's own compiled program (one more forward pass per batch, no
    other program).

    ``host_loop``: call the attack outside jit, for attacks built with ``unroll="host"``
    (their iterations compile once and the host calls them; the model's forward pass is
    compiled for the rest). Otherwise the whole attack is one compiled program.
    """
    if len(x) == 0:
        return (x.copy(), np.zeros((0,), np.int32)) if predictions else x.copy()
    attack_batch = _attack_batch_from_host if host_loop else _attack_batch

    def step(b, xb, yb):
        return attack_batch(apply_fn, attack, predictions, variables, xb, yb, key, b)

    # On a terminal the bar redraws in place; in a log it is one line (apart_jax.progress).
    with progress_bar(enabled=progress, total=len(x), desc=desc, unit="pt", leave=False) as bar:
        outputs = _map_batches(step, (x, y), batch_size, bar)
    return outputs if predictions else outputs[0]


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
    x_adv, predicted = attack_in_batches(
        apply_fn, variables, attack, x, y, key, batch_size=batch_size, progress=progress,
        predictions=True,
    )  # fmt: skip
    robust = (predict(apply_fn, variables, x, batch_size=batch_size) == y) & (predicted == y)
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
