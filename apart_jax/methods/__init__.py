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
"""

from __future__ import annotations

from apart_jax.methods.apart import OMEGA_DTYPES, Apart, apart, fgsm_plus, init_omega, init_psi
from apart_jax.methods.base import AttackThenDescend, Method
from apart_jax.methods.clean import Clean
from apart_jax.methods.fgsm import fgsm, fgsm_rs
from apart_jax.methods.pgd import pgd

METHOD_NAMES = ("clean", "fgsm", "fgsm_rs", "fgsm_plus", "apart", "pgd")

__all__ = [
    "METHOD_NAMES",
    "OMEGA_DTYPES",
    "Apart",
    "AttackThenDescend",
    "Clean",
    "Method",
    "apart",
    "create_method",
    "fgsm",
    "fgsm_plus",
    "fgsm_rs",
    "init_omega",
    "init_psi",
    "pgd",
]


def create_method(
    name: str,
    *,
    eps: float,
    fgsm_rs_step_scale: float = 1.25,
    pgd_steps: int = 10,
    pgd_step_size: float = 2.0 / 255.0,
) -> Method:
    """Builds a training method by name (one of :data:`METHOD_NAMES`)."""
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
    raise ValueError(f"unknown method {name!r}; choose one of {list(METHOD_NAMES)}")
