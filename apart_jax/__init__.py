"""apart-jax: APART, FGSM+ and adversarial-training baselines in JAX/Flax.

Modules: ``attacks`` (attack primitives), ``models``, ``methods`` (training steps),
``train`` (step builder and epoch loop), ``data`` and ``augment`` (datasets and on-device
augmentation), ``optim`` (the release's cyclic SGD), ``parallel``, ``checkpoint``, ``config``.
"""

__version__ = "0.1.0"
