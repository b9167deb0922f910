"""Experiment configs: one module per experiment, presets shared here."""

import ml_collections

from apart_jax.config import default_config

# One preset per training method; the text after the colon in --config=FILE.py:PRESET.
METHOD_PRESETS: dict[str, dict] = {
    "fgsm": dict(method="fgsm"),
    "fgsm_rs": dict(method="fgsm_rs"),
    "fgsm_plus": dict(method="fgsm_plus"),
    "apart": dict(method="apart"),
    "pgd10": dict(method="pgd", pgd_steps=10),
    "nfgsm": dict(method="nfgsm"),
    "grad_align": dict(method="grad_align"),
}


def preset_config(presets: dict[str, dict], preset: str, **settings) -> ml_collections.ConfigDict:
    """:func:`default_config` with an experiment's ``settings``, then the ``preset``'s keys.

    Raises:
      ValueError: for a preset not in ``presets``, naming the choices.
    """
    if preset not in presets:
        raise ValueError(f"preset {preset!r}: choose one of {sorted(presets)}")
    c = default_config()
    c.update(settings)
    c.update(presets[preset])
    return c
