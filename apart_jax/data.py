"""Dataset sources: the embedded digits, any local ``npz`` file, TFDS datasets, and defaults.

Every source yields a :class:`Dataset` of uint8 images (N, H, W, C) and int32 labels,
validated once on the host. Training copies it to the devices (:func:`to_device`) and
augments on the device (:mod:`apart_jax.augment`).

TFDS datasets (CIFAR-10/100, SVHN, MNIST) are read by :mod:`apart_jax.tfds_data` from
ArrayRecord files without TensorFlow; they are prepared once, with TensorFlow, by::

    python -m apart_jax.data prepare cifar10 [--data_dir=DIR] [--manual_dir=DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
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
    tfds_name: the TensorFlow Datasets name the data is read from (None: not from TFDS).
    image_shape: (H, W, C) of every image (None: whatever the source holds).
    """

    num_classes: int | None
    pad: int
    flip: bool
    pad_value: float = 0.5
    tfds_name: str | None = None
    image_shape: tuple[int, int, int] | None = None


DATASETS: dict[str, DatasetInfo] = {
    # scikit-learn's 8x8 handwritten digits, shipped with the package: no network needed.
    # Mirroring changes what a digit is, so no flips; one pixel of padding (offsets 0..2).
    "digits": DatasetInfo(num_classes=10, pad=1, flip=False),
    # Any local file with x_train, y_train, x_test, y_test; CIFAR-style augmentation.
    "npz": DatasetInfo(num_classes=None, pad=4, flip=True),
    # The release's setting for 32x32 natural images: 4 pixels of grey padding, flips.
    "cifar10": DatasetInfo(
        num_classes=10, pad=4, flip=True, tfds_name="cifar10", image_shape=(32, 32, 3)
    ),
    "cifar100": DatasetInfo(
        num_classes=100, pad=4, flip=True, tfds_name="cifar100", image_shape=(32, 32, 3)
    ),
    # House-number digits: crops as for CIFAR, but mirroring changes what a digit is.
    "svhn_cropped": DatasetInfo(
        num_classes=10, pad=4, flip=False, tfds_name="svhn_cropped", image_shape=(32, 32, 3)
    ),
    # MNIST digits are size-normalised into a 20x20 box centred in the 28x28 frame, so shifts
    # of up to 2 pixels (offsets 0..4) never cut a stroke; the padding is black, like the
    # background (grey would draw a frame never seen at test time); no flips. The MNIST
    # recipes of Madry et al. and Wong et al. train without augmentation: --config.pad=0.
    "mnist": DatasetInfo(
        num_classes=10,
        pad=2,
        flip=False,
        pad_value=0.0,
        tfds_name="mnist",
        image_shape=(28, 28, 1),
    ),
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


def _read_npz(path: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an npz holding x_train, y_train, x_test and y_test (only the
    named ones are read from disk).

    Raises:
      DatasetError: for an empty path, a missing file or a missing array, in one line.
    """
    if not path:
        raise DatasetError("dataset 'npz' needs a file: pass --config.npz_path=FILE.npz")
    if not os.path.isfile(path):
        raise DatasetError(f"npz file not found: {path}")
    with np.load(path) as f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
        if missing:
            raise DatasetError(f"{path} lacks {missing}; it needs x_train, y_train, x_test, y_test")
        return {k: f[k] for k in keys}


def load_npz(path: str, num_classes: int | None = None) -> Dataset:
    """Loads ``x_train, y_train, x_test, y_test`` (uint8 NHWC, integer labels) from an npz."""
    arrays = _read_npz(path, ("x_train", "y_train", "x_test", "y_test"))
    return make_dataset(os.path.basename(path), **arrays, num_classes=num_classes)


def check_size(name: str, split: str, size: int, total: int) -> None:
    if size < 0 or size > total:
        raise DatasetError(f"{split}_size={size} but {name} has {total} {split} examples")


def load_dataset(
    name: str,
    *,
    npz_path: str = "",
    data_dir: str | None = None,
    train_size: int = 0,
    test_size: int = 0,
    progress: bool = True,
    num_classes: int | None = None,
) -> Dataset:
    """Loads a dataset by name, keeping its first ``train_size`` / ``test_size`` examples.

    A size of 0 keeps the whole split. ``num_classes`` is the label count of an ``npz``
    (None: its largest label + 1); the other datasets know theirs. TFDS datasets are read
    from ``data_dir`` (see :func:`apart_jax.tfds_data.load_tfds`; "" or None is TFDS's
    default) with a progress bar unless ``progress`` is False.

    Raises:
      DatasetError: for an unknown name, a missing file or unprepared dataset, malformed
        arrays or a size larger than the split.
    """
    info = DATASETS.get(name)
    if name == "digits":
        data = load_digits()
    elif name == "npz":
        data = load_npz(npz_path, num_classes)
    elif info is not None and info.tfds_name is not None:
        from apart_jax.tfds_data import load_tfds  # it builds on this module

        return load_tfds(
            name, data_dir or None, progress=progress, train_size=train_size, test_size=test_size
        )
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    check_size(name, "train", train_size, len(data.y_train))
    check_size(name, "test", test_size, len(data.y_test))
    if train_size or test_size:
        data = dataclasses.replace(
            data,
            x_train=data.x_train[: train_size or None],
            y_train=data.y_train[: train_size or None],
            x_test=data.x_test[: test_size or None],
            y_test=data.y_test[: test_size or None],
        )
    return data


def load_test_split(
    name: str,
    *,
    num_classes: int,
    npz_path: str = "",
    data_dir: str | None = None,
    test_size: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """The test split of :func:`load_dataset`'s dataset, without reading the training split.

    Returns images (M, H, W, C) uint8 and labels (M,) int32, the first ``test_size`` (0: all),
    validated against ``num_classes`` labels (the model's outputs).

    Raises:
      DatasetError: as :func:`load_dataset`, for the test split.
    """
    info, label = DATASETS.get(name), name
    if name == "digits":
        data = load_digits()
        x, y = data.x_test, data.y_test
    elif name == "npz":
        arrays = _read_npz(npz_path, ("x_test", "y_test"))
        label, x, y = os.path.basename(npz_path), arrays["x_test"], arrays["y_test"]
    elif info is not None and info.tfds_name is not None:
        from apart_jax.tfds_data import open_tfds, read_tfds_split  # they build on this module

        _, test = open_tfds(name, data_dir or None)
        x, y = read_tfds_split(name, "test", test, test_size, progress)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    _validate_split(label, "test", x, y, num_classes)
    check_size(name, "test", test_size, len(y))
    return x[: test_size or None], y[: test_size or None].astype(np.int32)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apart_jax.data prepare NAME [--data_dir=DIR] [--manual_dir=DIR]``.

    Returns the exit status: 0, or 2 after one line on stderr for a DatasetError.
    """
    from apart_jax.tfds_data import prepare_tfds, tfds_datasets  # they build on this module

    parser = argparse.ArgumentParser(
        prog="python -m apart_jax.data", description="Prepare TFDS datasets for apart-jax."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare",
        help="download (or read from --manual_dir) and write a dataset as ArrayRecord",
    )
    prepare.add_argument("name", help=f"one of {tfds_datasets()}")
    prepare.add_argument("--data_dir", default=None, help="TFDS data directory or gs:// bucket")
    prepare.add_argument(
        "--manual_dir", default=None, help="folder holding the official archives (offline)"
    )
    args = parser.parse_args(argv)
    try:
        path = prepare_tfds(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"prepared {args.name} in {path}")
    return 0


def to_device(images: np.ndarray, labels: np.ndarray, sharding=None) -> DeviceData:
    """Copies uint8 images and int32 labels to the device(s) (replicated under ``sharding``)."""
    return DeviceData(
        jax.device_put(np.asarray(images, np.uint8), sharding),
        jax.device_put(np.asarray(labels, np.int32), sharding),
    )


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 images in [0, 255] -> [0, 1] in JAX's float dtype: float32, or float64 under x64."""
    return images.astype(jax.dtypes.canonicalize_dtype(jnp.float64)) / 255.0


if __name__ == "__main__":
    # The imported module's main, not this __main__ copy's: its DatasetError is the class
    # apart_jax.tfds_data raises.
    from apart_jax import data

    sys.exit(data.main())
