"""Attack suites: AutoAttack (Croce & Hein 2020) and any custom list, run as a worst case.

Each stage attacks only the points still robust after the previous stages; an example
counts as robust at the end if it was classified correctly clean and at every attack's
point. The per-example worst case (the first point that fooled the model, else the clean
input) is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apart_jax.attacks.apgd import apgd, apgd_t
from apart_jax.attacks.batching import ApplyFn, Attack, attack_in_batches, predict
from apart_jax.attacks.checks import check_attack_inputs
from apart_jax.attacks.core import fgsm, pgd
from apart_jax.attacks.counting import PassCount, counting
from apart_jax.attacks.fab import fab_t
from apart_jax.attacks.square import square
from apart_jax.compiling import jit

PyTree = Any

#: The standard AutoAttack, for L-inf and L2 alike.
AUTOATTACK = ("apgd-ce", "apgd-t", "fab-t", "square")

#: The names :func:`make_attack` knows.
ATTACK_NAMES = ("fgsm", "pgd20", "cw", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")


def make_attack(
    name: str, *, eps: float, norm: str = "linf", unroll: bool | int | str | None = None
) -> Attack:
    """The attack ``name`` with its standard settings, as ``attack(logits_fn, x, y, key)``.

    Names: "fgsm"; "pgd20" (20 steps of eps/4, one random start); "cw" (PGD-20 on the C&W
    margin, L-inf); "apgd-ce", "apgd-dlr" (100 iterations); "apgd-t" (APGD on the targeted
    DLR loss, 9 target classes, 100 iterations); "fab-t" (9 target classes, 100
    iterations); "square" (5,000 queries). These are AutoAttack's standard settings.
    ``unroll``: the loop form of the attack's iterations (``apart_jax.attacks.core.loop``;
    FGSM has none). The same arguments give the same callable, so the batch runners compile
    it once.
    """
    if name not in ATTACK_NAMES:
        raise ValueError(f"unknown attack {name!r}; choose from {sorted(ATTACK_NAMES)}")
    if norm != "linf" and name in ("fgsm", "cw"):
        raise ValueError(f"attack {name!r} is L-inf only, got norm={norm!r}")
    check_attack_inputs(eps=eps, norm=norm, unroll=unroll)
    return _standard_attack(name, float(eps), norm, unroll)


@functools.cache
def _standard_attack(name: str, eps: float, norm: str, unroll: bool | int | str | None) -> Attack:
    """:func:`make_attack`'s callables, one per (name, eps, norm, unroll) for the process."""
    partial = functools.partial
    pgd20 = partial(pgd, eps=eps, step_size=eps / 4, steps=20, norm=norm, unroll=unroll)
    return {
        "fgsm": partial(fgsm, eps=eps),
        "pgd20": pgd20,
        "cw": partial(pgd20, loss="margin"),
        "apgd-ce": partial(apgd, eps=eps, norm=norm, loss="ce", unroll=unroll),
        "apgd-dlr": partial(apgd, eps=eps, norm=norm, loss="dlr", unroll=unroll),
        "apgd-t": partial(apgd_t, eps=eps, norm=norm, unroll=unroll),
        "fab-t": partial(fab_t, eps=eps, norm=norm, unroll=unroll),
        "square": partial(square, eps=eps, norm=norm, queries=5000, unroll=unroll),
    }[name]


#: The attacks :func:`run_suite` can drive from the host: the gradient attacks of a hundred
#: iterations, whose model passes ran 3.6-5.9x faster that way on CPU (docs/benchmarks.md).
#: Square (forward passes only) ran 1.3x slower from the host than in its rolled loop, and
#: PGD's 20 steps compile to straight-line code, the fastest form measured for them.
HOST_DRIVEN = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t")


def suite_host_loop() -> bool:
    """Whether :func:`run_suite` drives its attacks' iterations from the host by default.

    On XLA:CPU, yes: ten input-gradient steps of a PreAct-ResNet-18 ran 3.8-5.1x longer in
    one compiled loop than as ten calls of one compiled step (docs/benchmarks.md). Other
    backends compile each attack whole, as measured fine there.
    """
    return jax.default_backend() == "cpu"


