"""Random CIFAR-10-shaped data for the benchmarks: their timings do not depend on pixels."""

from __future__ import annotations

import numpy as np

from apart_jax.data import Dataset, make_dataset


def synthetic_cifar(num_train: int, num_test: int, seed: int = 0) -> Dataset:
    """Random uint8 images (N, 32, 32, 3) and random labels in [0, 10), train and test."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_train + num_test, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, num_train + num_test).astype(np.int32)
    return make_dataset(
        "synthetic",
        images[:num_train],
        labels[:num_train],
        images[num_train:],
        labels[num_train:],
        num_classes=10,
    )
