"""``jit`` with the XLA options that make this project's convolutions fast on each backend.

On XLA:CPU, jax 0.10 hands convolutions to YNNPACK by default; for PreAct-ResNet-18 (width
16, batch 128, float32, 2-core AMD EPYC) its convolutions made a training step 1.24x slower
and an input-gradient pass 1.16x slower than XLA's own (Eigen) convolutions, measured side by
side in one process (docs/benchmarks.md). On CPU this module therefore keeps YNNPACK for
reductions only. On the 8x8 digits of the quickstart the options made no measurable
difference. GPUs and TPUs get no options: their standard path is unchanged.

:func:`jit` is ``jax.jit`` with those options, decided at the first call or ``lower`` (not at
import, so that ``jax.distributed.initialize`` can still run first). The options change the
rounding of a convolution, not its result: gradients agree with the default path to float32
tolerance (tests/test_compiling.py).

Code of your own that jits our models or attacks gets the same effect from
:func:`compiler_options` (``jax.jit(f, compiler_options=compiler_options())``) or, for a
whole process, from ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# XLA:CPU's library fusions to keep: YNNPACK reductions (BN statistics, pooling) stay, its
# convolutions go. The name is XLA's DebugOptions enum (jax 0.10); see compiler_options().
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def compiler_options() -> dict[str, str]:
    """The XLA compiler options for jax's default backend.

    CPU: :data:`CPU_OPTIONS` if this XLA accepts them (checked once by compiling a tiny
    function), else {} with a warning, so that a jax whose XLA renamed the option still runs.
    Any other backend, or the environment variable ``APART_JAX_XLA_DEFAULTS=1`` (to measure
    or rule out what the options change): {}.
    """
    if jax.default_backend() != "cpu" or os.environ.get("APART_JAX_XLA_DEFAULTS") == "1":
        return {}
    try:
        jax.jit(jnp.negative, compiler_options=CPU_OPTIONS).lower(jnp.zeros(())).compile()
    except Exception as error:  # noqa: BLE001 (any rejection means: compile without them)
        logging.warning("XLA rejected the CPU options %s (%s); using defaults", CPU_OPTIONS, error)
        return {}
    return dict(CPU_OPTIONS)


class _Jit:
    """A ``jax.jit`` of ``fun`` whose compiler options are chosen at its first use."""

    def __init__(self, fun: Callable, kwargs: dict[str, Any]):
        self._fun, self._kwargs = fun, kwargs
        functools.update_wrapper(self, fun)

    @functools.cached_property
    def _jitted(self) -> Any:
        return jax.jit(self._fun, compiler_options=compiler_options(), **self._kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit(...).lower``: the lowered program, to ``compile()``."""
        return self._jitted.lower(*args, **kwargs)


def jit(fun: Callable | None = None, **kwargs: Any) -> Any:
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`; usable as a decorator.

    ``jit(f, static_argnums=0)`` or ``@functools.partial(jit, static_argnums=0)``. The result
    is called or lowered like a jitted function.
    """
    if fun is None:
        return functools.partial(jit, **kwargs)
    return _Jit(fun, kwargs)
