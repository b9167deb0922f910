"""Dataset sources: the embedded digits, any local ``npz`` file, and per-dataset defaults.

Every source yields a :class:`Dataset` of uint8 images (N, H, W, C) and int32 labels,
validated once on the host. Training copies it to the devices (:func:`to_device`) and
augments on the device (:mod:`apart_jax.augment`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class DatasetError(ValueError):
    """A dataset is unavailable or malformed; the message says what to do, in one line."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Per-dataset defaults.

    num_classes: number of labels (None: inferred from the labels, for ``npz``).
    pad: padding in pixels on each side before the random crop (4 for 32x32 CIFAR).
    flip: whether random horizontal flips are used.
    pad_value: the value in [0, 1] that pads the frame (0.5, grey, as in the release).
    """

    num_classes: int | None
    pad: int
    flip: bool
    pad_value: float = 0.5


DATASETS: dict[str, DatasetInfo] = {
    # scikit-learn's 8x8 handwritten digits, shipped with the package: no network needed.
    # Mirroring changes what a digit is, so no flips; one pixel of padding (offsets 0..2).
    "digits": DatasetInfo(num_classes=10, pad=1, flip=False),
    # Any local file with x_train, y_train, x_test, y_test; CIFAR-style augmentation.
    "npz": DatasetInfo(num_classes=None, pad=4, flip=True),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset in host memory.

    x_train: (N, H, W, C) uint8; y_train: (N,) int32 in [0, num_classes);
    x_test: (M, H, W, C) uint8; y_test: (M,) int32.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


class DeviceData(NamedTuple):
    """Training arrays on the device(s): images (N, H, W, C) uint8 and labels (N,) int32."""

    images: jax.Array
    labels: jax.Array


def _validate_split(name: str, split: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    if x.dtype != np.uint8:
        raise DatasetError(f"{name}: x_{split} must be uint8 images in [0, 255], got {x.dtype}")
    if x.ndim != 4:
        raise DatasetError(f"{name}: x_{split} must have shape (N, H, W, C), got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DatasetError(f"{name}: y_{split} must have shape ({len(x)},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{name}: y_{split} must hold integer labels, got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DatasetError(
            f"{name}: y_{split} has labels in [{y.min()}, {y.max()}], outside [0, {num_classes})"
        )


def make_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int | None = None,
) -> Dataset:
    """Validates arrays and builds a :class:`Dataset` (labels cast to int32).

    ``num_classes`` defaults to ``max label + 1`` over both splits.

    Raises:
      DatasetError: on wrong dtypes, shapes or label ranges, in one line.
    """
    if num_classes is None:
        num_classes = int(max(np.max(y_train), np.max(y_test))) + 1
    _validate_split(name, "train", x_train, y_train, num_classes)
    _validate_split(name, "test", x_test, y_test, num_classes)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(
            f"{name}: train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ"
        )
    return Dataset(
        name,
        x_train,
        y_train.astype(np.int32),
        x_test,
        y_test.astype(np.int32),
        num_classes,
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 real 8x8 grey-scale digits, split train/test per class.

    Pixel values 0..16 are mapped to uint8 0..255; images have shape (8, 8, 1). The split
    is stratified and fixed by ``seed`` (1,437 train and 360 test images by default).
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: int(round(test_fraction * len(members)))]] = True
    train_order = rng.permutation(np.flatnonzero(~test))
    test_order = rng.permutation(np.flatnonzero(test))
    return make_dataset(
        "digits",
        images[train_order],
        labels[train_order],
        images[test_order],
        labels[test_order],
        num_classes=10,
    )


def load_npz(path: str, num_classes: int | None = None) -> Dataset:
    """Loads ``x_train, y_train, x_test, y_test`` (uint8 NHWC, integer labels) from an npz."""
    if not path:
        raise DatasetError("dataset 'npz' needs a file: pass --config.npz_path=FILE.npz")
    if not os.path.isfile(path):
        raise DatasetError(f"npz file not found: {path}")
    with np.load(path) as f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
        if missing:
            raise DatasetError(f"{path} lacks {missing}; it needs x_train, y_train, x_test, y_test")
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    return make_dataset(os.path.basename(path), **arrays, num_classes=num_classes)


def load_dataset(
    name: str, *, npz_path: str = "", train_size: int = 0, test_size: int = 0
) -> Dataset:
    """Loads a dataset by name, keeping its first ``train_size`` / ``test_size`` examples.

    A size of 0 keeps the whole split.

    Raises:
      DatasetError: for an unknown name, a missing file, malformed arrays or a size
        larger than the split.
    """
    if name == "digits":
        data = load_digits()
    elif name == "npz":
        data = load_npz(npz_path)
    else:
        raise DatasetError(
            f"dataset {name!r} is not available offline; choose one of {sorted(DATASETS)} "
            "(for CIFAR-10 and others: save x_train, y_train, x_test, y_test as uint8 NHWC "
            "in an .npz and pass --config.dataset=npz --config.npz_path=FILE)"
        )
    for split, size, total in (
        ("train", train_size, len(data.y_train)),
        ("test", test_size, len(data.y_test)),
    ):
        if size < 0 or size > total:
            raise DatasetError(f"{split}_size={size} but {name} has {total} {split} examples")
    if train_size or test_size:
        data = dataclasses.replace(
            data,
            x_train=data.x_train[: train_size or None],
            y_train=data.y_train[: train_size or None],
            x_test=data.x_test[: test_size or None],
            y_test=data.y_test[: test_size or None],
        )
    return data


def to_device(images: np.ndarray, labels: np.ndarray, sharding=None) -> DeviceData:
    """Copies uint8 images and int32 labels to the device(s) (replicated under ``sharding``)."""
    return DeviceData(
        jax.device_put(jnp.asarray(images, jnp.uint8), sharding),
        jax.device_put(jnp.asarray(labels, jnp.int32), sharding),
    )


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 images in [0, 255] -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0
