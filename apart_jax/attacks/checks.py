"""Argument checks of the public attacks: a bad argument raises one ValueError that names it.

:func:`check_attack_inputs` is the one check every public attack runs first. It reads only
static information: Python numbers and strings, and the ``shape`` and ``dtype`` of arrays
(tracers included), never an array's values. Under ``jax.jit`` it therefore runs once, at
trace time, and adds nothing to the compiled program. The shape of ``logits_fn``'s output
comes from ``jax.eval_shape``: an abstract trace of the closure, not a forward pass.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apart_jax.attacks.losses import LOSSES

NORMS = ("linf", "l2")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: Default of the arguments of :func:`check_attack_inputs`: left out, not checked.
UNSET: Any = _Unset()


def describe(a: Any) -> str:
    """A short one-line description: ``'int32 (4, 8, 8, 1)'`` for arrays, else the type."""
    shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{dtype} {tuple(shape)}"
    if a is None or isinstance(a, (bool, numbers.Number, str)):
        return repr(a)
    return f"a {type(a).__name__}"


def check_positive_int(name: str, value: object) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {describe(value)}")


def check_unroll(unroll: object) -> None:
    """Raises ValueError unless ``unroll`` is None, a bool, a positive int or "host" (see
    ``loop``)."""
    if unroll is None or isinstance(unroll, bool) or unroll == "host":
        return
    if not isinstance(unroll, numbers.Integral) or unroll < 1:
        raise ValueError(
            f'unroll must be None, a bool, a positive int or "host", got {describe(unroll)}'
        )


def check_interval(name: str, value: Any, interval: str) -> None:
    """Raises ValueError naming ``name`` unless the number ``value`` lies in ``interval``.

    ``interval`` is written as in the message, "(0, 1]", "[0, 1]" or "(0, inf)": a bracket
    includes its bound, a parenthesis excludes it. A JAX array (maybe traced) is not read.
    """
    number = _static_number(name, value, f"a number in {interval}")
    if number is None:
        return
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = number > low if interval[0] == "(" else number >= low
    below = number < high if interval[-1] == ")" else number <= high
    if not (above and below):
        raise ValueError(f"{name} must be in {interval}, got {value}")


def _static_number(name: str, value: Any, what: str = "a positive number") -> float | None:
    """``value`` as a float if it is a Python (or NumPy) number; None for a JAX array."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        return float(value)
    if isinstance(value, jax.Array) and value.ndim == 0:
        return None  # maybe traced: its value is not read
    raise ValueError(f"{name} must be {what}, got {describe(value)}")


@functools.cache
def _raw_key_shape(impl: str) -> tuple[int, ...]:
    """Shape of a raw (uint32) key of the PRNG implementation ``impl``: (2,) for threefry."""
    del impl  # the cache key: the default implementation is a config option
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


def _is_key(key: Any) -> bool:
    shape, dtype = getattr(key, "shape", None), getattr(key, "dtype", None)
    if shape is None or dtype is None:
        return False
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(shape) == ()
    impl = str(jax.config.jax_default_prng_impl)
    return dtype == np.uint32 and tuple(shape) == _raw_key_shape(impl)


