"""apart-jax: APART, FGSM+ and adversarial-training baselines in JAX/Flax.

Modules: ``attacks`` (attack primitives), ``models``, ``methods`` (training steps),
``step`` (the step builder), ``health`` (non-finite steps), ``run`` (a run built from its
config, and a trained model read back), ``trainer`` (the epoch loop), ``evaluation`` (clean
and PGD-20 accuracy), ``data`` and ``augment`` (datasets and on-device augmentation),
``optim`` (the release's cyclic SGD), ``parallel``, ``checkpoint``, ``config``.
"""

__version__ = "0.1.0"
