"""Training methods sharing one step signature (see :mod:`apart_jax.methods.base`).

Each method's step, with its equations and defaults, is in docs/algorithm.md#methods.

| name        | generator                                                  | passes/step |
|-------------|------------------------------------------------------------|-------------|
| ``clean``   | none: standard training on the clean inputs                | 1           |
| ``fgsm``    | zero init, one step of eps                                 | 2           |
| ``fgsm_rs`` | uniform init, one step of 1.25 eps, projected              | 2           |
| ``fgsm_plus`` | learnable init scale and step (psi), stored init Omega   | 2           |
| ``apart``   | FGSM+ plus learnable layer-wise perturbations              | 2           |
| ``pgd``     | uniform init, K steps of 2/255, projected (``pgd_steps``)  | K + 1       |
| ``nfgsm``   | init uniform in 2 eps, one step of eps, not projected      | 2           |
| ``grad_align`` | FGSM plus the gradient-alignment penalty (double backprop) | 5         |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from apart_jax.methods.apart import OMEGA_DTYPES, Apart, apart, fgsm_plus, init_omega, init_psi
from apart_jax.methods.base import AttackThenDescend, Method
from apart_jax.methods.clean import Clean
from apart_jax.methods.fgsm import fgsm, fgsm_rs
from apart_jax.methods.grad_align import GradAlign, grad_align, released_lambda
from apart_jax.methods.nfgsm import nfgsm
from apart_jax.methods.pgd import pgd

METHOD_NAMES = ("clean", "fgsm", "fgsm_rs", "fgsm_plus", "apart", "pgd", "nfgsm", "grad_align")

# The config keys (apart_jax/config.py) that choose a method's step, besides ``method``.
METHOD_KEYS = (
    "fgsm_rs_step_scale",
    "pgd_steps",
    "pgd_step_size",
    "nfgsm_noise_scale",
    "nfgsm_step_scale",
    "grad_align_base",
    "grad_align_lambda",
)

__all__ = [
    "METHOD_NAMES",
    "OMEGA_DTYPES",
    "Apart",
    "AttackThenDescend",
    "Clean",
    "GradAlign",
    "Method",
    "apart",
    "create_method",
    "fgsm",
    "fgsm_plus",
    "fgsm_rs",
    "grad_align",
    "init_omega",
    "init_psi",
    "method_from_config",
    "nfgsm",
    "pgd",
    "released_lambda",
]


def create_method(
    name: str,
    *,
    eps: float,
    fgsm_rs_step_scale: float = 1.25,
    pgd_steps: int = 10,
    pgd_step_size: float = 2.0 / 255.0,
    nfgsm_noise_scale: float = 2.0,
    nfgsm_step_scale: float = 1.0,
    grad_align_base: str = "fgsm",
    grad_align_lambda: float | None = None,
) -> Method:
    """Builds a training method by name (one of :data:`METHOD_NAMES`).

    ``grad_align_lambda=None`` takes :func:`released_lambda` at ``eps``.
    """
    if name == "clean":
        return Clean()
    if name == "fgsm":
        return fgsm(eps)
    if name == "fgsm_rs":
        return fgsm_rs(eps, fgsm_rs_step_scale)
    if name == "fgsm_plus":
        return fgsm_plus()
    if name == "apart":
        return apart()
    if name == "pgd":
        return pgd(pgd_steps, pgd_step_size)
    if name == "nfgsm":
        return nfgsm(eps, nfgsm_noise_scale, nfgsm_step_scale)
    if name == "grad_align":
        base = fgsm(eps) if grad_align_base == "fgsm" else fgsm_rs(eps, fgsm_rs_step_scale)
        lam = released_lambda(eps) if grad_align_lambda is None else grad_align_lambda
        return grad_align(base, lam)
    raise ValueError(f"unknown method {name!r}; choose one of {list(METHOD_NAMES)}")


def method_from_config(config: Mapping[str, Any]) -> Method:
    """The method a run's config names (a ConfigDict or its config.json as a dict).

    Reads ``method``, ``eps`` (8/255 when absent) and :data:`METHOD_KEYS`; absent keys (a
    config written before they existed) take :func:`create_method`'s defaults.
    """
    options = {key: config[key] for key in METHOD_KEYS if key in config}
    return create_method(config["method"], eps=config.get("eps", 8 / 255), **options)