# Errors of a closure that reads its input's values, which an abstract trace lacks.
_NEEDS_VALUES = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _check_labels(name: str, labels: Any, x: Any) -> None:
    batch = x.shape[0]
    dtype, shape = getattr(labels, "dtype", None), getattr(labels, "shape", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or tuple(shape) != (batch,):
        raise ValueError(
            f"{name} must be integer labels of shape ({batch},) to match the batch of "
            f"x {describe(x)}, got {describe(labels)}"
        )


def _check_loss(loss: Any, classes: int | None, targeted: bool) -> None:
    """The loss name, and whether K = ``classes`` suffices for it (None: K unknown)."""
    if not (isinstance(loss, str) and loss in LOSSES):
        raise ValueError(f"loss must be one of {LOSSES}, got {describe(loss)}")
    needed = (4 if targeted else 3) if loss == "dlr" else 2
    if classes is not None and classes < needed:
        kind = "targeted " if targeted else ""
        raise ValueError(
            f"{kind}loss={loss!r} needs logits with K >= {needed} classes, got K={classes}"
        )


def check_attack_inputs(
    x: Any = UNSET,
    y: Any = UNSET,
    *,
    key: Any = UNSET,
    logits_fn: Any = UNSET,
    targets: Any = None,
    eps: Any = UNSET,
    step_size: Any = UNSET,
    norm: Any = UNSET,
    loss: Any = UNSET,
    targeted: bool | None = None,
    unroll: Any = UNSET,
    images: bool = False,
    allow_empty: bool = False,
    logits_fn_name: str = "logits_fn",
    **positive_ints: Any,
) -> None:
    """Raises ValueError naming the first bad argument of an attack; arguments left out pass.

    Args:
      x: inputs, a floating array (B, ...) with B >= 1 (B >= 0 with ``allow_empty``);
        with ``images`` 4-D (B, H, W, C).
      y: integer labels (B,). targets: integer target labels (B,), or None.
      key: a single PRNG key, typed (``jax.random.key``) or raw (``jax.random.PRNGKey``).
      logits_fn: must map ``x`` to floating logits (B, K) with K >= 2; checked with
        ``jax.eval_shape`` (no forward pass), skipped for an empty batch.
      eps: radius, in (0, 1] for L-inf (also when ``norm`` is left out), positive for L2.
      step_size: positive. A JAX array ``eps`` or ``step_size`` (maybe traced) is not
        checked: only Python and NumPy numbers are.
      norm: one of :data:`NORMS`.
      loss: one of :data:`~apart_jax.attacks.losses.LOSSES`; "dlr" needs K >= 3, or K >= 4
        when targeted. targeted: whether the loss is targeted (default: ``targets`` given).
      unroll: None, a bool, a positive int or "host" (:func:`check_unroll`).
      images: x must be 4-D. allow_empty: accept B == 0.
      logits_fn_name: how messages name ``logits_fn``.
      **positive_ints: static positive ints by name, for example ``steps=steps``.
    """
    if norm is not UNSET and not (isinstance(norm, str) and norm in NORMS):
        raise ValueError(f"norm must be one of {NORMS}, got {describe(norm)}")
    if eps is not UNSET:
        value = _static_number("eps", eps)
        l2 = norm == "l2"
        if value is not None and not (value > 0.0 if l2 else 0.0 < value <= 1.0):
            bound, name = ("(0, inf)", "l2") if l2 else ("(0, 1]", "linf")
            raise ValueError(f"eps must be in {bound} for norm {name!r}, got {eps}")
    if step_size is not UNSET:
        value = _static_number("step_size", step_size)
        if value is not None and not value > 0.0:
            raise ValueError(f"step_size must be a positive number, got {step_size}")
    for name, value in positive_ints.items():
        check_positive_int(name, value)
    if unroll is not UNSET:
        check_unroll(unroll)
    targeted = targets is not None if targeted is None else targeted
    if loss is not UNSET:
        _check_loss(loss, None, targeted)
    if x is UNSET:
        return
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    ok = shape is not None and dtype is not None and jnp.issubdtype(dtype, jnp.floating)
    if ok:
        ok = len(shape) == 4 if images else len(shape) >= 2
        ok = ok and (allow_empty or shape[0] >= 1)
    if not ok:
        expected = "4-D floating images (B, H, W, C)" if images else "a floating array (B, ...)"
        raise ValueError(
            f"x must be {expected} with B >= {0 if allow_empty else 1}, got {describe(x)}"
        )
    batch = shape[0]
    if y is not UNSET:
        _check_labels("y", y, x)
    if targets is not None:
        _check_labels("targets", targets, x)
    if key is not UNSET and not _is_key(key):
        raw = _raw_key_shape(str(jax.config.jax_default_prng_impl))
        raise ValueError(
            f"key must be one PRNG key, jax.random.key(seed) or a uint32 {raw} "
            f"jax.random.PRNGKey(seed), got {describe(key)}"
        )
    if logits_fn is not UNSET:
        if not callable(logits_fn):
            raise ValueError(f"{logits_fn_name} must be callable, got {describe(logits_fn)}")
        if batch == 0:
            return
        try:
            out = jax.eval_shape(logits_fn, x)
        except _NEEDS_VALUES:
            return  # logits_fn reads values (it can only run eagerly): shapes unchecked
        except (TypeError, ValueError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"{logits_fn_name} failed on x {describe(x)} (inputs (B, ...)): "
                f"{type(e).__name__}: {first}"
            ) from e
        out_shape, out_dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
        if not (
            isinstance(out, jax.ShapeDtypeStruct)
            and len(out_shape) == 2
            and out_shape[0] == batch
            and out_shape[1] >= 2
            and jnp.issubdtype(out_dtype, jnp.floating)
        ):
            raise ValueError(
                f"{logits_fn_name} must return floating logits of shape ({batch}, K) with K >= 2 "
                f"for x of shape {tuple(shape)}, got {describe(out)}"
            )
        if loss is not UNSET:
            _check_loss(loss, out_shape[1], targeted)