def measure_passes(
    apply_fn: ApplyFn, variables: PyTree, attack: Attack, x: np.ndarray, y: np.ndarray
) -> PassCount:
    """Forward and backward passes one call of ``attack`` makes on the batch (x, y), counted."""
    counts = []

    def run(v, xb, yb):
        counted_apply, count = counting(lambda z: apply_fn(v, z))
        counts.append(count)
        return attack(counted_apply, xb, yb, jax.random.key(0))

    jax.block_until_ready(jit(run)(variables, jnp.asarray(x), jnp.asarray(y)))
    jax.effects_barrier()
    return counts[-1]


@dataclasses.dataclass
class Stage:
    """One attack of a suite: robust accuracy after it, points attacked and fooled, time."""

    attack: str
    robust_accuracy: float
    attacked: int
    fooled: int
    seconds: float


@dataclasses.dataclass
class SuiteResult:
    """The outcome of a suite on N points.

    clean_accuracy, robust_accuracy: fractions in [0, 1]; robust (N,) bool: correct clean and
    at every attack's point; x_adv (N, ...): per example the first point that fooled the
    model, else the clean input; stages: one :class:`Stage` per attack, in order.
    """

    clean_accuracy: float
    robust_accuracy: float
    robust: np.ndarray
    x_adv: np.ndarray
    stages: list[Stage]


def run_suite(
    apply_fn: ApplyFn,
    variables: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    key: jax.Array,
    *,
    eps: float,
    norm: str = "linf",
    attacks: Sequence[str] = AUTOATTACK,
    batch_size: int = 500,
    progress: bool = False,
    host_loop: bool | None = None,
) -> SuiteResult:
    """Runs ``attacks`` (names for :func:`make_attack`) in order, each on the still-robust points.

    The default is AutoAttack (:data:`AUTOATTACK`: APGD-CE, APGD-T, FAB-T, Square), the
    standard version for L-inf (eps 8/255 on CIFAR-10) and L2 (eps 0.5).

    Args:
      apply_fn, variables: the model, ``apply_fn(variables, x) -> logits`` (B, K).
      x: inputs (N, ...) in [0, 1]; y: labels (N,) int.
      key: PRNG key; stage s uses ``fold_in(key, s)``.
      attacks: attack names.
      eps, norm: the threat model; batch_size: points per compiled batch.
      progress: show a progress bar per attack with the number of points still robust (one
        line per attack when the output is not a terminal).
      host_loop: run the attacks of :data:`HOST_DRIVEN` with ``unroll="host"`` (Python
        drives their iterations; :func:`attack_in_batches`), or each as one compiled
        program; None: :func:`suite_host_loop`. The results agree up to float rounding.

    Compilations: one for the clean predictions and one per attack that has points to
    attack (with ``host_loop``, one per loop body and a few for the steps around them), each
    reused by later calls with the same model, settings and batch shapes.
    """
    if isinstance(attacks, str):
        raise ValueError(f"attacks must be a sequence of attack names, got the string {attacks!r}")
    x, y = np.asarray(x), np.asarray(y)
    check_attack_inputs(
        x,
        y,
        key=key,
        logits_fn=lambda z: apply_fn(variables, z),
        eps=eps,
        norm=norm,
        allow_empty=True,
        logits_fn_name="apply_fn(variables, x)",
        batch_size=batch_size,
    )
    host_loop = suite_host_loop() if host_loop is None else host_loop
    instances = []
    for name in attacks:
        from_host = host_loop and name in HOST_DRIVEN
        unroll = "host" if from_host else None
        instances.append((name, from_host, make_attack(name, eps=eps, norm=norm, unroll=unroll)))
    robust = predict(apply_fn, variables, x, batch_size=batch_size) == y
    clean_accuracy = float(np.mean(robust))
    x_adv = x.copy()
    stages = []
    for s, (name, from_host, attack) in enumerate(instances):
        start = time.perf_counter()
        todo = np.flatnonzero(robust)
        desc = f"{name} ({len(todo)} robust)"
        found, predicted = attack_in_batches(
            apply_fn, variables, attack, x[todo], y[todo], jax.random.fold_in(key, s),
            batch_size=batch_size, desc=desc, progress=progress, predictions=True,
            host_loop=from_host,
        )  # fmt: skip
        fooled = predicted != y[todo]
        x_adv[todo[fooled]] = found[fooled]
        robust[todo[fooled]] = False
        stages.append(
            Stage(
                name,
                float(np.mean(robust)),
                len(todo),
                int(fooled.sum()),
                time.perf_counter() - start,
            )
        )
    return SuiteResult(clean_accuracy, float(np.mean(robust)), robust, x_adv, stages)
