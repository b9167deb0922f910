"""Measured counts of forward and backward passes through a logits closure.

Wrap ``logits_fn`` with :func:`counting`; every evaluation of the wrapped closure at run
time (inside ``jit``, ``lax`` loops and early-stopping ``while_loop`` included) adds one
to ``forward``, and every backward pass through it adds one to ``backward``. A pass is one
call on the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax


@dataclasses.dataclass
class PassCount:
    """Batched passes seen so far through a counted closure."""

    forward: int = 0
    backward: int = 0


def counting(logits_fn: Callable[[jax.Array], jax.Array]) -> tuple[Callable, PassCount]:
    """Returns ``(counted_logits_fn, count)``; ``count`` grows as the closure runs.

    Read ``count`` after ``jax.block_until_ready`` (and ``jax.effects_barrier()``) on the
    attack's result. The counted closure computes exactly what ``logits_fn`` computes.
    """
    count = PassCount()

    def add_forward():
        count.forward += 1

    def add_backward():
        count.backward += 1

    @jax.custom_vjp
    def tap(x):
        jax.debug.callback(add_forward)
        return x

    def tap_forward(x):
        jax.debug.callback(add_forward)
        return x, None

    def tap_backward(_, g):
        jax.debug.callback(add_backward)
        return (g,)

    tap.defvjp(tap_forward, tap_backward)

    def counted(x: jax.Array) -> jax.Array:
        return logits_fn(tap(x))

    return counted, count
